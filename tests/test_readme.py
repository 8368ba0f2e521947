"""Every `mio` command of the README's shell blocks, run as written with `--model tiny` (issue 26).

The README promises that each example runs with `--model tiny` added. This runs them: each bash block
in order, in one folder holding the files the examples name (photo.jpg, talk.flac, clip.mp4, …), with
`--model tiny` in place of any model they name (MIO_MODEL=tiny for the rest, which is the same). A
line ending in `&` (mio serve) runs in the background on a free port until its block ends. Lines that
install or download are not run (NOT_RUN says why). Several minutes in all: CI runs it (`-m ci`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mio_testing import MIO_COMMAND, free_port

pytestmark = pytest.mark.ci

README = Path(__file__).resolve().parents[1] / "README.md"
# Lines that are not mio at work, and why they are left out.
NOT_RUN = {
    "pip install": "installs the project: CI has installed it before the tests run",
    "mio download": "downloads the real model: nothing here reaches the hub, and `mio download` has tests",
}
RATE = 16000


def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash block, continuation lines joined."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines: list[str] = []
        for raw in body.splitlines():
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1].rstrip() + " " + raw.strip()
            elif raw.strip() and not raw.lstrip().startswith("#"):
                # The README's comments stand two spaces or more after the command.
                lines.append(re.sub(r"\s{2,}#.*$", "", raw.strip()))
        blocks.append([line for line in lines if not any(line.startswith(prefix) for prefix in NOT_RUN)])
    return [block for block in blocks if any(re.search(r"\bmio\s", line) for line in block)]


def on_tiny(line: str) -> str:
    """The line with `--model tiny` for the model it names (it runs on MIO_MODEL=tiny otherwise)."""
    return re.sub(r"--model\s+\S+", "--model tiny", line)


def _tone(seconds: float, pitch: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def _picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with every file the README's examples name."""
    from miocli.media.video import assemble_video

    folder = tmp_path_factory.mktemp("readme")
    for n, name in enumerate(["photo.jpg", "cat.png", "dog.png", "boxes.png", "photos/a.png", "photos/b.jpg",
                              "photos/more/c.png"]):
        _picture(folder / name, n)
    for n, name in enumerate(["talk.flac", "talk.wav", "question.wav", "talks/one.flac", "talks/two.flac"]):
        (folder / name).parent.mkdir(exist_ok=True)
        soundfile.write(folder / name, _tone(1.5, 220 + 40 * n), RATE)
    # Two shots: four dark frames, then four bright ones (a cut for video-caption and `ask clip.mp4`).
    frames = [Image.new("RGB", (64, 64), (20, 30, 40) if n < 4 else (220, 200, 90)) for n in range(8)]
    assemble_video(frames, folder / "clip.mp4", 2.0)
    (folder / "conversation.json").write_text(json.dumps([{"role": "user", "content": "Hello, who are you?"}]))
    (folder / "talk.json").write_text(json.dumps([{"role": "system", "content": "You are MIO."},
                                                  {"role": "user", "content": "Say hello."}]))
    (folder / "hand-built-prompt.txt").write_text("Question: what is a kite? Answer:")
    (folder / "lines.txt").write_text("Hello there.\nGood morning.\n")
    return folder


def _wait_for_server(url: str, process: subprocess.Popen[str], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the server at {url} did not answer in {seconds} s")


def _run_block(lines: list[str], cwd: Path, env: dict[str, str]) -> Iterator[str]:
    """Run one block's lines in order; yields a description of each line that failed."""
    servers: list[subprocess.Popen[str]] = []
    port = str(free_port())
    try:
        for line in lines:
            line = on_tiny(line.replace("8765", port))
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                env[name] = os.path.expandvars(value)
                continue
            if line.endswith("&"):
                command = shlex.split(line[:-1])
                if command[:2] == ["mio", "serve"] and "--port" not in command:
                    command += ["--port", port]  # its default, 8765, may be taken here
                server = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True)
                servers.append(server)
                _wait_for_server(f"http://127.0.0.1:{port}", server)
                continue
            # `-i` sessions read their turns from stdin: one turn, then end of input.
            stdin = "Hello.\n" if re.search(r"\s-i(\s|$)", line) else ""
            done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, input=stdin, capture_output=True,
                                  text=True, timeout=600)
            if done.returncode != 0:
                yield f"{line}\n  exit {done.returncode}: {done.stderr.strip()[-600:]}"
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def test_the_readme_has_examples_to_run():
    blocks = bash_blocks(README.read_text(encoding="utf-8"))
    assert sum(len(block) for block in blocks) > 25


@pytest.mark.parametrize("number", range(len(bash_blocks(README.read_text(encoding="utf-8")))))
def test_every_readme_command_runs_on_the_tiny_checkpoint(number, workspace, tiny_model, tiny_cache, tmp_path):
    lines = bash_blocks(README.read_text(encoding="utf-8"))[number]
    # Each block in a fresh copy: blocks are separate examples, and outputs are never overwritten.
    folder = tmp_path / "work"
    shutil.copytree(workspace, folder)
    mio_folder = str(Path(MIO_COMMAND[0]).parent) if len(MIO_COMMAND) == 1 else ""
    env = {k: v for k, v in os.environ.items() if k not in ("MIO_MODEL", "MIO_SERVER")}
    # The session's tiny checkpoint is what `--model tiny` finds in this cache: nothing is built twice.
    env.update(MIO_MODEL="tiny", MIO_CACHE=str(tiny_cache), PATH=f"{mio_folder}{os.pathsep}{env.get('PATH', '')}")
    failures = list(_run_block(lines, folder, env))
    assert not failures, "README commands that failed on the tiny checkpoint:\n" + "\n".join(failures)
