"""Start-up time of the `mio` command, against importing the model libraries it defers.

Each command runs in a fresh process (what a user's shell does), `--repeat` times after one
untimed warm-up run that fills the OS file cache; the median wall time is reported. Targets:
`mio --help` under 0.5 s, and under a quarter of `import torch, transformers` (the cost that
lazy imports keep off every command that does not load a model).

Run: python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HELP_TARGET_S = 0.5
RATIO_TARGET = 0.25
IMPORT_CODE = "import torch, transformers; from transformers import LlamaForCausalLM"


def mio_command() -> list[str]:
    # The installed console script is what users run; `python -m miocli` is the same function.
    script = shutil.which("mio")
    return [script] if script else [sys.executable, "-m", "miocli"]


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def median_time(command: list[str], repeat: int) -> tuple[float, list[float]]:
    wall_time(command)  # warm-up: the first run also pays for reading .pyc files from disk
    times = [wall_time(command) for _ in range(repeat)]
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per command (default 5)")
    args = parser.parse_args()

    mio = mio_command()
    cases = [
        ("mio --help", [*mio, "--help"]),
        ("mio chat --help", [*mio, "chat", "--help"]),
        ("python -c 'import torch, transformers; ...'", [sys.executable, "-c", IMPORT_CODE]),
        ("python -c pass (interpreter alone)", [sys.executable, "-c", "pass"]),
    ]
    results: dict[str, float] = {}
    print(f"median of {args.repeat} fresh processes (after 1 warm-up), {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}")
    print(f"{'command':<46} {'median s':>9}  runs")
    for label, command in cases:
        median, times = median_time(command, args.repeat)
        results[label] = median
        print(f"{label:<46} {median:>9.3f}  {' '.join(f'{t:.3f}' for t in times)}", flush=True)

    heavy = results[cases[2][0]]
    print()
    for label, _ in cases[:2]:
        seconds = results[label]
        ratio = seconds / heavy
        verdict = "ok" if seconds < HELP_TARGET_S and ratio < RATIO_TARGET else "MISSED"
        print(f"{label:<18} {seconds:.3f} s = {ratio:.2f} x the torch+transformers import "
              f"(targets < {HELP_TARGET_S} s and < {RATIO_TARGET}) {verdict}")


if __name__ == "__main__":
    main()
