"""`mio caption --ray` on a local Ray cluster vs the plain local run (tiny checkpoint, this machine).

Builds the tiny checkpoint (miocli.model.tiny) in a temporary cache and writes N synthetic images (default
200, 96x96 noise and gradients). Starts one Ray head on loopback (`ray start --head --block`,
--num-cpus C, a 300 MB object store, no dashboard), then times, with the real entry point
(`python -m miocli caption DIR --model TINY --device cpu --json -b B --beams 1 --max-new-tokens T`):

- the plain local run (torch on all C cores);
- `--ray-address HEAD --workers 1` and `--workers 2` (each worker an actor with C/workers CPUs,
  OMP_NUM_THREADS set to that by Ray);
- Ray's fixed overhead: the same commands on one image (join the cluster, start the actors, load the
  model in each, hand back one result), against the local run on one image.

Each figure is the median of R repeats (configurations interleaved). Every row reports wall time,
captions/s, the speed-up over the local run, and whether its captions equal the local run's. The
per-caption cost of each configuration once the fixed part is paid is (wall(N) - wall(1)) / (N - 1).
Run it on an idle machine if you can: it shares the cores with everything else.

Run: python benchmarks/distributed.py [--images N] [--repeat R] [--batch-size B] [--max-new-tokens T] [--cpus C]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIO = [sys.executable, "-m", "miocli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    for n in range(count):
        if n % 2:
            pixels = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        else:
            pixels = np.stack([np.tile(ramp, (96, 1)), np.tile(ramp[:, None], (1, 96)),
                               np.full((96, 96), (n * 37) % 256, dtype=np.uint8)], axis=-1)
        Image.fromarray(pixels).save(folder / f"img{n:04d}.png")


def start_head(temp: Path, cpus: int) -> tuple[subprocess.Popen, str]:
    temp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ray_script = Path(sys.executable).with_name("ray")
    command = [str(ray_script) if ray_script.exists() else "ray", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--object-store-memory=300000000",
               "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats", f"--port={port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
    log = temp / "head.log"
    head = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "block forever" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ray start failed:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}"


def run(args: list[str]) -> tuple[float, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "MIO_MODEL"}
    start = time.perf_counter()
    done = subprocess.run([*MIO, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mio {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, [json.loads(line)["text"] for line in done.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=3)
    parsed = parser.parse_args()

    from miocli.model.tiny import ensure_tiny_checkpoint

    # Short: Ray's socket paths must stay under 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="mio-bench-", dir="/tmp"))
    # A loopback cluster: no token (Ray turns token auth on once ~/.ray/auth_token exists); the head and the
    # drivers inherit this.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    head = None
    try:
        model = ensure_tiny_checkpoint("instruct", cache_dir=temp / "cache")
        images, one = temp / "images", temp / "one"
        make_images(images, parsed.images)
        make_images(one, 1)
        head, address = start_head(temp / "ray", parsed.cpus)
        common = ["--model", str(model), "--device", "cpu", "--json", "-b", str(parsed.batch_size), "--beams", "1",
                  "--max-new-tokens", str(parsed.max_new_tokens), "--seed", "0"]
        configs = {"local": [], "ray, 1 worker": ["--ray-address", address, "--workers", "1"],
                   "ray, 2 workers": ["--ray-address", address, "--workers", "2"]}
        run(["caption", str(one), *common])  # warm the page cache and the tiny checkpoint's files
        singles: dict[str, list[float]] = {name: [] for name in configs}
        walls: dict[str, list[float]] = {name: [] for name in configs}
        same = dict.fromkeys(configs, True)
        reference: list[str] | None = None
        for _ in range(parsed.repeat):
            for name, extra in configs.items():
                singles[name].append(run(["caption", str(one), *common, *extra])[0])
                wall, texts = run(["caption", str(images), *common, *extra])
                walls[name].append(wall)
                reference = reference if reference is not None else texts
                same[name] = same[name] and texts == reference
        rows = [(name, statistics.median(singles[name]), statistics.median(walls[name]), same[name])
                for name in configs]
        base = rows[0][2]
        print(f"{parsed.images} captions, tiny checkpoint, batch {parsed.batch_size}, {parsed.max_new_tokens} new "
              f"tokens, greedy; Ray head with {parsed.cpus} CPUs on loopback; machine: {os.cpu_count()} cores; "
              f"median of {parsed.repeat}; load average {os.getloadavg()[0]:.1f} at the end")
        for name in configs:
            print(f"  {name}: 1 image {', '.join(f'{t:.1f}' for t in singles[name])} s; "
                  f"{parsed.images} images {', '.join(f'{t:.1f}' for t in walls[name])} s")
        print(f"{'configuration':<16} {'1 image s':>10} {'N images s':>11} {'captions/s':>11} {'speed-up':>9} "
              f"{'steady s/caption':>17} {'same captions':>14}")
        for name, single, wall, same in rows:
            steady = (wall - single) / max(1, parsed.images - 1)
            print(f"{name:<16} {single:>10.1f} {wall:>11.1f} {parsed.images / wall:>11.2f} {base / wall:>9.2f} "
                  f"{steady:>17.3f} {'yes' if same else 'NO':>14}")
        local_single = rows[0][1]
        for name, single, _, _ in rows[1:]:
            print(f"fixed overhead of {name}: {single - local_single:+.1f} s over the local run's "
                  f"{local_single:.1f} s on one image")
    finally:
        if head is not None:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
