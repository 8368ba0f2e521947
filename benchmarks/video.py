"""Keyframe extraction speed against plain full-resolution decoding.

Builds a 60 s 1280x720 25 fps mp4 (mp4v) with 5 hard cuts (6 scenes of 10 s, each with moving
content so that the detector has real work) in a temporary folder, then times:

- decode: a plain cv2 read loop over every frame at full resolution (the floor for anything
  that looks at every frame);
- extract_keyframes: scene detection on the downscaled stream plus fetching the keyframes;
- detection alone at a few detector widths, to show what downscaling buys.

Run: python benchmarks/video.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from miocli.media import frames, video

WIDTH, HEIGHT, FPS, SECONDS, SCENES = 1280, 720, 25, 60, 6


def build(path: Path) -> int:
    rng = np.random.default_rng(0)
    frames_per_scene = FPS * SECONDS // SCENES
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    # A wide noise texture panned across the frame: cheap to make, yet every frame differs.
    texture = rng.integers(0, 40, (HEIGHT, WIDTH * 2, 1), dtype=np.uint8)
    count = 0
    for scene in range(SCENES):
        base = np.array(rng.integers(30, 226, 3) if scene % 2 else rng.integers(0, 90, 3), dtype=np.uint8)
        for step in range(frames_per_scene):
            shift = (step * 4) % WIDTH
            frame = texture[:, shift : shift + WIDTH] + base
            x = (step * 7) % (WIDTH - 200)
            cv2.rectangle(frame, (x, 260), (x + 200, 460), (255, 255, 255), -1)
            writer.write(frame)
            count += 1
    writer.release()
    return count


def time_decode(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    cap = cv2.VideoCapture(str(path))
    count = 0
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        count += 1
    cap.release()
    return time.perf_counter() - start, count


def time_detection(path: Path, detect_width: int) -> tuple[float, int]:
    info = frames.probe_video(path)
    saved = frames.DETECT_WIDTH
    frames.DETECT_WIDTH = detect_width
    try:
        start = time.perf_counter()
        scenes, _ = frames.detect_scenes(path, info, video.DEFAULT_THRESHOLD)
        return time.perf_counter() - start, len(scenes)
    finally:
        frames.DETECT_WIDTH = saved


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.mp4"
        start = time.perf_counter()
        total = build(path)
        print(
            f"built {path.name}: {total} frames {WIDTH}x{HEIGHT} @ {FPS} fps, {SCENES - 1} cuts, "
            f"{path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s"
        )

        decode_s, decoded = time_decode(path)
        start = time.perf_counter()
        keyframes = video.extract_keyframes(path)
        extract_s = time.perf_counter() - start

        print(f"decode every frame (cv2 read loop): {decode_s:6.2f} s  {decoded / decode_s:7.1f} frames/s")
        print(
            f"extract_keyframes:                  {extract_s:6.2f} s  {total / extract_s:7.1f} frames/s"
            f"  -> {len(keyframes)} keyframes at {[round(f.time_s, 2) for f in keyframes]}"
        )
        for width in (WIDTH, 256, 128):
            seconds, scenes = time_detection(path, width)
            print(
                f"  detection only, detector width {width:4d}: {seconds:6.2f} s "
                f"{total / seconds:7.1f} frames/s, {scenes} scenes"
            )


if __name__ == "__main__":
    main()
