"""Frames read from a video file with OpenCV, counted in decoding order, and its scenes found.

The reference's frame numbers are positions in the decoded stream, so everything here counts frames
as they decode (never from timestamps: on a variable-frame-rate video those point at other frames).
A file that is not a video, or that decodes clearly fewer frames than it announces, is an InputError.

OpenCV and PySceneDetect are imported inside the functions: they cost a noticeable part of a second.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli import quiet
from miocli.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

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
class VideoInfo:
    frames: int  # as the container reports it; counted by decoding when it does not say
    fps: float
    duration_s: float
    width: int
    height: int


def probe_video(path: Path) -> VideoInfo:
    """Size, frame rate and length of a video; InputError when it is not a readable video."""
    path = Path(path)
    cv2 = cv2_module()
    cap = open_video(path)
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


class _PastEnd(Exception):
    """A wanted frame lies beyond the last frame that actually decodes."""


class _SeekMissed(Exception):
    """A seek landed on another frame than the one asked for (a variable frame rate)."""


@dataclass
class Decoded:
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


def cv2_module() -> Any:
    # FFmpeg prints its own errors ("moov atom not found") for the files we then reject with a
    # clearer message; keep it quiet unless the user asked for its log level themselves.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    return cv2


def open_video(path: Path) -> Any:
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
    cv2 = cv2_module()
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


def detect_scenes(
    path: Path, info: VideoInfo, threshold: float, keep: frozenset[int] | set[int] = frozenset()
) -> tuple[list[tuple[int, int]], Decoded]:
    """Scenes as (first frame, end frame exclusive) in decoding order, and what the pass decoded.

    PySceneDetect 0.7 numbers frames from their timestamps (seconds x average rate). On a
    variable-frame-rate video, common from phones, those numbers are not positions in the
    stream: a scene bound from them points at another frame, and the 15-frame minimum is
    measured in the wrong unit, dropping short scenes. So the detector is fed through
    PySceneDetect's VideoCaptureAdapter, which numbers frames as they decode, as the
    reference's uniform sampling counts them.
    """
    from scenedetect import ContentDetector, SceneManager, VideoCaptureAdapter

    decoded = Decoded(fps=info.fps, keep=keep)

    class _Counting(VideoCaptureAdapter):  # type: ignore[misc]
        """The adapter, recording each frame's time (and the pictures to keep) as it decodes."""

        def read(self, decode: bool = True) -> Any:
            frame = super().read(decode)
            if frame is not False:
                decoded.add(self.capture, frame if decode else None)
            return frame

    cap = open_video(path)
    source = str(path)
    try:
        with quiet.silenced():
            # No read retries: a frame that fails to grab ends the stream, as it does for
            # read_frames, so both passes agree on what the frames are.
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


def decode_frames(path: Path, fps: float, keep: set[int]) -> Decoded:
    """Decode the whole video in order, keeping the pictures of the frames in `keep`."""
    decoded = Decoded(fps=fps, keep=keep)
    cap = open_video(path)
    try:
        with quiet.silenced():
            while cap.grab():
                decoded.add(cap, None)
    except _PastEnd as error:
        raise _damaged(path) from error
    finally:
        cap.release()
    return decoded


def check_complete(path: Path, announced: int, decoded: int) -> None:
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


def read_frames(path: Path, indices: list[int], fps: float, times_s: list[float]) -> list[Image.Image]:
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
    cv2 = cv2_module()
    cap = open_video(path)
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
                out.append(to_image(frame))
    except _PastEnd as error:
        raise _damaged(path) from error
    finally:
        cap.release()
    return out


def to_image(frame: np.ndarray) -> Image.Image:
    from PIL import Image

    cv2 = cv2_module()
    if frame.ndim == 2:
        rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    elif frame.shape[2] == 4:
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    else:
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return Image.fromarray(rgb)


def count_frames(path: Path) -> int:
    cv2 = cv2_module()
    with quiet.silenced():
        cap = cv2.VideoCapture(str(path))
        try:
            count = 0
            while cap.isOpened() and cap.grab():
                count += 1
        finally:
            cap.release()
    return count
