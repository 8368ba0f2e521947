"""SpeechTokenizer codec speed and memory on CPU at the real published size.

Random weights in the real layout (n_filters 64, dimension 1024, 8 x 1024 codes; about
120 M elements, 480 MB) are written as a reference-style `SpeechTokenizer.pt` (weight-norm
keys, training-only tensors included) in a temporary folder; then:

- real-time factor (compute seconds / audio seconds; lower is faster) of encode (all 8
  layers) and of 4-layer decode for 10 s and 60 s of audio, batch 1;
- load time and peak RSS of parts={"encoder"} against the full codec, each in a fresh process;
- a fresh `python -c` process doing "load from the real-config .pt + encode 4 s", the same
  job the reference takes about 3.8 s for on this machine (1.4 s of it loading), with torch's
  default threads, with OMP_WAIT_POLICY=PASSIVE, and with one thread.

On a small machine shared with other busy processes, OpenMP's default busy-waiting makes the
LSTM (hundreds of tiny sequential steps, each ending in a thread barrier) several times
slower and very erratic; one thread or OMP_WAIT_POLICY=PASSIVE is then stable.

The file was just written, so it is in the page cache (warm-cache numbers, like a second run).
Run: python benchmarks/speech.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import miocli
from miocli.codecs.speech import SpeechCodec, SpeechConfig
from miocli.codecs.speech.checkpoint import checkpoint_layout
from miocli.codecs.speech.config import REAL_CONFIG
from miocli.codecs.speech.tiny import random_weights

RATE = 16000
SRC = str(Path(miocli.__file__).resolve().parent.parent)

# Runs in a fresh interpreter: times import, load and (optionally) encode, and reads peak RSS.
# Peak RSS is read from VmHWM: ru_maxrss would carry over the parent's peak across fork+exec.
CHILD = """
import json, sys, time
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter()
import numpy as np, torch
from miocli.codecs.speech import SpeechCodec
if int(sys.argv[4]):
    torch.set_num_threads(int(sys.argv[4]))
t1 = time.perf_counter()
rss_import = status_mb("VmHWM")
codec = SpeechCodec.load(sys.argv[1], parts=frozenset(sys.argv[2].split(",")))
t2 = time.perf_counter()
seconds = float(sys.argv[3])
encode_s = None
if seconds:
    wav = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * 16000))).astype(np.float32)
    codes = codec.encode(wav)
    encode_s = time.perf_counter() - t2
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": encode_s,
                  "rss_after_import_mb": rss_import, "peak_rss_mb": status_mb("VmHWM"),
                  "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile"),
                  "params": codec.num_parameters()}))
"""


def write_real_checkpoint(folder: Path) -> None:
    config = SpeechConfig.from_dict(REAL_CONFIG)
    state = random_weights(checkpoint_layout(config), torch.Generator().manual_seed(0), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    for i in range(config.n_q):
        embed = 0.1 * torch.randn((config.codebook_size, config.dimension), generator=gen)
        state[f"quantizer.vq.layers.{i}._codebook.embed"] = embed
        state[f"quantizer.vq.layers.{i}._codebook.embed_avg"] = embed.clone()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(REAL_CONFIG, indent=2))
    torch.save(state, folder / "SpeechTokenizer.pt")


def child(
    folder: Path, parts: str, seconds: float, threads: int = 0, extra_env: dict[str, str] | None = None
) -> tuple[dict[str, float], float]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), parts, str(seconds), str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def in_process(folder: Path, thread_counts: list[int]) -> None:
    start = time.perf_counter()
    codec = SpeechCodec.load(folder)
    print(
        f"in-process load (full): {time.perf_counter() - start:.2f} s, "
        f"{codec.num_parameters() / 1e6:.1f} M elements materialised"
    )
    rng = np.random.default_rng(0)
    codec.encode(np.zeros(RATE, np.float32))  # first-call warm-up (allocator, kernels)
    print("\nreal-time factor, batch 1 (lower is faster):")
    default = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for seconds in (10, 60):
            wav = (0.1 * rng.standard_normal(seconds * RATE)).astype(np.float32)
            repeats = 2 if seconds <= 10 else 1
            enc = best_of(repeats, lambda wav=wav: codec.encode(wav))
            codes = codec.encode(wav)[:4]
            dec = best_of(repeats, lambda codes=codes: codec.decode(codes))
            print(
                f"  {threads} thread(s), {seconds:>3} s audio: encode {enc:6.2f} s (RTF {enc / seconds:.3f})   "
                f"decode 4q {dec:6.2f} s (RTF {dec / seconds:.3f})"
            )
    torch.set_num_threads(default)


def main() -> None:
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "SpeechTokenizer"
        start = time.perf_counter()
        write_real_checkpoint(folder)
        size_mb = (folder / "SpeechTokenizer.pt").stat().st_size / 2**20
        print(f"wrote real-config checkpoint ({size_mb:.0f} MiB) in {time.perf_counter() - start:.1f} s")

        # On a small shared machine, torch's default (one thread per core) can be much slower
        # than one thread: the LSTM's per-step barriers stall whenever a core is taken.
        thread_counts = sorted({torch.get_num_threads(), 1}, reverse=True)
        in_process(folder, thread_counts)

        print("\nfresh process, load only (import excluded), peak RSS:")
        for parts in ("encoder", "encoder,decoder", "decoder"):
            stats, _ = child(folder, parts, 0)
            print(
                f"  parts={parts:<16} load {stats['load_s']:.2f} s   peak RSS {stats['peak_rss_mb']:.0f} MiB "
                f"(after import {stats['rss_after_import_mb']:.0f}; at end anon {stats['anon_mb']:.0f}, "
                f"file-backed {stats['file_mb']:.0f})   "
                f"{stats['params'] / 1e6:.1f} M elements"
            )

        print("\nfresh `python -c`: import + load (encoder) + encode 4 s of audio, 3 runs each:")
        # OpenMP's default busy-waiting stalls badly when other processes hold the cores;
        # OMP_WAIT_POLICY=PASSIVE (set before torch is imported) avoids that.
        variants = [(f"{n} thread(s)", n, {}) for n in thread_counts]
        if max(thread_counts) > 1:
            variants.insert(
                1, (f"{max(thread_counts)} thread(s), OMP_WAIT_POLICY=PASSIVE", 0, {"OMP_WAIT_POLICY": "PASSIVE"})
            )
        for label, threads, extra_env in variants:
            for _ in range(3):
                stats, wall = child(folder, "encoder", 4.0, threads, extra_env)
                print(
                    f"  {label}: wall {wall:.2f} s  (import {stats['import_s']:.2f} s, "
                    f"load {stats['load_s']:.2f} s, encode {stats['encode_s']:.2f} s, "
                    f"peak RSS {stats['peak_rss_mb']:.0f} MiB)"
                )
        print("  reference on this machine: about 3.8 s, 1.4 s of it loading")


if __name__ == "__main__":
    main()
