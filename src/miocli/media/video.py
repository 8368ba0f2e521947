"""Video as MIO sees it: its keyframes, one image per scene, in temporal order (protocol §5).

Also the reverse for `mio video-gen`: images the model generated, assembled into an mp4.

OpenCV and PySceneDetect are imported inside the functions: the CLI imports this module for
every command, and those two cost a noticeable part of a second to load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli.errors import EnvironmentProblem, InputError, UsageError

if TYPE_CHECKING:
    import numpy as np
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

# The reference keeps "about 10" evenly spaced frames when it finds no cut.
UNIFORM_FRAMES = 10

# PySceneDetect's default cut threshold (mean HSV change, 0-255 scale); the spec names no other.
DEFAULT_THRESHOLD = 27.0

# Minimum scene length, given in seconds rather than PySceneDetect's default of 15 frames so
# that a 60 fps video does not get scenes half as long as a 30 fps one; 0.5 s is that default
# at 30 fps. Shorter "scenes" are flashes or fast edits whose middle frame tells little.
MIN_SCENE_LEN_S = 0.5

# Width the detector works at. ContentDetector compares mean hue, saturation and brightness
# between consecutive frames, which survives heavy downscaling. On 720p (benchmarks/video.py)
# detecting at full width runs at ~65 frames/s against ~420 at 256 px, where decoding dominates;
# 128 px was no faster, so keep PySceneDetect's own floor of 256 px and its detail.
DETECT_WIDTH = 256

# When the next wanted frame is this many seconds ahead, seek instead of decoding forward.
# A seek decodes from the previous keyframe, and encoders commonly put one every 1-2 s, so
# for shorter gaps plain decoding is as cheap and never lands on the wrong frame.
SEEK_MIN_GAP_S = 2.0

# Still-image formats that FFmpeg would happily open as a one-frame "video" (OpenCV does):
# such a file is a mistake (an image passed where a video was wanted) and gets said so.
_STILL_FORMATS = frozenset(
    {"PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO", "JPEG2000", "TGA", "DDS", "PCX"}
)

_FORMATS_HINT = "mio reads videos that OpenCV's FFmpeg can decode: mp4, avi, mkv, webm, mov"


@dataclass(frozen=True)
class Keyframe:
    image: Image.Image  # RGB, at the video's resolution
    frame_index: int  # 0-based, in decoding order
    time_s: float  # presentation time of this frame
    scene: int  # 0-based detected scene number; for uniform sampling, the sample number


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # as the container reports it; counted by decoding when it does not say
    fps: float
    duration_s: float
    width: int
    height: int


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
    """One keyframe per detected scene, in temporal order, at most `max_frames` of them.

    Without any cut (or with `uniform`) about UNIFORM_FRAMES evenly spaced frames instead.
    When there are more scenes than `max_frames`, an evenly spread subset of the scenes is
    kept, so the frames still cover the whole video rather than only its start.
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
    total = info.frames

    targets: list[tuple[int, int]] = []  # (frame index, scene or sample number)
    if not uniform:
        scenes, total = _detect_scenes(path, info, DEFAULT_THRESHOLD if threshold is None else threshold)
        # Fewer than two scenes means no cut was found: one frame would not describe the video.
        if len(scenes) >= 2:
            for number in _spread(len(scenes), max_frames):
                start, end = scenes[number]
                # The middle of the scene rather than its first frame: right after a cut the
                # picture is often still the tail of a dissolve, motion-blurred or a low-quality
                # encoder keyframe, while the middle is the frame farthest from both boundaries
                # and so the most typical of the shot.
                targets.append(((start + end - 1) // 2, number))
    scene_targets = bool(targets)
    if not scene_targets:
        targets = _uniform_targets(total, min(UNIFORM_FRAMES, max_frames))

    try:
        frames = _read_frames(path, [index for index, _ in targets], info.fps)
    except _PastEnd:
        # Fewer frames decode than the container says (its header is wrong, or the file is cut
        # short), or a timestamp-derived scene bound overshot: count what really decodes and
        # read again within it.
        total = _count_frames(path)
        targets = (
            [(min(index, total - 1), number) for index, number in targets]
            if scene_targets
            else _uniform_targets(total, min(UNIFORM_FRAMES, max_frames))
        )
        try:
            frames = _read_frames(path, [index for index, _ in targets], info.fps)
        except _PastEnd as error:
            raise InputError(
                f"video {path} stops decoding before its last frame",
                hint="the file is damaged; re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
                source=str(path),
            ) from error

    return [
        Keyframe(image=image, frame_index=index, time_s=time_s, scene=number)
        for (index, number), (image, time_s) in zip(targets, frames, strict=True)
    ]


def probe_video(path: Path) -> VideoInfo:
    """Size, frame rate and length of a video; InputError when it is not a readable video."""
    path = Path(path)
    cv2 = _cv2()
    cap = _open(path)
    try:
        ok, first = cap.read()
        if not ok or first is None:
            raise InputError(
                f"video {path} has no frames that can be decoded",
                hint="the file is empty of pictures or damaged; re-encode it, e.g. "
                "`ffmpeg -i IN -c:v libx264 OUT.mp4`",
                source=str(path),
            )
        fps = cap.get(cv2.CAP_PROP_FPS)
        if not (math.isfinite(fps) and fps > 0):
            raise InputError(
                f"video {path} does not say its frame rate",
                hint="re-encode it with a constant frame rate, e.g. `ffmpeg -i IN -r 25 OUT.mp4`",
                source=str(path),
            )
        reported = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        if math.isfinite(reported) and reported >= 1:
            frames = int(reported)
        else:
            # Streams without a length in their header (some webm/mkv): count them.
            frames = 1
            while cap.grab():
                frames += 1
        # The decoded picture rather than the header's size: OpenCV applies rotation metadata.
        height, width = first.shape[:2]
    finally:
        cap.release()
    return VideoInfo(frames=frames, fps=fps, duration_s=frames / fps, width=width, height=height)


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
    cv2 = _cv2()
    import numpy as np

    width, height = images[0].size
    # mp4v needs even sizes (4:2:0 chroma) and the encoder silently trims odd ones; trim here
    # so the size is ours to state and every frame is resized the same way.
    width, height = max(2, width - width % 2), max(2, height - height % 2)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
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
            writer.write(cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()

    written = _count_frames_quietly(partial)
    if written != len(images):
        partial.unlink(missing_ok=True)
        raise EnvironmentProblem(
            f"the video written to {path} reads back with {written} frames instead of {len(images)}",
            hint="OpenCV's FFmpeg could not encode mp4v here; reinstall opencv-python-headless",
        )
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------


class _PastEnd(Exception):
    """A wanted frame lies beyond the last frame that actually decodes."""


def _cv2() -> Any:
    # FFmpeg prints its own errors ("moov atom not found") for the files we then reject with a
    # clearer message; keep it quiet unless the user asked for its log level themselves.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    return cv2


def _open(path: Path) -> Any:
    """An opened cv2.VideoCapture for `path`, or InputError saying what is wrong with the file."""
    source = str(path)
    if not path.exists():
        raise InputError(f"video file not found: {path}", hint="check the path", source=source)
    if not path.is_file():
        raise InputError(f"{path} is not a file", hint="give the path of a video file", source=source)
    if path.stat().st_size == 0:
        raise InputError(
            f"video file {path} is empty (0 bytes)",
            hint="it was probably not fully copied or downloaded",
            source=source,
        )
    still = _still_image_format(path)
    if still is not None:
        raise InputError(
            f"{path} is a {still} image, not a video",
            hint="give a video file (mp4, avi, mkv, webm, mov); still images are passed as images",
            source=source,
        )
    cv2 = _cv2()
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        cap.release()
        raise InputError(f"{path} cannot be read as a video", hint=_FORMATS_HINT, source=source)
    return cap


def _still_image_format(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format in _STILL_FORMATS and getattr(image, "n_frames", 1) <= 1:
                return str(image.format)
    except Exception:  # a sniff only: whatever PIL cannot parse is not a still image
        return None
    return None


def _detect_scenes(path: Path, info: VideoInfo, threshold: float) -> tuple[list[tuple[int, int]], int]:
    """Scenes as (first frame, end frame exclusive), and the exact number of frames decoded."""
    from scenedetect import ContentDetector, SceneManager, open_video
    from scenedetect.video_stream import VideoOpenFailure

    source = str(path)
    try:
        video = open_video(source, backend="opencv")
    except (OSError, VideoOpenFailure) as error:
        raise InputError(f"{path} cannot be read as a video", hint=_FORMATS_HINT, source=source) from error
    manager = SceneManager()
    manager.auto_downscale = False
    manager.downscale = max(1, info.width // DETECT_WIDTH)
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=MIN_SCENE_LEN_S))
    try:
        decoded = manager.detect_scenes(video=video)
    except Exception as error:  # raised in PySceneDetect's decoding thread: a damaged stream
        raise InputError(
            f"video {path} could not be decoded to the end ({error})",
            hint="re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
            source=source,
        ) from error
    scenes = [(start.frame_num, end.frame_num) for start, end in manager.get_scene_list()]
    # frame_num is derived from timestamps; keep the last scene inside what was decoded.
    total = max(decoded, 1)
    scenes = [(min(start, total - 1), min(max(end, start + 1), total)) for start, end in scenes]
    return scenes, total


def _spread(count: int, wanted: int) -> list[int]:
    """`wanted` indices out of range(count), evenly spread, ascending (all of them if fewer)."""
    if count <= wanted:
        return list(range(count))
    # The centre of each of `wanted` equal slices: every kept item stands for the same share.
    return [int((i + 0.5) * count / wanted) for i in range(wanted)]


def _uniform_targets(total: int, wanted: int) -> list[tuple[int, int]]:
    return [(index, number) for number, index in enumerate(_spread(total, wanted))]


def _read_frames(path: Path, indices: list[int], fps: float) -> list[tuple[Image.Image, float]]:
    """The frames at `indices` (ascending) as RGB images with their times in seconds."""
    from PIL import Image

    cv2 = _cv2()
    cap = _open(path)
    seek_gap = max(1, int(SEEK_MIN_GAP_S * fps))
    out: list[tuple[Image.Image, float]] = []
    position = 0  # index of the frame the next grab() returns
    try:
        for index in indices:
            if index - position > seek_gap:
                # OpenCV's FFmpeg backend seeks frame-exactly: it decodes forward from the
                # keyframe before `index` (checked on mp4, avi, mkv, webm, mov in the tests).
                cap.set(cv2.CAP_PROP_POS_FRAMES, index)
                position = index
            while position < index:
                if not cap.grab():
                    raise _PastEnd
                position += 1
            if not cap.grab():
                raise _PastEnd
            position += 1
            ok, frame = cap.retrieve()
            if not ok or frame is None:
                raise InputError(
                    f"frame {index} of video {path} cannot be decoded",
                    hint="the file is damaged; re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
                    source=str(path),
                )
            msec = cap.get(cv2.CAP_PROP_POS_MSEC)
            time_s = msec / 1000 if math.isfinite(msec) and msec >= 0 else index / fps
            # Microseconds are finer than any frame rate; more digits are float noise.
            time_s = round(time_s, 6)
            out.append((Image.fromarray(_to_rgb(cv2, frame)), time_s))
    finally:
        cap.release()
    return out


def _to_rgb(cv2: Any, frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def _count_frames(path: Path) -> int:
    cap = _open(path)
    try:
        count = 0
        while cap.grab():
            count += 1
    finally:
        cap.release()
    if count == 0:
        raise InputError(
            f"video {path} has no frames that can be decoded", hint=_FORMATS_HINT, source=str(path)
        )
    return count


def _count_frames_quietly(path: Path) -> int:
    cv2 = _cv2()
    cap = cv2.VideoCapture(str(path))
    try:
        count = 0
        while cap.isOpened() and cap.grab():
            count += 1
    finally:
        cap.release()
    return count
