"""Video as MIO sees it: its keyframes, one image per scene, in temporal order (protocol §5).

Also the reverse for `mio video-gen`: images the model generated, assembled into an mp4.

OpenCV and PySceneDetect are imported inside the functions: the CLI imports this module for
every command, and those two cost a noticeable part of a second to load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli import quiet
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

# ContentDetector's default minimum scene length, which the reference keeps: 15 frames, counted
# in frames as they decode (see _detect_scenes for why not in timestamps).
MIN_SCENE_LEN_FRAMES = 15

# Width the detector works at: the reference leaves the downscale factor to PySceneDetect, whose
# automatic factor was width // 256, and ContentDetector's scores depend on the pixels it gets.
# It is also about where speed stops improving: on 720p (benchmarks/video.py) detection runs at
# ~65 frames/s at full width and ~420 at 256 px, where decoding dominates.
DETECT_WIDTH = 256

# When the next wanted frame is this many seconds ahead, seek instead of decoding forward.
# A seek decodes from the previous keyframe, and encoders commonly put one every 1-2 s, so
# for shorter gaps plain decoding is as cheap and never lands on the wrong frame.
SEEK_MIN_GAP_S = 2.0

# A video counts as cut short when more of the frames its container announces fail to decode
# than this share (or this many, for short clips). Real files miss a frame or two at most: a
# frame count estimated from duration x rate rounds, and leading B-frames of an open GOP can
# be dropped. A partial download misses most of them.
MISSING_FRAMES_SHARE = 0.05
MISSING_FRAMES_SLACK = 2

# Still-image formats that FFmpeg would happily open as a one-frame "video" (OpenCV does):
# such a file is a mistake (an image passed where a video was wanted) and gets said so.
_STILL_FORMATS = frozenset(
    {"PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO", "JPEG2000", "TGA", "DDS", "PCX"}
)

# cv2.CAP_PROP_POS_MSEC, a fixed OpenCV constant: named here so that the per-frame bookkeeping
# needs no cv2 import.
_CAP_PROP_POS_MSEC = 0

_FORMATS_HINT = "mio reads videos that OpenCV's FFmpeg can decode: mp4, avi, mkv, webm, mov"


@dataclass(frozen=True)
class Keyframe:
    image: Image.Image  # RGB, at the video's resolution
    frame_index: int  # 0-based, in decoding order (not derived from timestamps)
    time_s: float  # presentation time of this frame, as the container stamps it
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
        decoded = _decode(path, info.fps, keep)
    else:
        # The uniform samples are kept while scanning: when no cut turns up they are the answer,
        # without decoding the video a second time.
        scenes, decoded = _detect_scenes(path, info, DEFAULT_THRESHOLD if threshold is None else threshold, keep)
    _check_complete(path, info.frames, decoded.count)

    # The reference keeps one frame per scene only when it found a cut (one scene or none).
    if len(scenes) >= 2:
        chosen = _spread(len(scenes), max_frames)
        indices = [_scene_frame(*scenes[number]) for number in chosen]
        images = _read_frames(path, indices, info.fps, decoded.times_s)
        return [
            Keyframe(image=image, frame_index=index, time_s=decoded.times_s[index], scene=number)
            for number, index, image in zip(chosen, indices, images, strict=True)
        ]
    # Samples past what decodes are dropped, as the reference's loop over decoded frames does.
    return [
        Keyframe(image=_to_image(decoded.kept[index]), frame_index=index, time_s=decoded.times_s[index], scene=number)
        for number, index in samples.items()
        if index in decoded.kept
    ]


def probe_video(path: Path) -> VideoInfo:
    """Size, frame rate and length of a video; InputError when it is not a readable video."""
    path = Path(path)
    cv2 = _cv2()
    cap = _open(path)
    try:
        with quiet.silenced():
            ok, first = cap.read()
            fps = cap.get(cv2.CAP_PROP_FPS)
            reported = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        if not ok or first is None:
            raise InputError(
                f"video {path} has no frames that can be decoded",
                hint="the file is empty of pictures or damaged; re-encode it, e.g. "
                "`ffmpeg -i IN -c:v libx264 OUT.mp4`",
                source=str(path),
            )
        if not (math.isfinite(fps) and fps > 0):
            raise InputError(
                f"video {path} does not say its frame rate",
                hint="re-encode it with a constant frame rate, e.g. `ffmpeg -i IN -r 25 OUT.mp4`",
                source=str(path),
            )
        if math.isfinite(reported) and reported >= 1:
            frames = int(reported)
        else:
            # Streams without a length in their header (some webm/mkv): count them.
            frames = 1
            with quiet.silenced():
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


class _SeekMissed(Exception):
    """A seek landed on another frame than the one asked for (a variable frame rate)."""


@dataclass
class _Decoded:
    """What one pass over the whole video saw, frames numbered in decoding order."""

    fps: float
    keep: frozenset[int] | set[int]
    count: int = 0
    times_s: list[float] = field(default_factory=list)  # presentation time of every decoded frame
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # the pictures of the frames in `keep`

    def add(self, cap: Any, frame: np.ndarray | None) -> None:
        """Record the frame `cap` just grabbed; `frame` is its picture when already retrieved."""
        index = self.count
        self.count += 1
        self.times_s.append(_position_s(cap, index, self.fps))
        if index in self.keep:
            if frame is None:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise _PastEnd
            self.kept[index] = frame


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
    with quiet.silenced():
        cap = cv2.VideoCapture(source)
        opened = cap.isOpened()
        if not opened:
            cap.release()
    if not opened:
        raise InputError(
            f"{path} cannot be read as a video",
            hint=f"it is damaged or cut short (an mp4 missing its end), or not a video; {_FORMATS_HINT}",
            source=source,
        )
    return cap


def _still_image_format(path: Path) -> str | None:
    from PIL import Image

    try:
        with quiet.silenced(), Image.open(path) as image:
            if image.format in _STILL_FORMATS and getattr(image, "n_frames", 1) <= 1:
                return str(image.format)
    except Exception:  # a sniff only: whatever PIL cannot parse is not a still image
        return None
    return None


def _position_s(cap: Any, index: int, fps: float) -> float:
    """Presentation time of the frame `cap` last grabbed, rounded to the microsecond."""
    msec = cap.get(_CAP_PROP_POS_MSEC)
    seconds = msec / 1000 if math.isfinite(msec) and msec >= 0 else index / fps
    # Microseconds are finer than any frame rate; more digits are float noise.
    return round(seconds, 6)


def _detect_scenes(
    path: Path, info: VideoInfo, threshold: float, keep: frozenset[int] | set[int] = frozenset()
) -> tuple[list[tuple[int, int]], _Decoded]:
    """Scenes as (first frame, end frame exclusive) in decoding order, and what the pass decoded.

    PySceneDetect 0.7 numbers frames from their timestamps (seconds x average rate). On a
    variable-frame-rate video, common from phones, those numbers are not positions in the
    stream: a scene bound from them points at another frame, and the 15-frame minimum is
    measured in the wrong unit, dropping short scenes. So the detector is fed through
    PySceneDetect's VideoCaptureAdapter, which numbers frames as they decode, as the
    reference's uniform sampling counts them.
    """
    from scenedetect import ContentDetector, SceneManager, VideoCaptureAdapter

    decoded = _Decoded(fps=info.fps, keep=keep)

    class _Counting(VideoCaptureAdapter):  # type: ignore[misc]
        """The adapter, recording each frame's time (and the pictures to keep) as it decodes."""

        def read(self, decode: bool = True) -> Any:
            frame = super().read(decode)
            if frame is not False:
                decoded.add(self.capture, frame if decode else None)
            return frame

    cap = _open(path)
    source = str(path)
    try:
        with quiet.silenced():
            # No read retries: a frame that fails to grab ends the stream, as it does for
            # _read_frames, so both passes agree on what the frames are.
            video = _Counting(cap, frame_rate=info.fps, max_read_attempts=0)
            manager = SceneManager()
            manager.auto_downscale = False
            manager.downscale = max(1, info.width // DETECT_WIDTH)
            manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=MIN_SCENE_LEN_FRAMES))
            manager.detect_scenes(video=video)
            scene_list = manager.get_scene_list()
    except _PastEnd as error:
        raise _damaged(path) from error
    except Exception as error:  # raised in PySceneDetect's decoding thread: a damaged stream
        raise InputError(
            f"video {path} could not be decoded to the end ({error})",
            hint="re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
            source=source,
        ) from error
    finally:
        cap.release()
    # Decode positions already; the clamp only keeps a scene that a detector ends late in range.
    total = max(decoded.count, 1)
    scenes = [(min(start.frame_num, total - 1), min(max(end.frame_num, start.frame_num + 1), total))
              for start, end in scene_list]
    return scenes, decoded


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


