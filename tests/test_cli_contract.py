"""The first-hour contract (issue 26): stdout paths with -o, errors that name their input once, folder skips
counted, reruns without duplicate error records, `--model tiny`, `mio list`, `mio --version`, help panels."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mio_testing import MIO_COMMAND, run_mio

FAST = ["--max-new-tokens", "2", "--beams", "1"]


@pytest.fixture(scope="module")
def junk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two pictures, one broken picture, and files that are not pictures."""
    folder = tmp_path_factory.mktemp("junk")
    for n in range(2):
        Image.fromarray(np.full((24, 24, 3), 40 * n, np.uint8)).save(folder / f"p{n}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    for name in ("readme.txt", "sine.wav", "broken.mp4"):
        (folder / name).write_bytes(b"x")
    (folder / ".DS_Store").write_bytes(b"x")
    return folder


def test_a_folder_run_counts_its_skips_and_prints_the_paths_it_wrote(tiny_model, junk, tmp_path):
    out = tmp_path / "out"
    for _ in range(3):
        done = run_mio("caption", str(junk), "--model", str(tiny_model), *FAST, "-o", str(out), "--skip-existing")
        assert done.returncode == 1, done.stderr
        assert "skipped 3: not images (broken.mp4, readme.txt, sine.wav)" in done.stderr
    first = run_mio("caption", str(junk), "--model", str(tiny_model), *FAST, "-o", str(tmp_path / "fresh"))
    assert first.stdout.splitlines() == [str(tmp_path / "fresh" / f"p{n}.caption.txt") for n in range(2)]
    assert all(Path(line).is_file() for line in first.stdout.splitlines())
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    errors = [r for r in records if "error" in r]
    assert [r["input"] for r in errors] == [str(junk / "broken.png")]  # one record for three runs
    # The name once in the error line, not "broken.png: ... broken.png".
    line = next(line for line in first.stderr.splitlines() if line.startswith("mio: error:"))
    assert line.count("broken.png") == 1, line


def test_every_file_command_prints_the_paths_it_wrote(tiny_model, tmp_path):
    out = tmp_path / "speech"
    done = run_mio("tts", "hello", "again", "--model", str(tiny_model), "--max-new-tokens", "20", "--beams", "1",
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    written = sorted(str(path) for path in out.iterdir() if path.name != "manifest.jsonl")
    assert sorted(done.stdout.splitlines()) == written and str(out / "002-again.tts.wav") in written


def test_an_existing_file_as_the_output_folder_is_a_usage_error(tiny_model, tmp_path):
    (tmp_path / "afile").write_text("x")
    done = run_mio("caption", "nothere.png", "--model", str(tiny_model), "-o", str(tmp_path / "afile"))
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr and "Traceback" not in done.stderr


def test_the_missing_model_hint_and_the_tiny_name(tiny_cache, tiny_model, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "MIO_CACHE": str(tiny_cache)}
    missing = run_mio("chat", "hi", env=env, cwd=tmp_path)
    assert missing.returncode == 3
    assert "mio download m-a-p/MIO-7B-Instruct" in missing.stderr and "--model tiny" in missing.stderr
    assert all(len(line) <= 200 for line in missing.stderr.splitlines()), missing.stderr
    chat = run_mio("chat", "hi", "--model", "tiny", *FAST, env=env, cwd=tmp_path)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    listed = run_mio("list", "--json", env=env)
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == ["tiny"]
    assert json.loads(listed.stdout)["path"] == str(tiny_model)


def test_version_and_help_panels():
    version = run_mio("--version")
    assert version.returncode == 0 and version.stdout.startswith("mio ")
    help_text = run_mio("imagine", "--help").stdout
    sections = [line.rstrip(":") for line in help_text.splitlines() if line.endswith(":") and not line[0].isspace()]
    assert sections[:3] == ["Arguments", "Options", "Pixels"]
    assert sections.index("Model and device") < sections.index("Engines and server") < sections.index("Ray cluster")
    assert "CPU: mio's own" in help_text  # --quantize says what happens on the CPU too


def _run_on_a_terminal(*args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run mio with stderr on a pseudo-terminal (what a user's shell gives it); stdout stays a pipe."""
    primary, secondary = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        # The bars redraw often: read as they come so the terminal's buffer never fills and blocks mio.
        while True:
            try:
                data = os.read(primary, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {k: v for k, v in os.environ.items() if k != "MIO_MODEL"}
    done = subprocess.run([*MIO_COMMAND, *args], stdout=subprocess.PIPE, stderr=secondary, text=True, env=env,
                          timeout=300)
    os.close(secondary)
    reader.join(timeout=10)
    os.close(primary)
    return done, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_imagine_draws_at_the_decoders_own_size_with_its_steps_shown_on_a_terminal(tiny_model, tmp_path):
    done, terminal = _run_on_a_terminal("imagine", "a red kite", "--model", str(tiny_model), "--beams", "1",
                                        "--steps", "4", "-o", str(tmp_path / "tty"))
    assert done.returncode == 0, terminal
    written = Path(done.stdout.strip())
    # The tiny unCLIP's UNet is 8 latents wide with the VAE's factor 8: a 64 px model, not a 768 px one.
    assert Image.open(written).size == (64, 64)
    assert "denoising" in terminal
    piped = run_mio("imagine", "a red kite", "--model", str(tiny_model), "--beams", "1", "--steps", "2",
                    "--size", "128", "-o", str(tmp_path / "pipe"))
    assert piped.returncode == 0, piped.stderr
    assert Image.open(piped.stdout.strip()).size == (128, 128)
    # No terminal, no bars: stderr stays clean for logs.
    assert "denoising" not in piped.stderr and "\x1b[" not in piped.stderr
