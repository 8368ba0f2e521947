"""Keyframes as the reference takes them, damaged videos, and a stderr kept to mio's own lines.

Through the real `mio` entry point, on videos written here with OpenCV. A variable-frame-rate
mp4 and a "fast start" mp4 (index before the data, as downloads have it) are made from OpenCV's
output by rewriting its boxes, so no FFmpeg binary or PyAV is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
from PIL import Image

from mio_testing import run_mio
from miocli import quiet

SIZE = (160, 120)
FAST = ["--device", "cpu", "--seed", "0"]
# BGR. Dark and bright alternate, so that every cut changes brightness as well as hue.
DARK_RED, BRIGHT_GREEN, DARK_BLUE, BRIGHT_YELLOW = (20, 20, 140), (30, 230, 30), (140, 20, 20), (30, 230, 230)
QUIET = {quiet.ENV_VERBOSE: ""}
VERBOSE = {quiet.ENV_VERBOSE: "1"}


def write_scenes(path: Path, scenes: list[tuple[tuple[int, int, int], int]], fps: float, fourcc: str = "mp4v") -> Path:
    """Solid-colour scenes (colour, frame count) with a little noise, so no two frames are equal."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, SIZE)
    assert writer.isOpened()
    for colour, count in scenes:
        base = np.full((SIZE[1], SIZE[0], 3), colour, np.int16)
        for _ in range(count):
            writer.write(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))
    writer.release()
    return path


def keyframes(video: Path, out: Path, *options: str) -> list[dict]:
    done = run_mio("keyframes", str(video), "-o", str(out), "--json", *options, env=QUIET)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return json.loads(done.stdout)


def colour_of(entry: dict, out: Path) -> tuple[int, int, int]:
    """The BGR palette colour nearest to a written keyframe."""
    rgb = np.asarray(Image.open(out / entry["file"]), dtype=float).reshape(-1, 3).mean(axis=0)
    palette = [DARK_RED, BRIGHT_GREEN, DARK_BLUE, BRIGHT_YELLOW]
    return palette[int(np.argmin([np.abs(rgb - np.array(c[::-1])).sum() for c in palette]))]


def placeholders(video: Path, tiny_model: Path) -> list[str]:
    done = run_mio("video-caption", str(video), "--model", str(tiny_model), *FAST, "--print-prompt", "--json",
                   env=QUIET)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return re.findall(r"<image_placeholder_(\d+)>", json.loads(done.stdout)["prompt"])


def assert_only_our_lines(stderr: str) -> None:
    lines = stderr.splitlines()
    assert lines, "expected mio's error line"
    assert all(line.startswith(("mio: ", "  hint: ")) for line in lines), stderr


# --- ISO-BMFF (mp4) boxes: just enough to rewrite OpenCV's output ---------------------------------

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf"}


def _parse(data: bytes) -> list[list]:
    boxes, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        assert size >= 8, "OpenCV writes no 64-bit or open-ended boxes into these small files"
        body = data[offset + 8 : offset + size]
        boxes.append([kind, _parse(body) if kind in _CONTAINERS else body])
        offset += size
    return boxes


def _serialise(boxes: list[list]) -> bytes:
    out = b""
    for kind, body in boxes:
        data = _serialise(body) if isinstance(body, list) else body
        out += struct.pack(">I4s", len(data) + 8, kind) + data
    return out


def _find(boxes: list[list], kind: bytes) -> Iterator[list]:
    for box in boxes:
        if box[0] == kind:
            yield box
        if isinstance(box[1], list):
            yield from _find(box[1], kind)


def make_variable_rate(source: Path, target: Path, durations: list[int]) -> Path:
    """`source` (one video track) with per-frame durations in its track timescale: a VFR mp4.

    Phones write the same: one sample-duration table (stts) entry per run of equal durations.
    """
    boxes = _parse(source.read_bytes())
    moov = next(_find(boxes, b"moov"))
    runs: list[list[int]] = []
    for duration in durations:
        if runs and runs[-1][1] == duration:
            runs[-1][0] += 1
        else:
            runs.append([1, duration])
    next(_find([moov], b"stts"))[1] = struct.pack(">II", 0, len(runs)) + b"".join(
        struct.pack(">II", count, duration) for count, duration in runs
    )
    # The track, movie and edit-list durations must match, or the last frames fall outside the edit.
    mdhd = next(_find([moov], b"mdhd"))
    track_scale = struct.unpack(">I", mdhd[1][12:16])[0]
    mdhd[1] = mdhd[1][:16] + struct.pack(">I", sum(durations)) + mdhd[1][20:]
    mvhd = next(_find([moov], b"mvhd"))
    movie_total = round(sum(durations) * struct.unpack(">I", mvhd[1][12:16])[0] / track_scale)
    mvhd[1] = mvhd[1][:16] + struct.pack(">I", movie_total) + mvhd[1][20:]
    tkhd = next(_find([moov], b"tkhd"))
    tkhd[1] = tkhd[1][:20] + struct.pack(">I", movie_total) + tkhd[1][24:]
    for elst in _find([moov], b"elst"):
        elst[1] = elst[1][:8] + struct.pack(">I", movie_total) + elst[1][12:]
    target.write_bytes(_serialise(boxes))
    return target


