"""Real size on a GPU: caption, asr, tts and imagine at 4-bit, 8-bit and bf16, and the reference's way.

    python benchmarks/gpu.py [--model DIR] [--out DIR]      # on a CUDA machine (benchmarks/gpu.sh wraps it)
    python benchmarks/gpu.py --dry-run                      # the same steps on the tiny checkpoint, CPU

Builds the real-size random checkpoint (`python -m miocli.model.realsize`, about 19 GB; skipped when DIR already
holds one), then runs one fresh process per choice (4bit, 8bit, bf16, reference). Each runs the four tasks as
one-shot commands would (every component released between tasks, so each task's load and peak are its own),
recording per task: peak VRAM (torch.cuda.max_memory_reserved: what the allocator held), the load time of each
component, LLM tokens/s, whole task time, and for tts the real-time factor (compute / audio seconds).
"reference" is the reference's way: fp16, every component (LLM, SEED whole, SpeechTokenizer whole, unCLIP)
loaded up front and kept. Figures go to stdout as a markdown table and to OUT/gpu.json. Sized to finish in
under 8 minutes on one H100/H200-class GPU: short answers (--max-new-tokens), 20 diffusion steps at 768 px.
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

ROOT = Path(__file__).resolve().parent.parent
CHOICES = {
    "4bit": {"quantize": "4bit", "dtype": "auto"},
    "8bit": {"quantize": "8bit", "dtype": "auto"},
    "bf16": {"quantize": "none", "dtype": "bfloat16"},
    # the reference's way: fp16, every component loaded up front and kept
    "reference": {"quantize": "none", "dtype": "float16", "all": True},
}
TASKS = ("caption", "asr", "tts", "imagine")


def make_inputs(folder: Path) -> dict[str, Path | str]:
    import numpy as np
    import soundfile
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    photo = folder / "photo.jpg"
    image = Image.new("RGB", (640, 480), (90, 150, 210))
    draw = ImageDraw.Draw(image)
    draw.rectangle((200, 260, 460, 420), fill=(40, 120, 40))
    draw.ellipse((60, 40, 180, 160), fill=(250, 220, 40))
    image.save(photo, quality=90)
    speech = folder / "speech.wav"
    t = np.arange(4 * 16000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (180 + 40 * np.sin(2 * np.pi * 3 * t)) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * t))
    soundfile.write(speech, wave.astype("float32"), 16000)
    return {"caption": photo, "asr": speech, "tts": "The weather is lovely today, let us go for a walk.",
            "imagine": "a red kite flying over a green hill"}


CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch
from miocli.core.api import Mio
spec = json.loads(sys.argv[1])
cuda = spec["device"].startswith("cuda")
mio = Mio(spec["model"], device=spec["device"], dtype=spec["dtype"], quantize=spec["quantize"])
runtime = mio.runtime
runtime.long_lived = bool(spec.get("all"))
generated = {"seconds": 0.0, "tokens": 0}
run = mio.engine.run
def timed_run(*args, **kwargs):
    t = time.perf_counter()
    out = run(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    generated["seconds"] += time.perf_counter() - t
    generated["tokens"] += sum(len(g.token_ids) for g in out)
    return out
mio.engine.run = timed_run
def peak():
    return torch.cuda.max_memory_reserved() if cuda else 0
rows = []
if spec.get("all"):
    t = time.perf_counter()
    both = frozenset({"encoder", "decoder"})
    _ = runtime.llm; runtime.seed_codec(both); runtime.speech_codec(both); _ = runtime.unclip
    rows.append({"task": "load all", "seconds": time.perf_counter() - t, "peak": peak(),
                 "loads": {r.component: r.seconds for r in runtime.loads}})
for task in spec["tasks"]:
    if not spec.get("all"):
        runtime.unload()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    generated.update(seconds=0.0, tokens=0)
    before = {id(r) for r in runtime.loads}
    t = time.perf_counter()
    settings = dict(spec["settings"].get(task, {}))
    [result] = list(mio.stream(task, [spec["inputs"][task]], seed=0, **settings))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if not result.ok:
        raise SystemExit(f"{task}: {result.error}")
    audio = sum(len(a.samples) / a.rate for a in result.audio)
    rows.append({"task": task, "seconds": seconds, "peak": peak(), "tokens": generated["tokens"],
                 "generate_s": generated["seconds"], "audio_s": audio,
                 "loads": {r.component: r.seconds for r in runtime.loads if id(r) not in before},
                 "text": result.text[:60]})
print(json.dumps({"rows": rows, "process_s": time.perf_counter() - start}))
"""


