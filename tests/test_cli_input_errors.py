"""Errors name the input as the user gave it, with a hint that fits the task (through the real `mio`).

A path is named as typed; an inline prompt or text by its first 40 characters and its size, never whole.
The hint says what fills the prompt and how to shorten that: text, a recording, a video's frames.
A copy of the tiny checkpoint with a 256-token context makes "too long" small.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mio_testing import run_mio
from miocli.core.inputs import Item, Media, input_label
from test_cli_video import write_video

CONTEXT = 256
LONG = "hello world " * 3000  # 36 KB


@pytest.fixture(scope="module")
def short_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-context-256")
    for entry in tiny_model.iterdir():
        if entry.name != "config.json":
            (folder / entry.name).symlink_to(entry)
    config = json.loads((tiny_model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _error(done) -> tuple[str, str]:
    lines = done.stderr.splitlines()
    assert lines and lines[0].startswith("mio: error: "), done.stderr
    hint = next((line for line in lines if line.strip().startswith("hint:")), "")
    assert len(lines[0]) < 400, "the input must not be printed whole"
    return lines[0], hint


def test_generate_names_a_long_prompt_by_its_start_and_size(short_model: Path) -> None:
    done = run_mio("generate", LONG, "--model", str(short_model), "--max-new-tokens", "4")
    assert done.returncode == 1
    line, hint = _error(done)
    assert line.startswith('mio: error: prompt (36 KB) "hello world hello world')
    assert f"the model reads at most {CONTEXT} tokens and this prompt has" in hint and "shorten it" in hint
    assert "frames" not in hint and "recording" not in hint


def test_generate_from_stdin_is_named_the_same_way(short_model: Path) -> None:
    done = run_mio("generate", "-", "--model", str(short_model), "--max-new-tokens", "4", stdin=LONG + "\n")
    line, hint = _error(done)
    assert line.startswith('mio: error: prompt (36 KB) "hello') and "shorten it" in hint


def test_labels() -> None:
    assert input_label(Item("a short prompt", prompt="x")) == "a short prompt"
    assert input_label(Item("two\nlines", prompt="x")) == 'prompt (9 bytes) "two lines…"'
    assert input_label(Item("é" * 600, {"text": "é"})) == f'text (1 KB) "{"é" * 40}…"'
    long_path = "/data/" + "x" * 80 + ".wav"
    assert input_label(Item(long_path, media=[Media("audio", long_path, path=Path(long_path))])) == long_path


def test_tts_long_text_gets_the_text_hint(short_model: Path, tmp_path: Path) -> None:
    done = run_mio("tts", LONG, "--model", str(short_model), "-o", str(tmp_path))
    line, hint = _error(done)
    assert line.startswith('mio: error: text (36 KB) "hello world')
    assert "this prompt has" in hint and "shorten it" in hint


def test_video_gets_the_frames_hint_and_its_path(short_model: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "long.mp4", [(120, 20, 20), (30, 230, 230)] * 4)
    done = run_mio("video-caption", str(video), "--model", str(short_model), "--max-frames", "12", "--uniform",
                   "--max-new-tokens", "4")
    line, hint = _error(done)
    assert line.startswith(f"mio: error: {video}: ")
    assert "--max-frames" in hint and "fewer frames" in hint


def test_speech_gets_the_recording_hint_and_its_path(short_model: Path, tmp_path: Path) -> None:
    wav = tmp_path / "long.wav"
    t = np.arange(16000 * 12) / 16000
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    done = run_mio("speech2speech", str(wav), "--model", str(short_model), "-o", str(tmp_path / "out"),
                   "--max-new-tokens", "40")
    line, hint = _error(done)
    assert line.startswith(f"mio: error: {wav}: ")
    assert "mio asr" in hint and "splits long recordings" in hint


def test_keyframes_too_many_for_memory_are_refused_before_work(tmp_path: Path) -> None:
    """160x120 frames take 173 KB each (three copies): 102 MB leaves room for 11 besides the decoder's 100 MB."""
    video = write_video(tmp_path / "clip.mp4", [(120, 20, 20), (30, 230, 230), (20, 20, 140)])
    out = tmp_path / "frames"
    done = run_mio("keyframes", str(video), "-o", str(out), "--max-frames", "20", env={"MIO_MEMORY_LIMIT": "102M"})
    assert done.returncode == 3, done.stderr
    line, hint = _error(done)
    assert line.startswith(f"mio: error: {video} (160x120, 60 frames) needs about") and "keyframes" in line
    assert "--max-frames 11 fits" in hint
    assert not out.exists() or not any(out.glob("*.png"))
    assert run_mio("keyframes", str(video), "-o", str(out), "--max-frames", "11",
                   env={"MIO_MEMORY_LIMIT": "102M"}).returncode == 0