def make_fast_start(source: Path, target: Path) -> Path:
    """`source` with its index (moov) moved before the data, as web videos are laid out.

    Cut short, such a file still opens and plays its first part, where one with the index at the
    end (OpenCV's) cannot be opened at all.
    """
    boxes = _parse(source.read_bytes())
    moov = next(box for box in boxes if box[0] == b"moov")
    rest = [box for box in boxes if box[0] != b"moov"]
    shift = len(_serialise([moov]))
    for stco in _find([moov], b"stco"):
        count = struct.unpack(">I", stco[1][4:8])[0]
        offsets = struct.unpack(f">{count}I", stco[1][8 : 8 + 4 * count])
        stco[1] = stco[1][:8] + struct.pack(f">{count}I", *(offset + shift for offset in offsets))
    data = next(i for i, box in enumerate(rest) if box[0] == b"mdat")
    target.write_bytes(_serialise([*rest[:data], moov, *rest[data:]]))
    return target


def cut_at(source: Path, target: Path, share: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * share)])
    return target


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference-clips")
    return {
        # 24 fps: 30 frames, a cut to 12 frames, a cut to 30, a cut to 40. PySceneDetect's 15-frame
        # minimum merges the 12 frames into the next scene; half a second (12 frames) did not.
        "scenes": write_scenes(root / "scenes.mp4", [(DARK_RED, 30), (BRIGHT_GREEN, 12), (DARK_BLUE, 30),
                                                     (BRIGHT_YELLOW, 40)], fps=24),
        # No cut: 105 frames, interval 10, so 11 frames.
        "static": write_scenes(root / "static.mp4", [(BRIGHT_GREEN, 105)], fps=24),
    }


# --- keyframes are the reference's ------------------------------------------------------------------


