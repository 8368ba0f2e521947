"""The Python API: inputs and results in memory, no files or text to parse.

    python examples/python_api.py PHOTO_DIR OUT_DIR [--model PATH] [--steps N] [--size PX] [--max-new-tokens N]

Captions a folder as a stream (each result as soon as its batch is done), draws a picture
from the first caption, and speaks it. Components load on first use and stay loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from miocli import Mio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("photos", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", help="model folder (default: MIO_MODEL or the Hugging Face cache)")
    parser.add_argument("--steps", type=int, default=20, help="diffusion steps")
    parser.add_argument("--size", type=int, default=768, help="picture side in pixels")
    parser.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (default: each task's own)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    limit = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}

    mio = Mio(args.model)
    photos = sorted(args.photos.glob("*.png")) + sorted(args.photos.glob("*.jpg"))
    captions = {}
    # stream() yields each result as its batch finishes; a bad file is that result's error.
    for result in mio.stream("caption", photos, batch_size=8, **limit):
        if result.ok:
            captions[result.input] = result.text
            print(f"{result.input}: {result.text}")
        else:
            print(f"{result.input}: skipped ({result.error})")
    if not captions:
        return

    first = next(iter(captions.values())).strip() or "a photograph"
    picture = mio.imagine(f"a painting of {first}", seed=0, steps=args.steps, size=args.size, **limit)
    picture.images[0].save(args.out / "painting.png")
    speech = mio.tts(first[:200], seed=0, **limit)
    speech.audio[0].save(args.out / "caption.wav")
    print(f"wrote {args.out / 'painting.png'} and {args.out / 'caption.wav'} ({speech.audio[0].seconds:.1f} s)")


if __name__ == "__main__":
    main()
