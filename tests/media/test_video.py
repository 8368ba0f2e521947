"""Keyframe extraction and video assembly on small synthetic videos with known cuts.

The expected frames are the reference's (MIO's `utils.extract_frames`): PySceneDetect's
ContentDetector with its 15-frame minimum scene, the frame `start + max(1, end - start) // 2` of
each scene, and without a cut every `max(1, frame_count // 10)`-th frame from frame 0.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from miocli.errors import EnvironmentProblem, InputError, UsageError
from miocli.media.frames import probe_video
from miocli.media.video import (
    DEFAULT_MAX_FRAMES,
    FRAME_TOKENS,
    MODEL_CONTEXT_TOKENS,
    UNIFORM_FRAMES,
    Keyframe,
    assemble_video,
    extract_keyframes,
)

SIZE = (160, 120)  # width, height
FPS = 10

# BGR. Dark and bright colours alternate so that every cut changes brightness as well as hue:
# ContentDetector averages the hue, saturation and value changes, and a hue change alone
# between two equally bright colours can stay under its threshold.
PALETTE = [
    (120, 20, 20),  # dark blue
    (30, 230, 230),  # bright yellow
    (20, 20, 140),  # dark red
    (230, 230, 30),  # bright cyan
    (20, 120, 20),  # dark green
    (230, 30, 230),  # bright magenta
]


# Two seconds: longer than PySceneDetect's 15-frame minimum, and an even length, where the
# reference's frame (start + length // 2) differs from the "true" middle.
SCENE_FRAMES = 2 * FPS


def write_video(
    path: Path,
    colours: list[tuple[int, int, int]],
    *,
    frames_per_scene: int = SCENE_FRAMES,
    fourcc: str = "mp4v",
    fps: float = FPS,
    seed: int = 0,
) -> Path:
    """Solid-colour scenes with a little noise, so that frames within a scene are not identical."""
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, SIZE)
    if not writer.isOpened():
        pytest.skip(f"this OpenCV cannot write {fourcc} into {path.suffix}")
    try:
        for colour in colours:
            base = np.full((SIZE[1], SIZE[0], 3), colour, np.int16)
            for _ in range(frames_per_scene):
                noise = rng.normal(0, 3, base.shape)
                writer.write(np.clip(base + noise, 0, 255).astype(np.uint8))
    finally:
        writer.release()
    return path


def mean_rgb(frame: Keyframe) -> np.ndarray:
    return np.asarray(frame.image, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def rgb_of(bgr: tuple[int, int, int]) -> np.ndarray:
    return np.array(bgr[::-1], dtype=np.float64)


def assert_temporal(frames: list[Keyframe]) -> None:
    indices = [f.frame_index for f in frames]
    times = [f.time_s for f in frames]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert times == sorted(times)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "three": write_video(root / "three.mp4", PALETTE[:3]),
        "six": write_video(root / "six.mp4", PALETTE),
        # One static noisy scene of 3 s: no cut anywhere.
        "static": write_video(root / "static.mp4", [PALETTE[1]], frames_per_scene=3 * FPS),
    }


# --- scenes ----------------------------------------------------------------------------------


def test_one_keyframe_per_scene_where_the_reference_takes_it(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["three"])

    assert [f.scene for f in frames] == [0, 1, 2]
    # Scenes are frames 0-19, 20-39, 40-59: start + 20 // 2 (not 9, 29, 49).
    assert [f.frame_index for f in frames] == [10, 30, 50]
    assert [f.time_s for f in frames] == pytest.approx([1.0, 3.0, 5.0], abs=1e-6)
    for frame, colour in zip(frames, PALETTE[:3], strict=True):
        assert frame.image.mode == "RGB" and frame.image.size == SIZE
        np.testing.assert_allclose(mean_rgb(frame), rgb_of(colour), atol=6)


def test_odd_scene_lengths(tmp_path: Path) -> None:
    path = write_video(tmp_path / "odd.mp4", PALETTE[:2], frames_per_scene=17)
    assert [f.frame_index for f in extract_keyframes(path)] == [8, 17 + 8]


def test_a_scene_under_fifteen_frames_is_not_its_own(tmp_path: Path) -> None:
    # 24 fps: 30 frames, a cut to 12 frames of another colour, a cut to 30 more. Half a second
    # (12 frames) would have kept the short scene; PySceneDetect's 15 frames merge it into the
    # next, as the reference sees it.
    path = tmp_path / "flash.mp4"
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, SIZE)
    for colour, count in [(PALETTE[0], 30), (PALETTE[1], 12), (PALETTE[2], 30)]:
        for _ in range(count):
            noise = rng.normal(0, 3, (SIZE[1], SIZE[0], 3))
            writer.write(np.clip(np.full((SIZE[1], SIZE[0], 3), colour, np.int16) + noise, 0, 255).astype(np.uint8))
    writer.release()

    frames = extract_keyframes(path)

    # Scenes 0-29 and 30-71.
    assert [f.frame_index for f in frames] == [15, 30 + 42 // 2]
    np.testing.assert_allclose(mean_rgb(frames[1]), rgb_of(PALETTE[2]), atol=6)


def test_a_first_scene_under_fifteen_frames_is_no_scene(tmp_path: Path) -> None:
    # PySceneDetect counts the minimum from the first frame too: a cut 10 frames in is dropped.
    path = tmp_path / "early.mp4"
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    for colour, count in [(PALETTE[0], 10), (PALETTE[1], 30), (PALETTE[2], 30)]:
        for _ in range(count):
            noise = rng.normal(0, 3, (SIZE[1], SIZE[0], 3))
            writer.write(np.clip(np.full((SIZE[1], SIZE[0], 3), colour, np.int16) + noise, 0, 255).astype(np.uint8))
    writer.release()

    assert [f.frame_index for f in extract_keyframes(path)] == [20, 40 + 15]


def test_more_scenes_than_the_cap_keeps_an_even_spread_in_order(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["six"], max_frames=3)

    assert len(frames) == 3
    assert_temporal(frames)
    # One scene out of each pair: the frames cover the whole video, not just its beginning.
    assert [f.scene for f in frames] == [1, 3, 5]
    assert [f.frame_index for f in frames] == [30, 70, 110]
    for frame in frames:
        np.testing.assert_allclose(mean_rgb(frame), rgb_of(PALETTE[frame.scene]), atol=6)


def test_all_scenes_kept_under_the_cap(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["six"], max_frames=6)
    assert [f.scene for f in frames] == list(range(6))
    assert_temporal(frames)


def test_cap_of_one(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["six"], max_frames=1)
    assert len(frames) == 1
    assert 0 <= frames[0].scene < 6


# --- uniform sampling ------------------------------------------------------------------------


def test_no_cut_falls_back_to_every_interval_th_frame(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["static"])

    assert len(frames) == UNIFORM_FRAMES == 10
    assert [f.scene for f in frames] == list(range(10))
    # 30 frames: interval 3, from frame 0.
    assert [f.frame_index for f in frames] == list(range(0, 30, 3))
    assert np.diff([f.time_s for f in frames]) == pytest.approx([0.3] * 9, abs=1e-6)


@pytest.mark.parametrize(("count", "expected"), [(105, list(range(0, 101, 10))), (110, list(range(0, 100, 11)))])
def test_uniform_keeps_ten_or_eleven_frames_as_the_reference(tmp_path: Path, count: int, expected: list[int]) -> None:
    path = write_video(tmp_path / f"static{count}.avi", [PALETTE[1]], frames_per_scene=count, fourcc="MJPG")
    frames = extract_keyframes(path)
    assert [f.frame_index for f in frames] == expected
    assert [f.scene for f in frames] == list(range(len(expected)))


def test_uniform_on_request_ignores_cuts(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["three"], uniform=True)

    # 60 frames: interval 6.
    assert [f.frame_index for f in frames] == list(range(0, 60, 6))
    colours = [int(np.argmin([np.abs(mean_rgb(f) - rgb_of(c)).sum() for c in PALETTE[:3]])) for f in frames]
    assert colours == [0] * 4 + [1] * 3 + [2] * 3


def test_uniform_respects_the_cap(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["static"], uniform=True, max_frames=4)
    # An even spread of the reference's samples 0, 3, ..., 27, numbered as among those.
    assert [f.frame_index for f in frames] == [3, 9, 18, 24]
    assert [f.scene for f in frames] == [1, 3, 6, 8]


def test_high_threshold_finds_no_cut_and_samples_uniformly(videos: dict[str, Path]) -> None:
    frames = extract_keyframes(videos["three"], threshold=250)
    assert [f.frame_index for f in frames] == list(range(0, 60, 6))


def test_video_shorter_than_the_sample_count(tmp_path: Path) -> None:
    # Under 20 frames the interval is 1: every frame, as in the reference.
    path = write_video(tmp_path / "short.mp4", [PALETTE[0]], frames_per_scene=4)
    frames = extract_keyframes(path)
    assert [f.frame_index for f in frames] == [0, 1, 2, 3]
    path = write_video(tmp_path / "nineteen.mp4", [PALETTE[0]], frames_per_scene=19)
    assert [f.frame_index for f in extract_keyframes(path)] == list(range(19))


@pytest.mark.parametrize("kwargs", [{"max_frames": 0}, {"threshold": 0.0}, {"threshold": 300.0}])
def test_bad_options_are_usage_errors(videos: dict[str, Path], kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        extract_keyframes(videos["three"], **kwargs)  # type: ignore[arg-type]


def test_default_cap_fits_the_context() -> None:
    video_tokens = DEFAULT_MAX_FRAMES * FRAME_TOKENS
    assert video_tokens + 512 + 512 <= MODEL_CONTEXT_TOKENS
    assert DEFAULT_MAX_FRAMES >= UNIFORM_FRAMES


# --- containers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "fourcc"),
    [
        (".mp4", "mp4v"),
        (".avi", "MJPG"),
        (".avi", "XVID"),
        (".mkv", "XVID"),
        (".webm", "VP80"),
        (".mov", "mp4v"),
    ],
)
def test_containers(tmp_path: Path, suffix: str, fourcc: str) -> None:
    # Five-second scenes: the keyframes lie farther apart than SEEK_MIN_GAP_S, so they are
    # reached by seeking, and the frame a seek lands on must be the one asked for.
    path = write_video(tmp_path / f"clip{suffix}", PALETTE[:3], fourcc=fourcc, frames_per_scene=5 * FPS)
    probe = cv2.VideoCapture(str(path))
    readable = probe.isOpened() and probe.grab()
    probe.release()
    if not readable:
        pytest.skip(f"this OpenCV wrote {fourcc} into {suffix} but cannot read it back")

    info = probe_video(path)
    assert (info.width, info.height) == SIZE
    # Estimated from duration x rate where the container does not count (webm): close enough.
    assert abs(info.frames - 150) <= 1
    assert info.fps == pytest.approx(FPS)

    frames = extract_keyframes(path)
    assert [f.frame_index for f in frames] == [25, 75, 125]
    decoded = decode_all(path)
    for frame, colour in zip(frames, PALETTE[:3], strict=True):
        np.testing.assert_allclose(mean_rgb(frame), rgb_of(colour), atol=8)
        np.testing.assert_array_equal(np.asarray(frame.image), decoded[frame.frame_index])
    frames = extract_keyframes(path, uniform=True, max_frames=2)
    assert [f.frame_index for f in frames] == [30, 105]
    for frame in frames:
        np.testing.assert_array_equal(np.asarray(frame.image), decoded[frame.frame_index])


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame, decoded in order, as RGB arrays."""
    cap = cv2.VideoCapture(str(path))
    decoded = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    cap.release()
    return decoded