def test_keyframes_are_the_reference_scenes_and_frames(clips, tmp_path):
    entries = keyframes(clips["scenes"], tmp_path / "kf")

    # Scenes [0, 30), [30, 72), [72, 112); the reference's frame of each is start + length // 2.
    assert [e["frame_index"] for e in entries] == [15, 30 + 42 // 2, 72 + 40 // 2]
    assert [e["scene"] for e in entries] == [0, 1, 2]
    assert [e["time_s"] for e in entries] == pytest.approx([15 / 24, 51 / 24, 92 / 24], abs=1e-3)
    assert [colour_of(e, tmp_path / "kf") for e in entries] == [DARK_RED, DARK_BLUE, BRIGHT_YELLOW]


def test_video_prompt_has_one_image_per_reference_scene(clips, tiny_model):
    assert placeholders(clips["scenes"], tiny_model) == ["0", "1", "2"]


def test_without_a_cut_every_interval_th_frame_from_frame_0(clips, tmp_path):
    entries = keyframes(clips["static"], tmp_path / "static")
    assert [e["frame_index"] for e in entries] == list(range(0, 101, 10))
    assert [e["scene"] for e in entries] == list(range(11))

    # --max-frames still caps: an even spread of those 11.
    capped = keyframes(clips["static"], tmp_path / "capped", "--max-frames", "4")
    assert [e["frame_index"] for e in capped] == [10, 40, 60, 90]

    # --uniform and a threshold no cut reaches sample the same way: 112 frames, interval 11.
    uniform = keyframes(clips["scenes"], tmp_path / "uniform", "--uniform")
    assert [e["frame_index"] for e in uniform] == list(range(0, 112, 11))
    high = keyframes(clips["scenes"], tmp_path / "high", "--threshold", "250")
    assert [e["frame_index"] for e in high] == [e["frame_index"] for e in uniform]


# --- variable frame rate ------------------------------------------------------------------------------


def test_variable_frame_rate_keyframes_are_indexed_in_decoding_order(tmp_path, tiny_model):
    # 30 red frames of 1/8 s, 20 green of 1/48 s, 30 blue of 1/8 s (OpenCV's timescale is 12288
    # per second at 24 fps). In timestamps x average rate the green scene is 6 "frames" long.
    constant = write_scenes(tmp_path / "constant.mp4", [(DARK_RED, 30), (BRIGHT_GREEN, 20), (DARK_BLUE, 30)], fps=24)
    video = make_variable_rate(constant, tmp_path / "phone.mp4", [1536] * 30 + [256] * 20 + [1536] * 30)
    capture = cv2.VideoCapture(str(video))
    times = []
    while capture.grab():
        times.append(capture.get(cv2.CAP_PROP_POS_MSEC))
    capture.release()
    assert len(times) == 80 and np.diff(times)[[0, 35, 60]] == pytest.approx([125, 125 / 6, 125], abs=0.1)

    entries = keyframes(video, tmp_path / "kf")

    assert [e["frame_index"] for e in entries] == [15, 40, 65]
    assert [colour_of(e, tmp_path / "kf") for e in entries] == [DARK_RED, BRIGHT_GREEN, DARK_BLUE]
    # Each frame's own presentation time, not index / average rate.
    assert [e["time_s"] for e in entries] == pytest.approx([15 / 8, 30 / 8 + 10 / 48, 30 / 8 + 20 / 48 + 15 / 8],
                                                           abs=1e-3)
    assert placeholders(video, tiny_model) == ["0", "1", "2"]


# --- damaged videos -----------------------------------------------------------------------------------


def test_a_video_cut_short_is_damaged(tmp_path, tiny_model):
    whole = make_fast_start(
        write_scenes(tmp_path / "made.mp4", [(DARK_RED, 40), (BRIGHT_GREEN, 40), (DARK_BLUE, 40)], fps=24),
        tmp_path / "whole.mp4",
    )
    assert len(keyframes(whole, tmp_path / "whole")) == 3
    cut = cut_at(whole, tmp_path / "partial.mp4", 0.4)

    done = run_mio("keyframes", str(cut), "-o", str(tmp_path / "cut"), env=QUIET)
    assert done.returncode == 1
    assert_only_our_lines(done.stderr)
    assert "partial.mp4" in done.stderr and "damaged" in done.stderr and "re-encode" in done.stderr
    assert json.loads((tmp_path / "cut" / "keyframes.json").read_text()) == []

    prompt = run_mio("video-caption", str(cut), "--model", str(tiny_model), *FAST, "--print-prompt", "--json",
                     env=QUIET)
    assert prompt.returncode == 1 and "damaged" in prompt.stderr
    assert_only_our_lines(prompt.stderr)

    # With its index at the end (OpenCV's own layout) a cut mp4 does not open at all.
    unreadable = cut_at(tmp_path / "made.mp4", tmp_path / "no-index.mp4", 0.4)
    done = run_mio("keyframes", str(unreadable), "-o", str(tmp_path / "no-index"), env=QUIET)
    assert done.returncode == 1 and "no-index.mp4 cannot be read as a video" in done.stderr
    assert_only_our_lines(done.stderr)


# --- third-party noise ----------------------------------------------------------------------------------


def test_a_corrupt_mp3_shows_only_our_error(tmp_path, tiny_model):
    good = tmp_path / "tone.mp3"
    t = np.arange(16000) / 16000
    soundfile.write(good, 0.3 * np.sin(2 * np.pi * 440 * t), 16000, format="MP3")
    data = good.read_bytes()
    bad = tmp_path / "garbled.mp3"
    bad.write_bytes(data[:200] + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)))
    args = ("asr", str(bad), "--model", str(tiny_model), *FAST, "--print-prompt")

    done = run_mio(*args, env=QUIET)

    assert done.returncode == 1
    assert_only_our_lines(done.stderr)
    assert "garbled.mp3" in done.stderr
    # libsndfile's own reason for such a file sends the user looking for a missing file or a pipe.
    assert "pipe" not in done.stderr
    # The same input with the libraries' chatter let through: mpg123's notes come first.
    noisy = run_mio(*args, env=VERBOSE)
    assert noisy.returncode == 1 and not noisy.stderr.startswith("mio: ")


