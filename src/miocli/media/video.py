"""Video as MIO sees it: its keyframes, one image per scene, in temporal order (protocol §5).

Also the reverse for `mio video-gen`: images the model generated, assembled into an mp4.

Reading the file (decoding, counting, scene detection) is `frames.py`'s; this module chooses the
frames the reference chooses. OpenCV is imported inside the functions: the CLI imports this module
for every command, and it costs a noticeable part of a second to load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from miocli import quiet
from miocli.errors import EnvironmentProblem, InputError, UsageError
from miocli.media.frames import (
    check_complete,
    count_frames,
    cv2_module,
    decode_frames,
    detect_scenes,
    probe_video,
    read_frames,
    to_image,
)

if TYPE_CHECKING:
    from PIL import Image

# Frame budget. Each frame costs 34 tokens in the prompt (`<image>` + 32 ids + `</image>`) and
# the model's context is 4096 tokens. Keep the 512 tokens of a full answer (max_new_tokens of
# the reference), and 1024 for everything else in the prompt: BOS, chat template and the
# std system text take about 60, which leaves roughly 950 tokens for the question (several
# paragraphs) or a short earlier turn, and for a separator between frames if the prompt adds one.
# (4096 - 512 - 1024) // 34 = 75 frames, i.e. 2550 prompt tokens of video.
MODEL_CONTEXT_TOKENS = 4096
ANSWER_TOKENS = 512
PROMPT_RESERVE_TOKENS = 1024
FRAME_TOKENS = 34
DEFAULT_MAX_FRAMES = (MODEL_CONTEXT_TOKENS - ANSWER_TOKENS - PROMPT_RESERVE_TOKENS) // FRAME_TOKENS

# Which frames: the reference's own choice, MIO's `utils.extract_frames`, which both its video
# training data and its `infer.py` go through. The model learnt video from exactly those frames,
# so a variant (however reasonable: a minimum scene length in seconds, the "true" middle of a
# scene, evenly centred samples) shows it pictures it was not trained on; on the reference's own
# test_video_2.avi a 0.5 s minimum gave 8 keyframes where the reference has 7 scenes. So:
# PySceneDetect's ContentDetector with its defaults, one frame per scene as its save_images
# (num_images=1) picks it, and without any cut every `interval`-th frame from frame 0. (This
# gives the very frames the reference saved for its test videos 1-3, scene and uniform alike.)

# Without a cut the reference keeps frames 0, interval, 2*interval, ... with
# interval = max(1, frame_count // 10): 10 or 11 frames, or all of a video under 20 frames.
UNIFORM_FRAMES = 10

# PySceneDetect's default cut threshold (mean HSV change, 0-255 scale), as the reference uses it.
DEFAULT_THRESHOLD = 27.0

@dataclass(frozen=True)
class Keyframe:
    image: Image.Image  # RGB, at the video's resolution
    frame_index: int  # 0-based, in decoding order (not derived from timestamps)
    time_s: float  # presentation time of this frame, as the container stamps it
    scene: int  # 0-based detected scene number; for uniform sampling, the sample number


@dataclass(frozen=True)
class FrameOptions:
    """The user's frame choices (`--max-frames`, `--uniform`, `--threshold`)."""

    max_frames: int = DEFAULT_MAX_FRAMES
    uniform: bool = False
    threshold: float | None = None

    def extract(self, path: Path) -> list[Keyframe]:
        return extract_keyframes(path, max_frames=self.max_frames, uniform=self.uniform, threshold=self.threshold)


def keyframes_of_bytes(data: bytes, name: str, frames: FrameOptions) -> list[Keyframe]:
    """Keyframes of a video given as bytes: OpenCV reads files only, so through a private temp file."""
    import tempfile

    if not data:
        raise InputError(f"{name} is empty (0 bytes)", hint="give the bytes of a video file", source=name)
    with tempfile.TemporaryDirectory(prefix="mio-video-") as folder:
        path = Path(folder) / "input-video"
        path.write_bytes(data)
        try:
            return frames.extract(path)
        except InputError as exc:
            # The temp file's name means nothing to the caller: name the input instead.
            raise InputError(exc.message.replace(str(path), name), exc.hint, source=name) from None