def _decode(path: Path, fps: float, keep: set[int]) -> _Decoded:
    """Decode the whole video in order, keeping the pictures of the frames in `keep`."""
    decoded = _Decoded(fps=fps, keep=keep)
    cap = _open(path)
    try:
        with quiet.silenced():
            while cap.grab():
                decoded.add(cap, None)
    except _PastEnd as error:
        raise _damaged(path) from error
    finally:
        cap.release()
    return decoded


def _check_complete(path: Path, announced: int, decoded: int) -> None:
    """InputError when clearly fewer frames decode than the container announces (a cut-off file)."""
    missing = announced - decoded
    if missing > max(MISSING_FRAMES_SLACK, announced * MISSING_FRAMES_SHARE):
        raise InputError(
            f"video {path} is damaged: only {decoded} of its {announced} frames decode (it looks cut short)",
            hint="re-download or re-copy it, or re-encode what is left, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
            source=str(path),
        )


def _damaged(path: Path) -> InputError:
    return InputError(
        f"video {path} is damaged: a frame that was found cannot be decoded",
        hint="re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
        source=str(path),
    )


def _constant_rate(times_s: list[float], fps: float) -> bool:
    """Whether every frame sits where a constant `fps` puts it (within half a frame)."""
    if not times_s:
        return False
    first, half = times_s[0], 0.5 / fps
    return all(abs(time - first - index / fps) <= half for index, time in enumerate(times_s))


