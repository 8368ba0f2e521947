"""MIO's LLM on the CPU, side by side: mio bf16, mio 4-bit, mio 8-bit, `--engine llamacpp` Q4_0, and `llama-bench`.

    python benchmarks/cpu.py [--model tiny|DIR] [--prompts 16,256,512] [--new 64] [--rows bf16,4bit,8bit,llamacpp]

The same prompts (random text-token ids of 16, 256 and 512 tokens) and the same number of new tokens for every
row, each row in a fresh process: prefill tok/s (prompt tokens over the time to the first new token), decode
tok/s (the other new tokens over their time), first-token latency, the LLM's load time (first: an empty
$MIO_CACHE, so quantizing or exporting the GGUF; cached: a second process on that cache) and the process's peak
RSS. Greedy, one beam, no decodable-output rule, and a stop id the prompts never reach, so every answer has
exactly --new tokens. `llama-bench` (llama.cpp's own, built from llama-cpp-python's sdist: docs/engines.md) runs on
the Q4_0 file the llamacpp row exported when it is on the PATH, with as many threads.

DIR defaults to the tiny checkpoint; a real-size random one is `python -m miocli.model.realsize DIR` (about 19 GB,
never in git or CI). Timings on a shared machine are slowed by whatever else runs: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = {"bf16": ("transformers", "bfloat16", "none"), "4bit": ("transformers", "bfloat16", "4bit"),
        "8bit": ("transformers", "bfloat16", "8bit"), "llamacpp": ("llamacpp", "auto", "4bit")}

CHILD = r"""
import json, random, sys, time
spec = json.loads(sys.argv[1])
import torch
from miocli.core.pipeline import Engine
from miocli.engines.base import GenerationSettings, Job
from miocli.model.devices import RuntimeOptions
from miocli.model.runtime import Runtime
runtime = Runtime(RuntimeOptions(model=spec["model"], device="cpu", dtype=spec["dtype"], quantize=spec["quantize"],
                                 engine=spec["engine"]))
engine = Engine(runtime)
generator = engine.generator()
runtime.model_dir, runtime.tokenizer  # found (the tiny one built) before the clock starts
# imports before the clock too: the load is the weights' (quantizing or exporting on a first load)
if spec["engine"] == "llamacpp":
    import llama_cpp
else:
    import transformers.models.llama.modeling_llama
start = time.perf_counter()
if spec["engine"] == "llamacpp":
    generator.llm()
    gguf = str(generator.llm().model_path)
else:
    runtime.llm
    gguf = None
load = time.perf_counter() - start
tokenizer = runtime.tokenizer
rng = random.Random(0)
# text pieces only: ids past the sentencepiece vocabulary are media tokens
text_ids = range(10, tokenizer.sp_size)
settings = GenerationSettings(num_beams=1, do_sample=False, max_new_tokens=spec["new"])
rows = []
warm = Job([[tokenizer.token_to_id("<|startoftext|>")] * 4], settings, stop_id=-7, pad_id=-7)
generator.generate(warm)  # first-call costs (thread pools, kernels' first use) out of the figures
for length in spec["prompts"]:
    prompt = [tokenizer.token_to_id("<|startoftext|>")] + [rng.choice(text_ids) for _ in range(length - 1)]
    best = None
    for _ in range(2):  # the faster of two: a shared machine only ever slows a run down
        stamps = []
        job = Job([prompt], settings, stop_id=-7, pad_id=-7,
                  on_tokens=lambda n, ids: stamps.append(time.perf_counter()))
        if gguf is not None:
            generator.llm().reset()  # else llama-cpp-python reuses the KV cache of the same prompt's first run
        began = time.perf_counter()
        generator.generate(job)
        first = stamps[0] - began
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        if best is None or first < best["first_s"]:
            best = {"prompt": length, "first_s": first, "prefill": length / first, "decode": decode,
                    "new": len(stamps)}
    rows.append(best)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"load_s": load, "peak": hwm, "rows": rows, "gguf": gguf, "threads": torch.get_num_threads()}))