def test_seeking_lands_on_the_exact_frame(tmp_path: Path) -> None:
    # Eight 4 s scenes at 10 fps, every frame with its own noise: an off-by-one seek shows.
    path = write_video(tmp_path / "long.avi", PALETTE + PALETTE[:2], frames_per_scene=4 * FPS, fourcc="MJPG")
    frames = extract_keyframes(path)
    assert [f.frame_index for f in frames] == [40 * k + 20 for k in range(8)]
    decoded = decode_all(path)
    for frame in frames:
        np.testing.assert_array_equal(np.asarray(frame.image), decoded[frame.frame_index])


def test_a_video_cut_short_is_damaged(tmp_path: Path) -> None:
    # An AVI keeps its frame count up front: cut at 40 % it still opens, and fewer frames decode.
    whole = write_video(tmp_path / "whole.avi", PALETTE[:3], fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 4 // 10])
    for uniform in (False, True):
        with pytest.raises(InputError, match="damaged") as caught:
            extract_keyframes(cut, uniform=uniform)
        assert str(cut) in caught.value.message and caught.value.hint and "re-encode" in caught.value.hint


@pytest.mark.parametrize(("announced", "decoded", "damaged"), [(60, 57, False), (60, 56, True), (1000, 950, False),
                                                               (1000, 949, True), (3, 1, False)])
def test_a_frame_or_two_short_is_not_damage(tmp_path: Path, announced: int, decoded: int, damaged: bool) -> None:
    # Frame counts of real files are often estimates (duration x rate): a few frames short passes.
    from miocli.media.frames import check_complete

    if damaged:
        with pytest.raises(InputError, match="damaged"):
            check_complete(tmp_path / "clip.mp4", announced, decoded)
    else:
        check_complete(tmp_path / "clip.mp4", announced, decoded)


def test_probe(videos: dict[str, Path]) -> None:
    info = probe_video(videos["three"])
    assert (info.frames, info.width, info.height) == (60, 160, 120)
    assert info.fps == pytest.approx(10)
    assert info.duration_s == pytest.approx(6.0)


# --- files that are not videos ---------------------------------------------------------------


def _text_as_mp4(path: Path) -> Path:
    path = path / "notes.mp4"
    path.write_text("these are meeting notes, not a video\n" * 20)
    return path


def _empty(path: Path) -> Path:
    path = path / "empty.mp4"
    path.touch()
    return path


def _png(path: Path) -> Path:
    path = path / "picture.png"
    Image.new("RGB", (64, 48), "red").save(path)
    return path


def _png_as_mp4(path: Path) -> Path:
    path = path / "picture.mp4"
    Image.new("RGB", (64, 48), "red").save(path, format="PNG")
    return path


def _jpeg(path: Path) -> Path:
    path = path / "photo.jpg"
    Image.new("RGB", (64, 48), "blue").save(path)
    return path


def _missing(path: Path) -> Path:
    return path / "nowhere.mp4"


def _directory(path: Path) -> Path:
    path = path / "folder.mp4"
    path.mkdir()
    return path


def _zero_frames(path: Path) -> Path:
    path = path / "zero.avi"
    cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE).release()
    return path


