"""Every script in examples/ runs, on the tiny checkpoint, the way its header says to run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAST = ["--max-new-tokens", "8", "--beams", "1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for n in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"photo{n}.png")
    (folder / "nested").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "nested" / "deep.jpg")
    return folder


def env_for(model: Path) -> dict[str, str]:
    return {**os.environ, "MIO_MODEL": str(model)}


@pytest.mark.ci  # slow (a process per step); .ci/run runs the ci mark
def test_caption_folder_script_resumes(tiny_model, photos, tmp_path):
    script = EXAMPLES / "caption_folder.sh"
    out = tmp_path / "captions"
    first = subprocess.run([str(script), str(photos), str(out), *FAST, "-b", "4"], capture_output=True, text=True,
                           env=env_for(tiny_model), timeout=300)
    assert first.returncode == 0, first.stderr
    assert "6 captions" in first.stderr and "(0 failed)" in first.stderr
    (out / "photo2.caption.txt").unlink()  # as if that one had been interrupted
    again = subprocess.run([str(script), str(photos), str(out), *FAST], capture_output=True, text=True,
                           env=env_for(tiny_model), timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("skipping") == 5 and (out / "photo2.caption.txt").is_file()


def test_drive_mio_reads_json_records_as_they_come(tiny_model, tmp_path):
    t = np.arange(16000) / 16000
    talk = tmp_path / "talk.wav"
    soundfile.write(talk, (0.3 * np.sin(2 * np.pi * 250 * t)).astype("float32"), 16000)
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    done = subprocess.run([sys.executable, str(EXAMPLES / "drive_mio.py"), str(talk), str(broken), "--", *FAST],
                          capture_output=True, text=True, env=env_for(tiny_model), timeout=300)
    assert done.returncode == 1, done.stderr  # one input failed, the other was transcribed
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{talk}\t") and lines[1].startswith(f"FAILED {broken}:")


def test_python_api_example(tiny_model, photos, tmp_path):
    out = tmp_path / "api"
    done = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), str(photos), str(out), "--model",
                           str(tiny_model), "--steps", "2", "--size", "64", "--max-new-tokens", "40"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len([line for line in done.stdout.splitlines() if line.startswith(str(photos))]) == 5
    with Image.open(out / "painting.png") as picture:
        assert picture.size == (64, 64)
    assert soundfile.info(out / "caption.wav").samplerate == 16000


def test_chat_media_example(tiny_model, photos, tmp_path):
    t = np.arange(16000) / 16000
    talk = tmp_path / "talk.wav"
    soundfile.write(talk, (0.3 * np.sin(2 * np.pi * 250 * t)).astype("float32"), 16000)
    done = subprocess.run([sys.executable, str(EXAMPLES / "chat_media.py"), str(photos / "photo0.png"), str(talk),
                           str(tmp_path / "out"), "--model", str(tiny_model), "--steps", "1", "--size", "64",
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()[:3]] == ["answer 1", "answer 2", "answer 3"]
    assert "6 turns" in done.stdout


def test_every_example_has_a_test():
    tested = {"caption_folder.sh", "drive_mio.py", "python_api.py", "chat_media.py"}
    assert {p.name for p in EXAMPLES.iterdir() if p.is_file()} == tested
