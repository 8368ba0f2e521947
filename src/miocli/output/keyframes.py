"""`mio keyframes`: the frames MIO sees of a video, written as images with an index (no model).

A video reaches the model as its keyframes, one image segment each, in temporal order
(MIO_PROTOCOL §5); the frame choices of `FrameOptions` are the user's `--max-frames`,
`--uniform` and `--threshold`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miocli.errors import MioError, report
from miocli.media.video import FrameOptions
from miocli.output.files import atomic_write
from miocli.output.folder import OutputDir

KEYFRAMES_INDEX = "keyframes.json"


def write_keyframes(paths: list[Path], out: OutputDir, frames: FrameOptions) -> tuple[list[dict[str, Any]], int]:
    """Extract and write every video's keyframes; returns the index entries and the failure count.

    `keyframes.json` lists the frames of all videos, each video's in temporal order. It is
    written last, so an interrupted run never leaves an index naming frames that are missing.
    """
    from miocli.core.room import check_video, free_ram

    free = free_ram()
    for path in paths:  # before any work: a video too large for memory stops the run (exit 3)
        check_video(path, str(path), frames, free)
    index_path = out.target(KEYFRAMES_INDEX)
    entries: list[dict[str, Any]] = []
    failures = 0
    for path in paths:
        try:
            keyframes = frames.extract(path)
            written = []
            for number, keyframe in enumerate(keyframes, start=1):
                name = out.write(f"{path.stem}-{number:03d}.png",
                                 lambda tmp, image=keyframe.image: image.save(tmp, format="PNG"), source=str(path))
                written.append({
                    "file": name,
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
