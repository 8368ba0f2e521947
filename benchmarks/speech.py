"""SpeechTokenizer codec speed and memory on CPU at the real published size.

Random weights in the real layout (n_filters 64, dimension 1024, 8 x 1024 codes; about
120 M elements, 480 MB) are written as a reference-style `SpeechTokenizer.pt` (weight-norm
keys, training-only tensors included) in a temporary folder; then:

- real-time factor (compute seconds / audio seconds; lower is faster) of encode (all 8
  layers) and of 4-layer decode for 10 s and 60 s of audio, batch 1;
- load time and peak RSS of parts={"encoder"} against the full codec, each in a fresh process;
- a fresh `python -c` process doing "load from the real-config .pt + encode 4 s", the same
  job the reference takes about 3.8 s for on this machine (1.4 s of it loading), with torch's
  default threads, with OMP_WAIT_POLICY=PASSIVE, and with one thread;
- the whole command `mio tokenize 4s.wav` (fresh process, console script) on a model folder
  holding the real-config SpeechTokenizer: median wall time of --repeat runs, against the
  target 0.77 x 3.8 s;
- what `mio asr` loads, as a whole command: the runtime's load records (component, parts,
  parameters) and the process's peak RSS, on the tiny checkpoint and on the tiny checkpoint
  with the real-config SpeechTokenizer; it must load the speech encoder only (no decoder),
  no image codec and no diffusion.

On a small machine shared with other busy processes, OpenMP's default busy-waiting makes the
LSTM (hundreds of tiny sequential steps, each ending in a thread barrier) several times
slower and very erratic; one thread or OMP_WAIT_POLICY=PASSIVE is then stable.

The file was just written, so it is in the page cache (warm-cache numbers, like a second run).
Run: python benchmarks/speech.py [--sections codec,tokenize,asr] [--repeat N]
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
REFERENCE_TOKENIZE_S = 3.8  # the reference's fresh load + encode of 4 s on this machine
TARGET_RATIO = 0.77

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


# Runs `mio` in this interpreter and, at exit, reports what its runtime loaded (its load records)
# and the peak RSS of the whole command (VmHWM of this process: the command and nothing else).
MIO_CHILD = """
import atexit, json, sys
from miocli.model.runtime import Runtime  # light: no torch; only to keep the command's runtimes for the report
runtimes = []
post_init = Runtime.__post_init__
def keep(self):
    post_init(self)
    runtimes.append(self)
Runtime.__post_init__ = keep
def report():
    loads = [vars(r) for runtime in runtimes for r in runtime.loads]
    status = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")}
    heavy = ("transformers", "diffusers", "cv2", "miocli.codecs.seed", "miocli.codecs.seed.unclip")
    with open(sys.argv[1], "w") as f:
        json.dump({"loads": loads, "peak_rss_mb": status["VmHWM"] / 1024,
                   "modules": [m for m in heavy if m in sys.modules]}, f)
