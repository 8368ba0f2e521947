"""`mio demo`: the whole pipeline on a tiny random checkpoint, to prove an install works."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from miocli.outputs import atomic_write_text


def _fresh_folder(requested: Path | None) -> Path:
    if requested is not None:
        return requested
    candidate = Path("mio-demo")
    number = 2
    while candidate.exists():
        candidate = Path(f"mio-demo-{number}")
        number += 1
    return candidate


def run_demo(output_dir: Path | None, *, verbose: bool = False) -> int:
    from miocli.api import GenerationOptions, Mio
    from miocli.outputs import OutputDir
    from miocli.tiny import ensure_tiny_checkpoint

    def say(message: str) -> None:
        print(f"mio demo: {message}", file=sys.stderr)

    say("the model is a tiny RANDOM checkpoint: every output below is noise; it shows the install works")
    start = time.perf_counter()
    model_dir = ensure_tiny_checkpoint("instruct")
    say(f"tiny checkpoint ready at {model_dir} ({time.perf_counter() - start:.1f} s)")
    out = OutputDir(_fresh_folder(output_dir))
    options = GenerationOptions(max_new_tokens=24, seed=0)
    results: list[tuple[str, str]] = []

    instruct = Mio(str(model_dir), device="cpu", verbose=verbose)
    reply = instruct.chat("What is the capital of France?", options=options)
    results.append(("chat", reply.text))

    base = Mio(str(model_dir), variant="base", device="cpu", verbose=verbose)
    (generated,) = base.generate("Question: what is in the picture? Answer:", options)
    results.append(("generate", generated.text))

    for task, text in results:
        path = out.target(f"{task}.txt")
        atomic_write_text(path, text + "\n")
        out.add_record({"task": task, "text": text, "files": [str(path)]})
        print(f"{task}: {json.dumps(text, ensure_ascii=False)[:100]}")
    say(f"outputs written to {out.path.resolve()} in {time.perf_counter() - start:.1f} s")
    return 0
