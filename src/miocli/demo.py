"""`mio demo`: the whole pipeline on a tiny random checkpoint, to prove an install works."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from miocli.outputs import atomic_write_text


def _fresh_folder(requested: Path | None) -> Path:
    if requested is not None:
        return requested
    candidate = Path("mio-demo")
    number = 2
    while candidate.exists():
        candidate = Path(f"mio-demo-{number}")
        number += 1
    return candidate


def _demo_video(folder: Path) -> Path:
    """Three one-second solid-colour scenes with a little noise: two cuts to find."""
    import cv2
    import numpy as np

    path = folder / "inputs" / "scenes.mp4"
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (128, 96))
    try:
        for colour in [(120, 20, 20), (30, 230, 230), (20, 20, 140)]:
            for _ in range(10):
                frame = np.full((96, 128, 3), colour, np.int16) + rng.normal(0, 3, (96, 128, 3))
                writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    finally:
        writer.release()
    return path


def _demo_media(folder: Path) -> tuple[Path, Path]:
    """A synthetic picture and a two-tone recording to feed the media tasks."""
    import numpy as np
    import soundfile
    from PIL import Image

    grid = np.indices((96, 128)).sum(axis=0) % 32 < 16
    picture = np.stack([grid * 220, np.linspace(0, 255, 128)[None, :].repeat(96, 0), (~grid) * 180], axis=-1)
    image_path = folder / "inputs" / "pattern.png"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture.astype("uint8")).save(image_path)
    t = np.arange(16000 * 2) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 440 * t) * (t > 1)
    audio_path = folder / "inputs" / "tones.wav"
    soundfile.write(audio_path, wave.astype("float32"), 16000)
    return image_path, audio_path


def run_demo(output_dir: Path | None, *, verbose: bool = False) -> int:
    from miocli.api import GenerationOptions, Mio
    from miocli.batch import BatchSettings, Job, audio_job, image_job, run_jobs
    from miocli.composite import run_cot_visual, run_interleave
    from miocli.mediatokens import PixelOptions
    from miocli.outputs import OutputDir
    from miocli.tasks import TASKS
    from miocli.tiny import ensure_tiny_checkpoint
    from miocli.video_tasks import FrameOptions, run_video_gen, video_job, write_keyframes

    def say(message: str) -> None:
        print(f"mio demo: {message}", file=sys.stderr)

    say("the model is a tiny RANDOM checkpoint: every output below is noise; it shows the install works")
    start = time.perf_counter()
    model_dir = ensure_tiny_checkpoint("instruct")
    say(f"tiny checkpoint ready at {model_dir} ({time.perf_counter() - start:.1f} s)")
    out = OutputDir(_fresh_folder(output_dir))
    image_path, audio_path = _demo_media(out.path)
    options = GenerationOptions(max_new_tokens=24, seed=0, beams=1)
    speech_options = GenerationOptions(max_new_tokens=60, seed=0, beams=1)
    image_options = GenerationOptions(max_new_tokens=40, seed=0, beams=1)

    instruct = Mio(str(model_dir), device="cpu", verbose=verbose)
    reply = instruct.chat("What is the capital of France?", options=options)
    results: list[tuple[str, str]] = [("chat", reply.text)]
    base = Mio(str(model_dir), variant="base", device="cpu", verbose=verbose)
    (generated,) = base.generate("Question: what is in the picture? Answer:", options)
    results.append(("generate", generated.text))
    for task, text in results:
        path = out.target(f"{task}.txt")
        atomic_write_text(path, text + "\n")
        out.add_record({"task": task, "text": text, "files": [str(path.name)]})

    settings = BatchSettings(out=out, as_json=False, pixel=PixelOptions(steps=2, size=64, seed=0))
    runtime = instruct.runtime
    runs = [
        ("caption", [image_job(image_path, {}, runtime)], options),
        ("ask-image", [image_job(image_path, {"question": "What colour is it?"}, runtime)],
         options),
        ("imagine", [Job(name="a red kite", stem="kite", fields={"caption": "a red kite"})], image_options),
        ("edit", [image_job(image_path, {"instruction": "make it blue"}, runtime)], image_options),
        ("asr", [audio_job(audio_path, {}, runtime)], options),
        ("ask-audio", [audio_job(audio_path, {"instruction": "What is this sound?"}, runtime)], options),
        ("tts", [Job(name="hello world", stem="hello", fields={"text": "hello world"})], speech_options),
        ("speak", [Job(name="say hi", stem="hi", fields={"question": "Say hi."})], speech_options),
    ]
    video_path = _demo_video(out.path)
    frames = FrameOptions(max_frames=4)
    runs += [
        ("video-caption", [video_job(video_path, {}, runtime, frames)], options),
        ("ask-video", [video_job(video_path, {"question": "What happens?"}, runtime, frames)], options),
    ]
    failures = 0
    for task_name, jobs, task_options in runs:
        say(f"running {task_name}")
        failures += run_jobs(instruct, TASKS[task_name], jobs, settings, task_options)
    say("running keyframes")
    failures += write_keyframes([video_path], OutputDir(out.path / "keyframes"), frames)[1]
    say("running video-gen")
    failures += run_video_gen(instruct, [Job(name="a kite flying", stem="kite", fields={"description": "a kite"})],
                              out, GenerationOptions(max_new_tokens=80, seed=0), settings.pixel, 2.0, False)
    say("running interleave")
    failures += run_interleave(instruct, "a red kite", OutputDir(out.path / "story"),
                               GenerationOptions(max_new_tokens=120, seed=0), settings.pixel, False)
    say("running cot-visual")
    failures += run_cot_visual(instruct, "How many legs has a cat?", image_path, out, image_options,
                               settings.pixel, False, False)
    say(f"outputs (and manifest.jsonl) written to {out.path.resolve()} in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0
