"""A newcomer's first commands on the tiny checkpoint, with their defaults: how long each takes.

Issue 26's bar: `mio imagine` with its defaults takes at most 3x `mio caption`'s time, and a picture
is not a silent minute. Each command runs in a fresh process (what a user's shell does), `--repeat`
times after an untimed warm-up; the median wall time is printed, and each one's ratio to caption.
`--size 768` shows what imagine cost when every checkpoint was drawn at the real model's side.

Run: python benchmarks/first_hour.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mio_command() -> list[str]:
    script = shutil.which("mio")
    return [script] if script else [sys.executable, "-m", "miocli"]


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([*mio_command(), *args], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mio {' '.join(args)} failed: {done.stderr.strip()[-400:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    import numpy as np
    import soundfile
    from PIL import Image

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "p.png")
        t = np.arange(24000) / 16000
        soundfile.write(folder / "talk.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
        counter = iter(range(10**6))
        commands = {
            "mio --help": ["--help"],
            "caption p.png": ["caption", "p.png", "--model", "tiny"],
            "imagine (defaults)": ["imagine", "a red kite", "--model", "tiny", "-o", "out-{n}"],
            "imagine --size 768": ["imagine", "a red kite", "--model", "tiny", "--size", "768", "-o", "out-{n}"],
            "asr talk.wav --format srt": ["asr", "talk.wav", "--model", "tiny", "--format", "srt"],
            "echo hi | mio chat": None,
        }
        rows = []
        for label, args in commands.items():
            times = []
            for run in range(repeat + 1):
                if args is None:
                    start = time.perf_counter()
                    subprocess.run([*mio_command(), "chat", "--model", "tiny"], input="hi\n", cwd=folder,
                                   capture_output=True, text=True, check=True)
                    elapsed = time.perf_counter() - start
                else:
                    elapsed = timed([a.format(n=next(counter)) for a in args], folder)
                if run:  # the first run warms the file cache
                    times.append(elapsed)
            rows.append((label, statistics.median(times)))
    caption = dict(rows)["caption p.png"]
    print(f"{'command (tiny checkpoint)':32} {'median s':>9} {'x caption':>10}")
    for label, seconds in rows:
        print(f"{label:32} {seconds:9.2f} {seconds / caption:10.2f}")


if __name__ == "__main__":
    main()
