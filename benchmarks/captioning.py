"""Captioning throughput on the tiny checkpoint: one `mio caption DIR` process vs one process per image.

Builds the tiny checkpoint (miocli.model.tiny) in a temporary MIO_CACHE and writes N synthetic images
(PIL: gradients, shapes, noise, text, checkerboards; mostly 256x256, every fourth one another size,
PNG and JPEG) to a temporary folder. Then it times, with the real entry point
(`python -m miocli caption ... --model TINY --device cpu --json`, results on stdout):

- one process captioning the whole folder with `--batch-size B` for each B (default 1, 4, 16);
- N separate `mio caption IMG` processes run one after another, as a shell loop would.

Every configuration uses the caption task preset (5 beams, greedy) with the same `--max-new-tokens`
(default 32, so that the tiny random model's output length is the same everywhere). Each row reports the
median wall time of R repeats (configurations interleaved), images/s, the speed-up relative to the N
processes, the peak RSS of the largest `mio` process, and whether its captions equal the per-image ones.
One untimed caption run first warms the page cache.

Run: python benchmarks/captioning.py [--images N] [--repeat R] [--batch-sizes 1,4,16] [--max-new-tokens T]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MIO = [sys.executable, "-m", "miocli"]
OTHER_SIZES = [(640, 480), (200, 320), (1024, 768), (97, 61), (512, 128), (333, 333)]


@dataclass
class Finished:
    wall_s: float
    max_rss_kib: int  # ru_maxrss of the child itself (Linux: KiB)
    returncode: int
    stdout: str
    stderr: str


def run_measured(cmd: list[str], env: dict[str, str]) -> Finished:
    """Run one process to its end: wall time and its own peak RSS (os.wait4), output captured."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Finished(wall, usage.ru_maxrss, proc.returncode, out.read().decode("utf-8", "replace"),
                        err.read().decode("utf-8", "replace"))


def child_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MIO_MODEL"}
    env.update({"MIO_CACHE": str(cache), "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"})
    return env


def build_tiny(cache: Path) -> Path:
    from miocli.model.tiny import ensure_tiny_checkpoint

    start = time.perf_counter()
    model = ensure_tiny_checkpoint("instruct", cache_dir=cache)
    print(f"tiny checkpoint built in {time.perf_counter() - start:.1f} s: {model}", file=sys.stderr)
    return model


def synthetic_image(index: int):  # -> PIL.Image.Image
    """A deterministic image with varied content; every fourth one is not 256x256."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(index)
    size = OTHER_SIZES[(index // 4) % len(OTHER_SIZES)] if index % 4 == 3 else (256, 256)
    w, h = size
    kind = index % 5
    if kind == 0:  # two-colour gradient
        a, b = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        image = Image.composite(Image.new("RGB", size, a), Image.new("RGB", size, b), image.convert("L"))
    elif kind == 1:  # noise, blurred a little
        image = Image.frombytes("RGB", size, rng.randbytes(w * h * 3)).filter(ImageFilter.GaussianBlur(1))
    else:
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    if kind == 2:  # checkerboard
        step = max(4, min(w, h) // rng.randint(4, 12))
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=(20, 20, 20))
    for _ in range(rng.randint(3, 12)):  # shapes on everything
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randint(5, max(6, w // 2)), y0 + rng.randint(5, max(6, h // 2))]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    if kind == 4:
        draw.text((5, h // 2), f"image {index}", fill=(255, 255, 255))
    return image


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.{'jpg' if i % 3 == 2 else 'png'}"
        image = synthetic_image(i)
        if path.suffix == ".jpg":
            image.save(path, quality=90)
        else:
            image.save(path)
        paths.append(path)
    return paths


def captions(done: Finished, what: str) -> dict[str, str]:
    if done.returncode != 0:
        raise SystemExit(f"{what}: exit {done.returncode}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {Path(r["input"]).name: r["text"] for r in records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="synthetic images to caption (default 32)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of every configuration (median)")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the same for every configuration")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="mio-caption-bench-") as tmp:
        root = Path(tmp)
        env = child_env(root / "cache")
        model = build_tiny(root / "cache")
        images = write_images(root / "images", args.images)
        common = ["--model", str(model), "--device", "cpu", "--json", "--max-new-tokens", str(args.max_new_tokens)]
        configs: dict[str, list[list[str]]] = {
            f"one process, `--batch-size {b}`": [[*MIO, "caption", str(root / "images"), "--batch-size", str(b),
                                                 *common]]
            for b in batch_sizes
        }
        loop = f"{len(images)} processes, one image each"
        configs[loop] = [[*MIO, "caption", str(p), *common] for p in images]

        captions(run_measured(configs[loop][0], env), "warm-up")
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        walls: dict[str, list[float]] = {name: [] for name in configs}
        rss: dict[str, int] = dict.fromkeys(configs, 0)
        texts: dict[str, dict[str, str]] = {name: {} for name in configs}
        for r in range(args.repeat):
            for name, commands in configs.items():
                start = time.perf_counter()
                for cmd in commands:
                    done = run_measured(cmd, env)
                    texts[name].update(captions(done, name))
                    rss[name] = max(rss[name], done.max_rss_kib)
                walls[name].append(time.perf_counter() - start)
                print(f"repeat {r + 1}/{args.repeat}: {name}: {walls[name][-1]:.1f} s", file=sys.stderr)
        load_after = Path("/proc/loadavg").read_text().split()[:3]

    reference = statistics.median(walls[loop])
    print(f"\n{len(images)} synthetic images ({sum(1 for i in range(len(images)) if i % 4 != 3)} at 256x256), "
          f"tiny checkpoint, CPU, caption preset with --max-new-tokens {args.max_new_tokens}; "
          f"median of {args.repeat} run(s); {os.cpu_count()} CPUs; "
          f"load average before {' '.join(load_before)}, after {' '.join(load_after)}\n")
    print("| configuration | wall | images/s | speed-up vs. one process per image | peak RSS per process "
          "| same captions as one process per image |")
    print("|---|---|---|---|---|---|")
    for name in configs:
        wall = statistics.median(walls[name])
        if len(texts[name]) != len(images):
            raise SystemExit(f"{name}: {len(texts[name])} captions for {len(images)} images")
        same = "yes" if texts[name] == texts[loop] else "no"
        print(f"| {name} | {wall:.1f} s | {len(images) / wall:.2f} | {reference / wall:.1f}× "
              f"| {rss[name] / 1024:.0f} MiB | {'—' if name == loop else same} |")


if __name__ == "__main__":
    main()
