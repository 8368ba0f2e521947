"""A conversation with media in and out, in memory: a photo, then a recording, then a request for a picture.

    python examples/chat_media.py PHOTO RECORDING OUT_DIR [--model PATH] [--steps N] [--size PX] [--max-new-tokens N]

Each turn's media are encoded once: the conversation is kept as `Turn`s (from `Mio.conversation`), so the next
answer reuses their tokens. Pictures and speech in the answers are saved under OUT_DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from miocli import Mio
from miocli.core.conversation import answer_turn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("photo", type=Path)
    parser.add_argument("recording", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", help="model folder (default: MIO_MODEL or the Hugging Face cache)")
    parser.add_argument("--steps", type=int, default=20, help="diffusion steps for pictures in answers")
    parser.add_argument("--size", type=int, default=768, help="picture side in pixels")
    parser.add_argument("--max-new-tokens", type=int, help="cap on generated tokens per answer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"steps": args.steps, "size": args.size}
    if args.max_new_tokens:
        settings["max_new_tokens"] = args.max_new_tokens

    mio = Mio(args.model)
    turns = mio.conversation([{"role": "user", "content": ["What is in this photo?", args.photo]}])
    questions = [["Listen to this and answer it.", args.recording], ["Now draw a picture of it."]]
    for number in range(1, len(questions) + 2):
        reply = mio.chat(turns, **settings)
        print(f"answer {number}: {reply.text}")
        for k, image in enumerate(reply.images, start=1):
            image.save(args.out / f"answer-{number}-{k}.png")
        for k, audio in enumerate(reply.audio, start=1):
            audio.save(args.out / f"answer-{number}-{k}.wav")
        turns.append(answer_turn(reply))  # the answer as generated: its media tokens stay in context
        if number <= len(questions):
            turns += mio.conversation([{"role": "user", "content": questions[number - 1]}])
    print(f"{len(turns)} turns; the photo and the recording were encoded once")


if __name__ == "__main__":
    main()