def _truncated(path: Path) -> Path:
    whole = write_video(path / "whole.mp4", PALETTE[:2])
    cut = path / "truncated.mp4"
    cut.write_bytes(whole.read_bytes()[:300])
    return cut


@pytest.mark.parametrize(
    "make",
    [_text_as_mp4, _empty, _png, _png_as_mp4, _jpeg, _missing, _directory, _zero_frames, _truncated],
)
@pytest.mark.parametrize("function", [extract_keyframes, probe_video])
def test_bad_files_are_input_errors_naming_the_file(
    tmp_path: Path, make: Callable[[Path], Path], function: Callable[[Path], object]
) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        function(path)
    error = caught.value
    assert str(path) in error.message
    assert error.source == str(path)
    assert error.hint


def test_png_is_called_an_image(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="PNG image, not a video"):
        extract_keyframes(_png_as_mp4(tmp_path))


# --- assemble_video --------------------------------------------------------------------------


def test_assemble_round_trip(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (96, 64), c) for c in colours]
    images[2] = Image.new("RGBA", (200, 100), (*colours[2], 255))  # other size and mode
    images[3] = Image.new("L", (96, 64), 200)  # greyscale
    path = tmp_path / "generated.mp4"

    assemble_video(images, path, fps=4)

    assert path.exists() and not list(tmp_path.glob(".*partial*"))
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (5, 96, 64)
    assert info.fps == pytest.approx(4)
    cap = cv2.VideoCapture(str(path))
    means = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        means.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).reshape(-1, 3).mean(axis=0))
    cap.release()
    expected = [colours[0], colours[1], colours[2], (200, 200, 200), colours[4]]
    np.testing.assert_allclose(means, expected, atol=12)


def test_assemble_odd_size_is_evened(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    assemble_video([Image.new("RGB", (97, 63), "white")] * 3, path, fps=8)
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (3, 96, 62)


def test_assemble_into_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="cannot write"):
        assemble_video([Image.new("RGB", (32, 32))], tmp_path / "no" / "such" / "out.mp4", fps=5)


def test_assemble_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        assemble_video([Image.new("RGB", (32, 32))], tmp_path / "out.mp4", fps=0)
    with pytest.raises(ValueError):
        assemble_video([], tmp_path / "out.mp4", fps=5)


# --- import cost -----------------------------------------------------------------------------


def test_import_is_light() -> None:
    code = (
        "import sys, miocli.media.video\n"
        "heavy = {'cv2', 'scenedetect', 'numpy', 'PIL'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