def run_choice(name: str, spec: dict, env: dict[str, str], timeout: float) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"name": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return {"name": name, "wall_s": wall, **data}


def table(results: list[dict], device: str) -> str:
    lines = [f"device: {device}", "", "| choice | task | peak VRAM | loads (s) | LLM tokens/s | task time | note |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['name']} | — | — | — | — | — | failed: {result['error']} |")
            continue
        for row in result["rows"]:
            loads = ", ".join(f"{k} {v:.1f}" for k, v in row.get("loads", {}).items()) or "—"
            rate = f"{row['tokens'] / row['generate_s']:.1f}" if row.get("generate_s") else "—"
            note = f"RTF {row['generate_s'] / row['audio_s']:.2f} ({row['audio_s']:.1f} s audio)" \
                if row.get("audio_s") else ""
            lines.append(f"| {result['name']} | {row['task']} | {row['peak'] / 2**30:.1f} GiB | {loads} | {rate} | "
                         f"{row['seconds']:.1f} s | {note} |")
        lines.append(f"| {result['name']} | whole process | | | | {result['process_s']:.1f} s | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="real-size checkpoint (built here when absent)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where gpu.json goes")
    parser.add_argument("--dry-run", action="store_true", help="tiny checkpoint on the CPU: checks the script")
    parser.add_argument("--choices", default=",".join(CHOICES), help="comma-separated subset of the choices")
    args = parser.parse_args()
    began = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("MIO_MODEL", None)
    with tempfile.TemporaryDirectory(prefix="mio-gpu-") as tmp:
        if args.dry_run:
            sys.path.insert(0, str(ROOT / "src"))
            from miocli.model.tiny import ensure_tiny_checkpoint

            env["MIO_CACHE"] = str(Path(tmp) / "cache")
            model = ensure_tiny_checkpoint(cache_dir=Path(tmp) / "cache")
            device = "cpu"
            # the tiny model writes noise: bound every answer, small pictures
            settings = {"caption": {"max_new_tokens": 8, "beams": 1}, "asr": {"max_new_tokens": 8, "beams": 1},
                        "tts": {"max_new_tokens": 40}, "imagine": {"max_new_tokens": 40, "steps": 2, "size": 64}}
        else:
            model = args.model or Path(tmp) / "mio7b"
            if not (model / "mio_realsize.json").is_file() and not (model / "config.json").is_file():
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "miocli.model.realsize", str(model)], env=env, check=True)
                print(f"built the real-size checkpoint in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            device = "cuda"
            settings = {"caption": {"max_new_tokens": 32}, "asr": {"max_new_tokens": 32},
                        "tts": {"max_new_tokens": 400}, "imagine": {"steps": 20, "size": 768}}
        inputs = {k: str(v) for k, v in make_inputs(Path(tmp) / "inputs").items()}
        results = []
        for name in [c.strip() for c in args.choices.split(",") if c.strip()]:
            spec = {"model": str(model), "device": device, "tasks": list(TASKS), "inputs": inputs,
                    "settings": settings, **CHOICES[name]}
            result = run_choice(name, spec, env, timeout=300)
            results.append(result)
            outcome = result.get("error") or f"{result['wall_s']:.0f} s"
            print(f"{name}: {outcome}", file=sys.stderr, flush=True)
    label = "CPU (dry run, tiny checkpoint)" if args.dry_run else _gpu_name()
    text = table(results, label)
    print(text)
    print(f"\nwhole check: {time.perf_counter() - began:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"device": label, "results": results}, indent=1))
    if any("error" in r for r in results):
        sys.exit(1)


def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "CUDA"
    except OSError:
        return "CUDA"


if __name__ == "__main__":
    main()