def extract_keyframes(
    path: Path,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    uniform: bool = False,
    threshold: float | None = None,
) -> list[Keyframe]:
    """The reference's keyframes: one per detected scene, in temporal order, at most `max_frames`.

    Without any cut (or with `uniform`) every `interval`-th frame from frame 0, as the reference
    samples (see UNIFORM_FRAMES). When there are more frames than `max_frames`, an evenly spread
    subset is kept, so the frames still cover the whole video rather than only its start.
    InputError when the file is not a video or fewer of its frames decode than it announces.
    """
    path = Path(path)
    if max_frames < 1:
        raise UsageError(f"the number of video frames must be at least 1 (got {max_frames})")
    if threshold is not None and not (0 < threshold <= 255):
        raise UsageError(
            f"the scene-cut threshold must be between 0 and 255 (got {threshold})",
            hint=f"PySceneDetect's default is {DEFAULT_THRESHOLD:g}; lower finds more cuts",
        )
    info = probe_video(path)
    samples = _uniform_samples(info.frames, max_frames)
    keep = set(samples.values())

    scenes: list[tuple[int, int]] = []
    if uniform:
        decoded = decode_frames(path, info.fps, keep)
    else:
        # The uniform samples are kept while scanning: when no cut turns up they are the answer,
        # without decoding the video a second time.
        scenes, decoded = detect_scenes(path, info, DEFAULT_THRESHOLD if threshold is None else threshold, keep)
    check_complete(path, info.frames, decoded.count)

    # The reference keeps one frame per scene only when it found a cut (one scene or none).
    if len(scenes) >= 2:
        chosen = _spread(len(scenes), max_frames)
        indices = [_scene_frame(*scenes[number]) for number in chosen]
        images = read_frames(path, indices, info.fps, decoded.times_s)
        return [
            Keyframe(image=image, frame_index=index, time_s=decoded.times_s[index], scene=number)
            for number, index, image in zip(chosen, indices, images, strict=True)
        ]
    # Samples past what decodes are dropped, as the reference's loop over decoded frames does.
    return [
        Keyframe(image=to_image(decoded.kept[index]), frame_index=index, time_s=decoded.times_s[index], scene=number)
        for number, index in samples.items()
        if index in decoded.kept
    ]


def assemble_video(images: list[Image.Image], path: Path, fps: float) -> None:
    """Write `images` as an mp4 (mp4v) at `fps`, all at the first image's size.

    Written under a temporary name and renamed at the end, so a failure never leaves a
    truncated video at `path`.
    """
    from PIL import Image as PILImage

    path = Path(path)
    if not images:
        raise ValueError("assemble_video needs at least one image")
    if not (math.isfinite(fps) and fps > 0):
        raise UsageError(f"the video frame rate must be a positive number (got {fps})")
    cv2 = cv2_module()
    import numpy as np

    width, height = images[0].size
    # mp4v needs even sizes (4:2:0 chroma) and the encoder silently trims odd ones; trim here
    # so the size is ours to state and every frame is resized the same way.
    width, height = max(2, width - width % 2), max(2, height - height % 2)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    # FFmpeg remarks on the mp4v tag in an mp4 ("not supported ... fallback") every time.
    with quiet.silenced():
        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    try:
        if not writer.isOpened():
            raise EnvironmentProblem(
                f"cannot write video {path}",
                hint="check that its folder exists and is writable and that the name ends in .mp4",
            )
        for image in images:
            rgb = image.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), PILImage.Resampling.BICUBIC)
            with quiet.silenced():
                writer.write(cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR))
    finally:
        with quiet.silenced():
            writer.release()

    written = count_frames(partial)
    if written != len(images):
        partial.unlink(missing_ok=True)
        raise EnvironmentProblem(
            f"the video written to {path} reads back with {written} frames instead of {len(images)}",
            hint="OpenCV's FFmpeg could not encode mp4v here; reinstall opencv-python-headless",
        )
    os.replace(partial, path)


def _scene_frame(start: int, end: int) -> int:
    """The frame the reference keeps of a scene [start, end).

    PySceneDetect's save_images(num_images=1), as the reference calls it, takes the middle element
    of range(start, start + max(1, end - start)): for an even length the later of the two middle
    frames (68 of the scene [60, 76), not 67), and the first frame of an empty scene.
    """
    return start + max(1, end - start) // 2


def _uniform_samples(frames: int, max_frames: int) -> dict[int, int]:
    """The reference's frames without a cut, {sample number: frame index}, at most `max_frames`.

    The reference keeps every `interval`-th frame from frame 0 with
    interval = max(1, frame_count // 10) (frame_count as the container says), so 10 or 11 frames.
    """
    interval = max(1, frames // UNIFORM_FRAMES)
    indices = list(range(0, frames, interval))
    return {number: indices[number] for number in _spread(len(indices), max_frames)}


def _spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices out of range(count), evenly spread, ascending (all of them if fewer)."""
    if count <= wanted:
        return list(range(count))
    # The centre of each of `wanted` equal slices: every kept item stands for the same share.
    return [int((i + 0.5) * count / wanted) for i in range(wanted)]
