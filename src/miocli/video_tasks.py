"""Video in and out: keyframe jobs for the LLM, `mio keyframes`, and `mio video-gen`'s frames + mp4.

A video reaches the model as its keyframes, one image segment each, in temporal order
(MIO_PROTOCOL §5); the frame choices of `FrameOptions` are the user's `--max-frames`,
`--uniform` and `--threshold`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miocli import mediatokens
from miocli.batch import Job
from miocli.errors import MioError, report
from miocli.media.video import DEFAULT_MAX_FRAMES, Keyframe, extract_keyframes
from miocli.outputs import OutputDir, atomic_write, print_record, relative_to

KEYFRAMES_INDEX = "keyframes.json"


@dataclass(frozen=True)
class FrameOptions:
    max_frames: int = DEFAULT_MAX_FRAMES
    uniform: bool = False
    threshold: float | None = None

    def extract(self, path: Path) -> list[Keyframe]:
        return extract_keyframes(path, max_frames=self.max_frames, uniform=self.uniform, threshold=self.threshold)


def video_job(path: Path, fields: dict[str, str], runtime: Any, frames: FrameOptions) -> Job:
    """A job whose media are the video's keyframes (all SEED-encoded in one batch)."""
    return Job(
        name=str(path), stem=path.stem, fields=fields,
        load_media=lambda: [keyframe.image for keyframe in frames.extract(path)],
        media_strings=lambda images: (mediatokens.image_strings(runtime, images), []),
    )


def write_keyframes(paths: list[Path], out: OutputDir, frames: FrameOptions) -> tuple[list[dict[str, Any]], int]:
    """Extract and write every video's keyframes; returns the index entries and the failure count.

    `keyframes.json` lists the frames of all videos, each video's in temporal order. It is
    written last, so an interrupted run never leaves an index naming frames that are missing.
    """
    index_path = out.target(KEYFRAMES_INDEX)
    entries: list[dict[str, Any]] = []
    failures = 0
    for path in paths:
        try:
            keyframes = frames.extract(path)
            written = []
            for number, keyframe in enumerate(keyframes, start=1):
                target = out.target(f"{path.stem}-{number:03d}.png", source=str(path))
                atomic_write(target, lambda tmp, image=keyframe.image: image.save(tmp, format="PNG"))
                written.append({
                    "file": relative_to(target, out.path),
                    "frame_index": keyframe.frame_index,
                    "time_s": round(keyframe.time_s, 6),
                    "scene": keyframe.scene,
                    "video": str(path),
                })
        except MioError as exc:
            report(exc, str(path))
            failures += 1
            continue
        entries.extend(written)
        out.add_record({"task": "keyframes", "input": str(path), "frames": len(written),
                        "files": [entry["file"] for entry in written]})
    import json

    text = json.dumps(entries, ensure_ascii=False, indent=2) + "\n"
    atomic_write(index_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return entries, failures


def write_video(mio: Any, job: Job, reply: Any, out: OutputDir, pixel: mediatokens.PixelOptions,
                fps: float) -> dict[str, Any]:
    """Decode a video-gen reply's image segments to frames and assemble them into an mp4."""
    from miocli.media.video import assemble_video

    record: dict[str, Any] = {"task": "video-gen", "input": job.name, "text": reply.text,
                              "problems": reply.problems, "files": []}
    if not reply.images:
        record["error"] = "the model produced no frame"
        return record
    # Claim every name first, so an existing file stops the job before any diffusion runs.
    frame_paths = [out.target(f"{job.stem}.video-gen-{n:03d}.png", source=job.name)
                   for n in range(1, len(reply.images) + 1)]
    video_path = out.target(f"{job.stem}.video-gen.mp4", source=job.name)
    images = mediatokens.images_from_ids(mio.runtime, reply.images, pixel)
    for path, image in zip(frame_paths, images):
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        record["files"].append(relative_to(path, out.path))
    assemble_video(images, video_path, fps)
    record["files"].append(relative_to(video_path, out.path))
    record.update(frames=len(images), fps=fps)
    return record


def run_video_gen(mio: Any, jobs: list[Job], out: OutputDir, options: Any, pixel: mediatokens.PixelOptions,
                  fps: float, as_json: bool) -> int:
    """Generate a frame sequence per description, then write its frames and mp4; returns failures."""
    from miocli.pipeline import Prompt, task_prompt_text
    from miocli.tasks import TASKS

    task = TASKS["video-gen"]
    prompts = [Prompt(task_prompt_text(task, mio.variant, job.fields)) for job in jobs]
    failures = 0
    for job, reply in zip(jobs, mio.run(task, prompts, options)):
        for problem in reply.problems:
            print(f"mio: warning: {job.name}: {problem}", file=sys.stderr)
        try:
            record = write_video(mio, job, reply, out, pixel, fps)
        except MioError as exc:
            report(exc, job.name)
            failures += 1
            continue
        if "error" in record:
            print(f"mio: error: {job.name}: {record['error']}", file=sys.stderr)
            failures += 1
        out.add_record(record)
        if as_json:
            print_record(record)
        else:
            video = [f for f in record["files"] if f.endswith(".mp4")]
            print(out.path / video[0] if video else f"{job.name}: no video")
    return failures
