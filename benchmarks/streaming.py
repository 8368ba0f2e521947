"""Streamed `mio caption DIR -o OUT`: time to the first written result, peak RSS by folder size, throughput.

Builds the tiny checkpoint (miocli.model.tiny) once in a temporary MIO_CACHE and writes small synthetic PNGs
(64x48, numpy noise blocks over a gradient, different per image) once to a temporary folder; each measured
folder is made of hard links to them. Every run is a separate process of the real entry point with
`-o OUT --device cpu --max-new-tokens 8 --beams 1 --seed 0` and its own empty OUT; its wall time and its own
peak RSS (ru_maxrss from os.wait4) are recorded. OMP_NUM_THREADS is left as it is. Figures:

1. Time to the first written result: `--first` images at `--batch-size B`, OUT polled every 20 ms for the
   first `*.caption.txt`; compared with the load time (the wall time of one image at batch size 1) plus two
   batches, one batch being (total - load) / number of batches.
2. Peak RSS for each of `--sizes` images: wall, images/s, peak RSS and its ratio to the smallest size.
3. Throughput of the streamed code (installed) vs the all-at-once code at `--baseline-ref` (`git archive`
   of its src/ into a temporary folder, run with PYTHONPATH), both as `python -m miocli`, `--throughput`
   images, the same batch size, alternated `--repeat` times: median wall, images/s, ratio, same captions.

Run: python benchmarks/streaming.py [--sizes 100,1000,5000] [--batch-size 8] [--first 200] [--throughput 200]
                                   [--baseline-ref REF] [--repeat 1]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from captioning import build_tiny, child_env

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.02
IMAGE_SIZE = (64, 48)
OPTIONS = ["--device", "cpu", "--max-new-tokens", "8", "--beams", "1", "--seed", "0"]


@dataclass
class Run:
    wall_s: float
    first_s: float | None  # first *.caption.txt seen in OUT (only when polled)
    max_rss_kib: int  # ru_maxrss of this child alone (Linux: KiB)
    written: int  # *.caption.txt files in OUT at the end
    manifest_lines: int


def launcher() -> list[str]:
    """The `mio` console script of this interpreter, else the one on PATH, else `python -m miocli`."""
    beside = Path(sys.executable).parent / "mio"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("mio")
    return [found] if found else [sys.executable, "-m", "miocli"]


def machine_facts() -> None:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load}, python {platform.python_version()}, "
          f"torch {version('torch')}, transformers {version('transformers')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def write_pool(folder: Path, count: int) -> list[Path]:
    """`count` different small PNGs: a random two-colour gradient with coarse random noise blocks on top."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    w, h = IMAGE_SIZE
    ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        base = a * (1 - ramp) + b * ramp  # 1 x w x 3
        blocks = rng.integers(-60, 60, size=(h // 8, w // 8, 3)).repeat(8, axis=0).repeat(8, axis=1)
        pixels = np.clip(base + blocks + rng.integers(-12, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.png"
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


def image_folder(pool: list[Path], count: int, folder: Path) -> Path:
    """A folder with the first `count` pool images (hard links; copies where links are refused)."""
    folder.mkdir(parents=True)
    for path in pool[:count]:
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy2(path, folder / path.name)
    return folder


def run(cmd: list[str], env: dict[str, str], out: Path, poll: bool = False) -> Run:
    """Run one caption process to its end; with `poll`, watch `out` for the first written caption."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=out.parent)
        first = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if poll else 0)
            now = time.perf_counter()
            if first is None and poll and out.is_dir() and next(out.glob("*.caption.txt"), None) is not None:
                first = now - start
            if pid:
                break
            time.sleep(POLL_S)
        wall = now - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-3000:]
            raise SystemExit(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    manifest = out / "manifest.jsonl"
    lines = len(manifest.read_text().splitlines()) if manifest.is_file() else 0
    return Run(wall, first, usage.ru_maxrss, len(list(out.glob("*.caption.txt"))), lines)


class Runner:
    """Builds caption commands and gives every run its own OUT under the work folder."""

    def __init__(self, root: Path, model: Path, env: dict[str, str], batch_size: int):
        self.root, self.model, self.env, self.batch_size = root, model, env, batch_size
        self.count = 0

    def caption(self, images: Path, expected: int, *, prog: list[str] | None = None, batch_size: int | None = None,
                env: dict[str, str] | None = None, poll: bool = False) -> tuple[Run, Path]:
        self.count += 1
        out = self.root / "runs" / f"out{self.count:03d}"
        out.parent.mkdir(exist_ok=True)
        cmd = [*(prog or launcher()), "caption", str(images), "-o", str(out), "--model", str(self.model),
               "--batch-size", str(batch_size or self.batch_size), *OPTIONS]
        done = run(cmd, env or self.env, out, poll)
        if done.written != expected or done.manifest_lines != expected:
            raise SystemExit(f"{' '.join(cmd)}: {done.written} captions and {done.manifest_lines} manifest lines "
                             f"for {expected} images")
        return done, out


def first_result(runner: Runner, pool: list[Path], count: int) -> None:
    one = image_folder(pool, 1, runner.root / "one")
    images = image_folder(pool, count, runner.root / f"first{count}")
    runner.caption(one, 1, batch_size=1)  # warm the page cache
    load = runner.caption(one, 1, batch_size=1)[0].wall_s
    print(f"load time (1 image, batch size 1): {load:.2f} s", file=sys.stderr)
    done = runner.caption(images, count, poll=True)[0]
    batches = math.ceil(count / runner.batch_size)
    batch = (done.wall_s - load) / batches
    first = "not seen" if done.first_s is None else f"{done.first_s:.2f} s"
    print(f"\n1. Time to the first written result: {count} images, --batch-size {runner.batch_size} "
          f"({batches} batches)\n")
    print("| first result | total wall | load (1 image) | one batch | load + 2 batches | first result / total |")
    print("|---|---|---|---|---|---|")
    share = "—" if done.first_s is None else f"{done.first_s / done.wall_s:.0%}"
    print(f"| {first} | {done.wall_s:.2f} s | {load:.2f} s | {batch:.3f} s | {load + 2 * batch:.2f} s | {share} |")


def peak_rss(runner: Runner, pool: list[Path], sizes: list[int]) -> None:
    rows = []
    for size in sizes:
        done = runner.caption(image_folder(pool, size, runner.root / f"rss{size}"), size)[0]
        print(f"{size} images: {done.wall_s:.1f} s, {done.max_rss_kib / 1024:.0f} MiB", file=sys.stderr)
        rows.append((size, done))
    print(f"\n2. Peak RSS by folder size (--batch-size {runner.batch_size})\n")
    print("| images | wall | images/s | peak RSS | ratio to smallest |")
    print("|---|---|---|---|---|")
    smallest = rows[0][1].max_rss_kib
    for size, done in rows:
        print(f"| {size:,} | {done.wall_s:.1f} s | {size / done.wall_s:.1f} | {done.max_rss_kib / 1024:.0f} MiB "
              f"| {done.max_rss_kib / smallest:.2f}× |")


def baseline_source(ref: str, dest: Path) -> Path | None:
    """src/ of `ref` extracted under dest (git archive), or None where the ref or its src/ is missing."""
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        return None
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", "--format=tar", found.stdout.strip(), "src"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    extracted = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, capture_output=True)
    archive.stdout.close()
    if archive.wait() != 0 or extracted.returncode != 0:
        return None
    src = dest / "src"
    return src if (src / "miocli" / "__init__.py").is_file() else None


def captions(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in out.glob("*.caption.txt")}


def throughput(runner: Runner, pool: list[Path], count: int, ref: str, repeat: int) -> None:
    print(f"\n3. Throughput, streamed vs all at once: {count} images, --batch-size {runner.batch_size}, "
          f"both `python -m miocli`, alternated, median of {repeat}\n")
    src = baseline_source(ref, runner.root / "baseline")
    base_env = dict(runner.env)
    if src is not None:
        base_env["PYTHONPATH"] = os.pathsep.join(p for p in [str(src), runner.env.get("PYTHONPATH", "")] if p)
        where = subprocess.run([sys.executable, "-c", "import miocli; print(miocli.__file__)"], env=base_env,
                               cwd=runner.root, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(src)):
            print(f"baseline at {ref} unavailable: PYTHONPATH={src} imports miocli from {where or 'nowhere'}")
            src = None
    else:
        print(f"baseline unavailable: git ref {ref!r} (or its src/miocli) not found in {REPO}")
    images = image_folder(pool, count, runner.root / f"throughput{count}")
    module = [sys.executable, "-m", "miocli"]
    configs = {"streamed (installed)": runner.env}
    if src is not None:
        configs = {f"all at once ({ref})": base_env, **configs}
    walls: dict[str, list[float]] = {name: [] for name in configs}
    texts: dict[str, dict[str, str]] = {}
    for r in range(repeat):
        for name, env in configs.items():
            done, out = runner.caption(images, count, prog=module, env=env)
            walls[name].append(done.wall_s)
            texts.setdefault(name, captions(out))
            print(f"repeat {r + 1}/{repeat}: {name}: {done.wall_s:.1f} s", file=sys.stderr)
    print("| run | median wall | images/s | ratio (images/s) to all at once | same captions |")
    print("|---|---|---|---|---|")
    names = list(configs)
    reference = statistics.median(walls[names[0]])
    for name in names:
        wall = statistics.median(walls[name])
        ratio = f"{reference / wall:.2f}×" if src is not None else "—"
        same = "—" if name == names[0] else ("yes" if texts[name] == texts[names[0]] else "no")
        print(f"| {name} | {wall:.2f} s | {count / wall:.1f} | {ratio} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000", help="folder sizes for the peak RSS table")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--first", type=int, default=200, help="images in the time-to-first-result run")
    parser.add_argument("--throughput", type=int, default=200, help="images in each throughput run")
    parser.add_argument("--baseline-ref", default="1b86e5a", help="git ref of the all-at-once code")
    parser.add_argument("--repeat", type=int, default=1, help="alternated throughput runs of each (median)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    machine_facts()
    print(f"mio: {' '.join(launcher())}; options: --batch-size {args.batch_size} {' '.join(OPTIONS)}; "
          f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} PNGs")
    with tempfile.TemporaryDirectory(prefix="mio-streaming-bench-") as tmp:
        root = Path(tmp)
        model = build_tiny(root / "cache")
        start = time.perf_counter()
        pool = write_pool(root / "pool", max([*sizes, args.first, args.throughput]))
        print(f"{len(pool)} images written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        runner = Runner(root, model, child_env(root / "cache"), args.batch_size)
        first_result(runner, pool, args.first)
        peak_rss(runner, pool, sizes)
        throughput(runner, pool, args.throughput, args.baseline_ref, args.repeat)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