"""


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def child(spec: dict, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{spec}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_bench(gguf: str, prompts: list[int], new: int, threads: int) -> list[dict] | None:
    binary = shutil.which("llama-bench")
    if binary is None:
        return None
    done = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", ",".join(map(str, prompts)), "-n", str(new),
                           "-o", "json"], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"llama-bench failed: {done.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", default="16,256,512")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    prompts = [int(n) for n in args.prompts.split(",")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("MIO_MODEL", None)
    env.pop("MIO_GGUF", None)
    # mio's CPU kernel is built once per machine, not on each first load: built here, outside the clocks, and
    # every row's fresh $MIO_CACHE pointed at it
    probe = subprocess.run([sys.executable, "-c", "import json; from miocli.model import cpu_kernel as k; "
                            "print(json.dumps(['VNNI' if k.vnni() else 'portable' if k.available() else k.why_not(), "
                            "str(k.library_path(k._compiler()).parent) if k.available() else None]))"],
                           capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    kernel, kernel_folder = json.loads(probe)
    if kernel_folder is not None:
        env["MIO_KERNEL_CACHE"] = kernel_folder
    print(f"\n### {args.model} on the CPU ({os.cpu_count()} cores), prompts of {args.prompts} tokens, "
          f"{args.new} new tokens, greedy; load average {load_average()} at the start\n")
    print("| row | prefill tok/s (" + " / ".join(map(str, prompts)) + ") | decode tok/s (after "
          + " / ".join(map(str, prompts)) + ") | first token (" + " / ".join(map(str, prompts))
          + ") | LLM load, imports excluded: first / cached | peak RSS: first / cached |\n|---|---|---|---|---|---|")
    q4_gguf, threads = None, 1
    with tempfile.TemporaryDirectory(prefix="mio-cpu-") as tmp:
        for name in args.rows.split(","):
            engine, dtype, quantize = ROWS[name]
            spec = {"model": args.model, "engine": engine, "dtype": dtype, "quantize": quantize, "new": args.new,
                    "prompts": prompts}
            fresh = {**env, "MIO_CACHE": str(Path(tmp) / name)}
            first = child(spec, fresh)
            cached = child(spec, fresh)
            rows = cached["rows"]
            label = {"bf16": "mio bf16", "4bit": f"mio --quantize 4bit (int4 kernel: {kernel})",
                     "8bit": "mio --quantize 8bit",
                     "llamacpp": "mio --engine llamacpp (Q4_0)"}[name]
            print(f"| {label} | " + " / ".join(f"{r['prefill']:.0f}" for r in rows) + " | "
                  + " / ".join(f"{r['decode']:.1f}" for r in rows) + " | "
                  + " / ".join(f"{r['first_s'] * 1000:.0f} ms" for r in rows)
                  + f" | {first['load_s']:.2f} s / {cached['load_s']:.2f} s"
                  + f" | {first['peak'] / 2**30:.2f} / {cached['peak'] / 2**30:.2f} GiB |")
            if name == "llamacpp":
                q4_gguf = cached["gguf"]
                threads = int(os.environ.get("MIO_LLAMACPP_THREADS") or len(os.sched_getaffinity(0)))
        if q4_gguf is not None:  # llama-bench reads the file before the temporary cache goes
            bench = llama_bench(q4_gguf, prompts, args.new, threads)
            if bench is None:
                print("| llama-bench | not on the PATH (docs/engines.md: build it) | | | | |")
            else:
                speeds = {(r["n_prompt"], r["n_gen"]): r["avg_ts"] for r in bench}
                print(f"| llama-bench (same file, -t {threads}) | "
                      + " / ".join(f"{speeds.get((p, 0), 0):.0f}" for p in prompts)
                      + f" | {speeds.get((0, args.new), 0):.1f} (after 0) | | | |")
    print(f"\nload average {load_average()} at the end")


if __name__ == "__main__":
    main()
