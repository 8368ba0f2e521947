"""A long conversation with an image in every turn, on the tiny checkpoint: what the history costs.

Builds the tiny checkpoint (miocli.model.tiny) in a temporary MIO_CACHE and holds a conversation of T turns
(default 20) through `Mio.chat`, each user turn a question, W words of text and a new 64x64 noise image, each
answer up to N new tokens (greedy, one beam). Three ways:

- `turns`: the conversation kept as `conversation.Turn`s (what `mio chat -i` does): each image is encoded once;
- `dicts`: the conversation re-sent as `{role, content}` dicts with the image paths: every image every turn;
- `bounded`: as `turns` with `max_history=6`: the prompt stops growing.

For each it prints the SEED encoder's images (calls to `mediatokens.image_ids` are counted), the last prompt's
tokens, the wall time of the first and last five turns, and the peak RSS. Then it keeps adding turns (with
`turns`, no max_history) until the conversation passes the context, and prints the error it gets.

Run: python benchmarks/chat_history.py [--turns T] [--words W] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--words", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from miocli import Mio
    from miocli.core import mediatokens
    from miocli.core.conversation import Part, Turn, answer_turn
    from miocli.errors import UsageError
    from miocli.model.tiny import ensure_tiny_checkpoint

    encoded = [0]
    original = mediatokens.image_ids

    def counted(runtime: Any, images: Any, batch_size: int = 8) -> Any:
        encoded[0] += len(images)
        return original(runtime, images, batch_size)

    mediatokens.image_ids = counted  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = ensure_tiny_checkpoint("instruct", cache_dir=root / "cache")
        rng = np.random.default_rng(0)
        paths = []
        for n in range(200):
            path = root / f"image{n}.png"
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        mio = Mio(str(model), device="cpu")
        settings = {"max_new_tokens": args.max_new_tokens, "beams": 1}
        words = " ".join(["kite"] * args.words)

        def question(n: int) -> str:
            return f"turn {n}: what is in this picture? {words}"

        def run(kind: str, turns_wanted: int) -> None:
            encoded[0] = 0
            history: list[Any] = []
            times = []
            for n in range(turns_wanted):
                start = time.perf_counter()
                if kind == "dicts":
                    history.append({"role": "user", "content": [question(n), {"type": "image", "path": str(paths[n])}]})
                    reply = mio.chat(history, **settings)
                    history.append({"role": "assistant", "content": reply.text})
                else:
                    media = mio.conversation([{"role": "user", "content": [question(n), paths[n]]}])
                    history += media
                    reply = mio.chat(history, max_history=6 if kind == "bounded" else None, **settings)
                    history.append(answer_turn(reply))
                    if kind == "bounded":
                        history = history[-7:]
                times.append(time.perf_counter() - start)
            last = mio.conversation_prompt(history[:-1])
            tokens = len(mio.prompt_ids(last))
            print(f"{kind:8s} images encoded {encoded[0]:4d}  last prompt {tokens:5d} tokens  "
                  f"turns 1-5 {statistics.median(times[:5]) * 1000:6.0f} ms  "
                  f"last 5 {statistics.median(times[-5:]) * 1000:6.0f} ms (median)")

        for kind in ("turns", "dicts", "bounded"):
            run(kind, args.turns)
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

        history = []
        for n in range(len(paths)):
            history += [Turn("user", [Part("text", text=question(n) + " " + words * 4)]),]
            history[-1].parts.append(mio.conversation([{"role": "user", "content": [paths[n]]}])[0].parts[0])
            try:
                reply = mio.chat(history, **settings)
            except UsageError as exc:
                print(f"turn {n + 1}: {exc}")
                break
            history.append(answer_turn(reply))


if __name__ == "__main__":
    main()