atexit.register(report)
from miocli.cli.app import main
main(sys.argv[2:])
"""


def mio_command() -> list[str]:
    """The console script pip installed next to this interpreter (what a user runs), else -m."""
    script = Path(sys.executable).parent / "mio"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "miocli"]


def tokenize_command(folder: Path, repeat: int) -> None:
    """Whole `mio tokenize` of 4 s at the real config, fresh process each time."""
    model = folder.parent
    wav = model.parent / "speech-4s.wav"
    samples = (0.1 * np.random.default_rng(0).standard_normal(4 * RATE)).astype(np.float32)
    import soundfile

    soundfile.write(wav, samples, RATE, subtype="FLOAT")
    program = mio_command()
    command = [*program, "tokenize", str(wav), "--model", str(model)]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(command, env=env, capture_output=True, check=True)  # untimed warm-up (page cache)
    walls, loads = [], []
    for _ in range(repeat):
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True, check=True)
        walls.append(time.perf_counter() - start)
    median = statistics.median(walls)
    target = TARGET_RATIO * REFERENCE_TOKENIZE_S
    print(f"\nwhole command `{' '.join(Path(c).name for c in program)} tokenize 4s.wav` (real-config codec), "
          f"{repeat} fresh runs:")
    print(f"  wall median {median:.2f} s (min {min(walls):.2f}, max {max(walls):.2f}; runs "
          f"{', '.join(f'{w:.2f}' for w in walls)}), load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"  ratio to the reference's {REFERENCE_TOKENIZE_S} s: {median / REFERENCE_TOKENIZE_S:.2f} "
          f"(target <= {TARGET_RATIO}, i.e. {target:.2f} s): {'met' if median <= target else 'NOT met'}")


def asr_report(model: Path, wav: Path, label: str) -> None:
    """Run `mio asr` as a whole command and print what it loaded and its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", MIO_CHILD, str(report_path), "asr", str(wav), "--model", str(model),
             "--max-new-tokens", "8", "--beams", "1", "--device", "cpu"],
            env=env, capture_output=True, text=True, check=True,
        )
        wall = time.perf_counter() - start
        report = json.loads(report_path.read_text())
    from miocli.codecs.speech.checkpoint import build_meta

    # What the speech codec would hold with both parts (the meta build allocates nothing).
    full = build_meta(SpeechConfig.from_file(model / "SpeechTokenizer" / "config.json"))
    full_elements = sum(t.numel() for t in full.state_dict().values())
    print(f"\n`mio asr` of 4 s, {label}: wall {wall:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MiB "
          f"(speech codec with encoder and decoder: {full_elements:,} elements)")
    print(f"  {'component':<10} {'parts':<10} {'parameters':>12} {'load s':>8} {'+RSS MiB':>9}")
    for load in report["loads"]:
        parts = load["detail"] if load["component"] in ("speech", "seed") else ""
        print(f"  {load['component']:<10} {parts:<10} {load['parameters']:>12,} {load['seconds']:>8.2f} "
              f"{load['rss_delta_bytes'] / 2**20:>9.0f}")
    loaded = {load["component"] for load in report["loads"]}
    speech_parts = {load["detail"] for load in report["loads"] if load["component"] == "speech"}
    absent = [name for name in ("seed", "unclip") if name not in loaded]
    print(f"  not loaded: {', '.join(absent) or 'none'} (seed = image codec, unclip = diffusion); "
          f"speech parts: {', '.join(sorted(speech_parts))}; heavy modules imported: "
          f"{', '.join(report['modules']) or 'none'}")
    ok = speech_parts == {"encoder"} and not {"seed", "unclip"} & loaded and "diffusers" not in report["modules"]
    print(f"  encoder only, no image codec, no diffusion: {'yes' if ok else 'NO'}")


def asr_memory(real_speech: Path | None) -> None:
    from miocli.model.tiny import ensure_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tiny = ensure_tiny_checkpoint("instruct", cache_dir=Path(tmp) / "cache")
        wav = Path(tmp) / "speech-4s.wav"
        t = np.arange(4 * RATE) / RATE
        import soundfile

        soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE)
        asr_report(tiny, wav, "tiny checkpoint")
        if real_speech is None:
            return
        # The tiny checkpoint with the real-config SpeechTokenizer in place of the tiny one.
        mixed = Path(tmp) / "tiny-real-speech"
        mixed.mkdir()
        for entry in tiny.iterdir():
            (mixed / entry.name).symlink_to(real_speech if entry.name == "SpeechTokenizer" else entry)
        asr_report(mixed, wav, "tiny LLM + real-config SpeechTokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="codec,tokenize,asr",
                        help="comma-separated: codec (RTF, load, python -c), tokenize (whole command), asr (loads)")
    parser.add_argument("--repeat", type=int, default=7, help="fresh `mio tokenize` runs to take the median of")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model" / "SpeechTokenizer"
        start = time.perf_counter()
        write_real_checkpoint(folder)
        size_mb = (folder / "SpeechTokenizer.pt").stat().st_size / 2**20
        print(f"wrote real-config checkpoint ({size_mb:.0f} MiB) in {time.perf_counter() - start:.1f} s")
        if "codec" in sections:
            codec_figures(folder)
        if "tokenize" in sections:
            tokenize_command(folder, args.repeat)
        if "asr" in sections:
            asr_memory(folder)


def codec_figures(folder: Path) -> None:
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
    print(f"  reference on this machine: about {REFERENCE_TOKENIZE_S} s, 1.4 s of it loading")


if __name__ == "__main__":
    main()
