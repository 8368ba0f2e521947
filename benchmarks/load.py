"""Loading the LLM through miocli's Runtime: none / 8-bit / 4-bit on the tiny checkpoint.

Builds the tiny checkpoint (miocli.model.tiny) in a temporary cache, then for each quantize mode
starts a fresh Python process that loads the LLM with `Runtime(RuntimeOptions(quantize=...)).llm`
and reports:

- load s: the Runtime's own load record (from_pretrained, quantization included); the first
  load in a process also imports transformers' Llama modelling code;
- reload s: the same load again in the same process, i.e. the weights alone;
- import s: importing torch, transformers and bitsandbytes before that (paid once per process);
- RSS MiB: resident memory of the process after the load;
- footprint MiB: the model's `get_memory_footprint()` (parameters and buffers);
- tokens/s: a 32-token greedy generation (batch 1, no early stop), median of 3 after one
  untimed warm-up.

The tiny LLM's weights are mostly its embeddings, which bitsandbytes leaves unquantized, so the
footprint differences here show the mechanics, not what 4-bit saves on the 7B model.

Run: python benchmarks/load.py [--modes none,8bit,4bit] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEW_TOKENS = 32
GENERATION_RUNS = 3


def child(mode: str, model_dir: str) -> None:
    import warnings

    # bitsandbytes' int8 CPU path warns on every matmul; the warnings would be timed too.
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    import bitsandbytes  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import_seconds = time.perf_counter() - start

    import psutil

    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    runtime = Runtime(RuntimeOptions(model=model_dir, device="cpu", quantize=mode))
    llm = runtime.llm
    record = runtime.loads[-1]
    rss = psutil.Process().memory_info().rss
    again = Runtime(RuntimeOptions(model=model_dir, device="cpu", quantize=mode))
    _ = again.llm
    reload_seconds = again.loads[-1].seconds
    del again
    tokenizer = runtime.tokenizer
    ids = torch.tensor([tokenizer.encode("<|startoftext|>The quick brown fox jumps over the lazy dog")])
    kwargs = {"do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_id}
    with torch.inference_mode():
        llm.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        timings = []
        for _ in range(GENERATION_RUNS):
            start = time.perf_counter()
            out = llm.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
            timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings)
    generated = out.shape[1] - ids.shape[1]
    result = {
        "mode": mode,
        "import_s": import_seconds,
        "load_s": record.seconds,
        "reload_s": reload_seconds,
        "rss_mib": rss / 2**20,
        "footprint_mib": llm.get_memory_footprint() / 2**20,
        "parameters": record.parameters,
        "dtype": str(next(p for p in llm.parameters() if p.is_floating_point()).dtype).replace("torch.", ""),
        "linear": type(llm.model.layers[0].mlp.up_proj).__name__,
        "tokens": generated,
        "tokens_per_s": generated / seconds,
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="none,8bit,4bit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from miocli.model.tiny import ensure_tiny_checkpoint

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    # What `mio` itself sets before torch starts (cli.main); export OMP_WAIT_POLICY to compare.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="mio-load-bench-") as cache:
        start = time.perf_counter()
        model_dir = ensure_tiny_checkpoint("instruct", cache_dir=Path(cache))
        print(f"tiny checkpoint built in {time.perf_counter() - start:.1f} s: {model_dir}")
        rows = []
        for mode in args.modes.split(","):
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(model_dir)],
                                  capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{mode}: failed ({done.returncode})\n{done.stderr[-2000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))

    print(f"\n{os.cpu_count()} CPUs, torch threads {args.threads or 'default'}, "
          f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; one fresh process per row")
    header = (f"{'quantize':<8} {'linear layers':<14} {'dtype':<9} {'import s':>8} {'load s':>7} {'reload s':>8} "
              f"{'RSS MiB':>8} {'footprint MiB':>13} {'tokens/s':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<8} {r['linear']:<14} {r['dtype']:<9} {r['import_s']:>8.2f} {r['load_s']:>7.3f} "
              f"{r['reload_s']:>8.3f} {r['rss_mib']:>8.0f} {r['footprint_mib']:>13.2f} {r['tokens_per_s']:>9.1f}")
    print(f"\nparameters: {rows[0]['parameters']:,}; "
          f"tokens/s: {NEW_TOKENS} greedy tokens, batch 1, median of {GENERATION_RUNS}")


if __name__ == "__main__":
    main()
