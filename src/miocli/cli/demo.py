"""`mio demo`: the whole pipeline on a tiny random checkpoint, to prove an install works.

stdout says what was written, one `TASK: PATH` line per file; notes go to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from miocli.output.files import atomic_write_text

# Every run writes here (its files replaced): a second demo does not leave mio-demo-2 beside the first.
DEFAULT_FOLDER = Path("mio-demo")


def _demo_video(folder: Path) -> Path:
    """Three two-second solid-colour scenes with a little noise: two cuts to find."""
    import cv2
    import numpy as np

    path = folder / "inputs" / "scenes.mp4"
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (128, 96))
    try:
        for colour in [(120, 20, 20), (30, 230, 230), (20, 20, 140)]:
            for _ in range(20):  # two seconds: longer than the 15-frame minimum scene
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
    from miocli.core.api import GenerationOptions, Mio
    from miocli.core.inputs import Item, Media
    from miocli.core.tasks import AUDIO, IMAGE, VIDEO
    from miocli.media.video import FrameOptions
    from miocli.model.tiny import ensure_tiny_checkpoint
    from miocli.output.folder import OutputDir
    from miocli.output.keyframes import write_keyframes
    from miocli.output.writer import COT, SPEECH, STORY, TEXT, ResultWriter, Target, run_and_write
    from miocli.output.writer import IMAGE as IMAGE_OUT
    from miocli.output.writer import VIDEO as VIDEO_OUT

    def say(message: str) -> None:
        print(f"mio demo: {message}", file=sys.stderr)

    say("the model is a tiny RANDOM checkpoint: every output below is noise; it shows the install works")
    start = time.perf_counter()
    model_dir = ensure_tiny_checkpoint("instruct")
    say(f"tiny checkpoint ready at {model_dir} ({time.perf_counter() - start:.1f} s)")
    out = OutputDir(output_dir or DEFAULT_FOLDER, overwrite=True)
    image_path, audio_path = _demo_media(out.path)
    video_path = _demo_video(out.path)
    options = GenerationOptions(max_new_tokens=24, seed=0, beams=1)
    speech_options = GenerationOptions(max_new_tokens=60, seed=0, beams=1)
    image_options = GenerationOptions(max_new_tokens=40, seed=0, beams=1)
    pixels = {"steps": 2, "size": 64}

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
        print(f"{task}: {path}", flush=True)

    def media(kind: str, path: Path, **fields: str) -> Target:
        return Target(Item(str(path), fields, [Media(kind, str(path), path=path)]), path.stem)

    def text(field: str, value: str, stem: str) -> Target:
        return Target(Item(value, {field: value}), stem)

    question = {"question": "What is in it?", "instruction": "What is in it?"}
    # (API task, file/record name, what it writes, input, options)
    runs = [
        ("caption", "caption", TEXT, media(IMAGE, image_path), options),
        ("ask", "ask-image", TEXT, media(IMAGE, image_path, **question), options),
        ("imagine", "imagine", IMAGE_OUT, text("caption", "a red kite", "kite"), image_options),
        ("edit", "edit", IMAGE_OUT, media(IMAGE, image_path, instruction="make it blue"), image_options),
        ("asr", "asr", TEXT, media(AUDIO, audio_path), options),
        ("ask", "ask-audio", TEXT, media(AUDIO, audio_path, **question), options),
        ("tts", "tts", SPEECH, text("text", "hello world", "hello"), speech_options),
        ("speak", "speak", SPEECH, text("question", "Say hi.", "hi"), speech_options),
        ("video_caption", "video-caption", TEXT, media(VIDEO, video_path), options),
        ("ask", "ask-video", TEXT, media(VIDEO, video_path, **question), options),
        ("video_gen", "video-gen", VIDEO_OUT, text("description", "a kite flying", "kite"),
         GenerationOptions(max_new_tokens=80, seed=0)),
        ("cot_visual", "cot-visual", COT, media(IMAGE, image_path, question="How many legs has a cat?"),
         image_options),
    ]
    failures = 0
    for api_task, name, kind, target, task_options in runs:
        say(f"running {name}")
        writer = ResultWriter(name, kind, out, label=name)
        failures += run_and_write(instruct, api_task, [target], writer, options=task_options, max_frames=4, **pixels)
    say("running keyframes")
    frames, failed = write_keyframes([video_path], OutputDir(out.path / "keyframes", overwrite=True),
                                     FrameOptions(max_frames=4))
    failures += failed
    for entry in frames:
        print(f"keyframes: {out.path / 'keyframes' / entry['file']}", flush=True)
    say("running interleave")
    story = ResultWriter("interleave", STORY, OutputDir(out.path / "story", overwrite=True), label="interleave")
    failures += run_and_write(instruct, "interleave", [text("topic", "a red kite", "story")], story,
                              options=GenerationOptions(max_new_tokens=120, seed=0), **pixels)
    say(f"outputs (and manifest.jsonl) written to {out.path.resolve()} in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0