def test_corrupt_exif_is_not_reported(tmp_path, tiny_model):
    # An EXIF block whose one entry is cut short: PIL warns, and the picture is fine.
    tiff = b"II*\x00" + struct.pack("<IH", 8, 3) + struct.pack("<HHII", 0x0112, 3, 1, 6) + b"\x01\x02"
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), "red").save(photo, exif=b"Exif\x00\x00" + tiff)
    args = ("tokenize", str(photo), "--model", str(tiny_model), "--device", "cpu")

    done = run_mio(*args, env=QUIET)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("<image>")
    assert "Corrupt EXIF" in run_mio(*args, env=VERBOSE).stderr


def test_a_corrupt_video_shows_only_our_lines(tmp_path):
    video = write_scenes(tmp_path / "clip.mp4", [(DARK_RED, 40), (BRIGHT_GREEN, 40)], fps=24)
    data = bytearray(video.read_bytes())
    rng = np.random.default_rng(1)
    # Garble the middle of the frame data (OpenCV writes the index after it, at the end).
    for start in rng.integers(len(data) // 5, len(data) * 4 // 5, 40):
        data[start : start + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    video.write_bytes(bytes(data))

    done = run_mio("keyframes", str(video), "-o", str(tmp_path / "kf"), env=QUIET)

    if done.returncode == 0:
        assert done.stderr == ""
    else:
        assert_only_our_lines(done.stderr)


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_diffusers_notice_for_bin_weights_is_not_shown(tmp_path, tiny_model):
    # A checkpoint whose VAE has .bin weights only: diffusers logs "An error occurred while trying
    # to fetch ..." (it looked for safetensors first), then loads the .bin fine.
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    vae = model / "stable-diffusion-2-1-unclip" / "vae"
    torch.save(load_file(vae / "diffusion_pytorch_model.safetensors"), vae / "diffusion_pytorch_model.bin")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    tokens = "<image>" + "".join(f"<img{i}>" for i in range(32)) + "</image>"
    args = ("detokenize", tokens, "--model", str(model), *FAST, "--steps", "1", "--size", "64", "--overwrite")

    done = run_mio(*args, "-o", str(tmp_path / "quiet.png"), env=QUIET)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "quiet.png").is_file()
    noisy = run_mio(*args, "-o", str(tmp_path / "noisy.png"), env=VERBOSE)
    assert noisy.returncode == 0 and "error occurred while trying to fetch" in noisy.stderr


# --- miocli.quiet itself ----------------------------------------------------------------------------------


@pytest.fixture()
def libraries_quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(quiet.ENV_VERBOSE, raising=False)
    quiet.set_enabled(True)
    yield
    quiet.set_enabled(True)


def test_silenced_drops_c_level_stderr_and_python_warnings(capfd, libraries_quiet):
    filters = list(warnings.filters)
    os.write(2, b"ours before\n")
    with quiet.silenced():
        os.write(2, b"library noise\n")
        with quiet.silenced():  # nested: still silenced, and the outer block restores
            os.write(2, b"more noise\n")
        os.write(2, b"still noise\n")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    os.write(2, b"ours after\n")

    assert capfd.readouterr().err == "ours before\nours after\n"
    assert warnings.filters == filters
    with pytest.warns(UserWarning):
        warnings.warn("shown again outside", UserWarning, stacklevel=1)


def test_silenced_restores_stderr_when_the_call_fails(capfd, libraries_quiet):
    with pytest.raises(ValueError), quiet.silenced():
        raise ValueError("a library failed")
    os.write(2, b"our error line\n")
    assert capfd.readouterr().err == "our error line\n"


def test_silenced_from_several_threads(capfd, libraries_quiet):
    inside = threading.Barrier(3)

    def library_call() -> None:
        with quiet.silenced():
            inside.wait()
            os.write(2, b"thread noise\n")
            inside.wait()

    threads = [threading.Thread(target=library_call) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait()
    inside.wait()
    for thread in threads:
        thread.join()
    os.write(2, b"ours\n")
    assert capfd.readouterr().err == "ours\n"


@pytest.mark.parametrize("how", ["set_enabled", "environment"])
def test_silenced_is_off_when_verbose(capfd, libraries_quiet, monkeypatch, how):
    if how == "set_enabled":
        quiet.set_enabled(False)
    else:
        monkeypatch.setenv(quiet.ENV_VERBOSE, "1")
    with quiet.silenced():
        os.write(2, b"library says\n")
    assert capfd.readouterr().err == "library says\n"