def _read_frames(path: Path, indices: list[int], fps: float, times_s: list[float]) -> list[Image.Image]:
    """The frames at decode positions `indices` (ascending) as RGB images.

    `times_s` are the presentation times the scan saw. Seeking is by frame number, which
    OpenCV turns into a timestamp at the average rate: right only at a constant frame rate, so
    it is used only then, and a seek that lands elsewhere falls back to decoding in order.
    """
    seekable = _constant_rate(times_s, fps)
    try:
        return _read_in_order(path, indices, fps, times_s, seek=seekable)
    except _SeekMissed:
        return _read_in_order(path, indices, fps, times_s, seek=False)


def _read_in_order(
    path: Path, indices: list[int], fps: float, times_s: list[float], *, seek: bool
) -> list[Image.Image]:
    cv2 = _cv2()
    cap = _open(path)
    seek_gap = max(1, int(SEEK_MIN_GAP_S * fps))
    out: list[Image.Image] = []
    position = 0  # index of the frame the next grab() returns
    try:
        with quiet.silenced():
            for index in indices:
                sought = seek and index - position > seek_gap
                if sought:
                    # OpenCV's FFmpeg backend seeks frame-exactly at a constant rate: it decodes
                    # forward from the keyframe before `index` (checked on mp4, avi, mkv, webm, mov).
                    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
                    position = index
                while position < index:
                    if not cap.grab():
                        raise _PastEnd
                    position += 1
                if not cap.grab():
                    raise _PastEnd
                position += 1
                if sought and abs(_position_s(cap, index, fps) - times_s[index]) > 0.5 / fps:
                    raise _SeekMissed
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    raise _PastEnd
                out.append(_to_image(frame))
    except _PastEnd as error:
        raise _damaged(path) from error
    finally:
        cap.release()
    return out


def _to_image(frame: np.ndarray) -> Image.Image:
    from PIL import Image

    cv2 = _cv2()
    if frame.ndim == 2:
        rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    elif frame.shape[2] == 4:
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    else:
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return Image.fromarray(rgb)


def _count_frames_quietly(path: Path) -> int:
    cv2 = _cv2()
    with quiet.silenced():
        cap = cv2.VideoCapture(str(path))
        try:
            count = 0
            while cap.isOpened() and cap.grab():
                count += 1
        finally:
            cap.release()
    return count
