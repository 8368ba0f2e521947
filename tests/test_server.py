"""`mio serve` and `mio … --server`: a real server process on a free loopback port, the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mio_testing import MIO_COMMAND, Server, free_port, run_mio

FAST = ["--max-new-tokens", "8", "--beams", "1"]
PIXELS = ["--steps", "2", "--size", "64", "--seed", "0"]


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[Server]:
    running = Server(tiny_model, "--batch-window", "0.3")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(2)
    for n in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"img{n}.png")
    (folder / "broken.png").write_text("not an image")
    t = np.arange(16000) / 16000
    soundfile.write(folder / "tone.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype("float32"), 16000)
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def assert_same_as_in_process(server: Server, tiny_model: Path, tmp_path: Path, *args: str, out: bool = False,
                              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command over --server writes exactly what it writes in process: stdout, stderr, exit code, files."""
    runs = {}
    for where, flag in (("remote", ["--server", server.url]), ("local", ["--model", str(tiny_model)])):
        folder = tmp_path / where
        extra = ["-o", str(folder)] if out else []
        runs[where] = run_mio(*args, *flag, *extra, stdin=stdin)
    remote, local = runs["remote"], runs["local"]
    replace = (str(tmp_path / "remote"), str(tmp_path / "local"))
    assert (remote.returncode, remote.stdout.replace(*replace), remote.stderr.replace(*replace)) == (
        local.returncode, local.stdout, local.stderr)
    assert files_of(tmp_path / "remote") == files_of(tmp_path / "local")
    return remote


@pytest.mark.ci  # each case runs the command twice; test_server_openai and the playground cover the server too
@pytest.mark.parametrize("args", [
    ("caption", "{inputs}", *FAST, "--json"),
    ("caption", "{inputs}", *FAST, "-b", "2"),
    ("asr", "{inputs}/tone.wav", *FAST, "--json"),
    ("ask", "{inputs}/img1.png", "What is it?", *FAST),
    ("tts", "hello there", "hi", "--max-new-tokens", "40", "--seed", "4", "--json"),
    ("imagine", "a red kite", "--max-new-tokens", "40", "--beams", "1", *PIXELS),
    ("generate", "Question: why? Answer:", *FAST),
    ("chat", "What is MIO?", *FAST, "--json"),
    ("tokenize", "{inputs}/img2.png"),
    ("cot-visual", "How many?", "--image", "{inputs}/img3.png", "--max-new-tokens", "40", "--beams", "1", *PIXELS),
    ("interleave", "a red kite", "--max-new-tokens", "200", *PIXELS[:-1], "--seed", "2"),
])
def test_commands_over_the_server_match_in_process(server, tiny_model, inputs, tmp_path, args):
    args = tuple(a.replace("{inputs}", str(inputs)) for a in args)
    writes = args[0] in ("tts", "imagine", "cot-visual", "interleave") or "-b" in args
    done = assert_same_as_in_process(server, tiny_model, tmp_path, *args, out=writes)
    assert "Traceback" not in done.stderr


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_detokenize_over_the_server(server, tiny_model, inputs, tmp_path):
    tokens = run_mio("tokenize", str(inputs / "img0.png"), "--server", server.url).stdout.strip()
    for where, flag in (("remote", ["--server", server.url]), ("local", ["--model", str(tiny_model)])):
        done = run_mio("detokenize", tokens + tokens, "-o", str(tmp_path / f"{where}.png"), *flag, "--steps", "2",
                       "--size", "64", "--seed", "1")
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    assert (tmp_path / "remote-2.png").read_bytes() == (tmp_path / "local-2.png").read_bytes()


def test_a_client_imports_no_model_library(server, inputs):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "miocli", "caption", str(inputs / "img0.png"),
                           "--server", server.url, *FAST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers", "diffusers", "cv2", "fastapi", "uvicorn"} & imported


def test_server_answers_health_and_logs_one_line_per_request(server, inputs):
    run_mio("caption", str(inputs / "img0.png"), "--server", server.url, *FAST)
    health = server.health()
    assert health["status"] == "ok" and {"tokenizer", "llm", "seed"} <= set(health["loaded"])
    assert health["memory_bytes"] > 0 and health["requests"] >= 1


def test_concurrent_requests_share_a_generation_batch(server, inputs):
    before = server.health()
    body = {"inputs": [{"name": "img", "media": [{"kind": "image", "name": "img.png", "data": ""}]}],
            "settings": {"max_new_tokens": 8, "beams": 1, "seed": 0}}
    import base64

    body["inputs"][0]["media"][0]["data"] = base64.b64encode((inputs / "img4.png").read_bytes()).decode()
    answers: list[tuple[int, bytes]] = []
    threads = [threading.Thread(target=lambda: answers.append(server.post("/v1/run/caption", body)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = server.health()
    assert [status for status, _ in answers] == [200] * 4
    texts = {json.loads(raw.splitlines()[0])["result"]["text"] for _, raw in answers}
    assert len(texts) == 1  # the same input and seed: the same answer in any batch
    assert after["inputs"] - before["inputs"] == 4 and after["batches"] - before["batches"] < 4


def test_bad_requests_get_4xx_json_and_harm_no_other(server, inputs):
    status, raw = server.post("/v1/run/caption", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    status, raw = server.post("/v1/run/paint", {"inputs": [{"name": "x"}]})
    assert status == 400 and "unknown task" in json.loads(raw)["error"]["message"]
    status, raw = server.post("/v1/run/caption", {"inputs": [{"name": "x"}], "settings": {"colour": "red"}})
    assert status == 400 and "unknown setting" in json.loads(raw)["error"]["message"]
    status, raw = server.post("/v1/run/caption", {"inputs": "x"})
    assert status == 400
    status, raw = server.request("POST", "/v1/run/caption", b"x" * 10, {"Content-Length": str(65 * 2**20)})
    assert status == 413
    # A corrupt image is that input's error; the good one next to it is answered.
    import base64

    good = base64.b64encode((inputs / "img0.png").read_bytes()).decode()
    body = {"inputs": [{"name": "bad.png", "media": [{"kind": "image", "name": "bad.png", "data": "AAAA"}]},
                       {"name": "good.png", "media": [{"kind": "image", "name": "good.png", "data": good}]}],
            "settings": {"max_new_tokens": 8, "beams": 1}}
    status, raw = server.post("/v1/run/caption", body)
    lines = [json.loads(line)["result"] for line in raw.splitlines()]
    assert status == 200 and "error" in lines[0] and "error" not in lines[1]
    assert server.health()["status"] == "ok"


def test_a_killed_client_loses_only_its_batch_and_the_server_carries_on(server, inputs, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([*MIO_COMMAND, "caption", str(inputs), "--server", server.url, *FAST, "-b", "1",
                                "-o", str(out), "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    assert process.stdout is not None
    first = json.loads(process.stdout.readline())
    process.kill()
    process.wait()
    assert "error" in first or (out / first["files"][0]).is_file()
    resumed = run_mio("caption", str(inputs), "--server", server.url, *FAST, "-o", str(out), "--skip-existing")
    assert resumed.returncode == 1  # broken.png
    assert len(list(out.glob("*.caption.txt"))) == 5 and server.health()["status"] == "ok"


def test_the_key_and_the_bind_address(tiny_model, inputs):
    refused = run_mio("serve", "--model", str(tiny_model), "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 2 and "--api-key" in refused.stderr
    keyed = Server(tiny_model, "--api-key", "s3cret")
    try:
        assert keyed.get("/health")[0] == 401
        assert keyed.request("GET", "/health", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert keyed.request("GET", "/health", headers={"Authorization": "Bearer s3cret"})[0] == 200
        no_key = run_mio("caption", str(inputs / "img0.png"), "--server", keyed.url, *FAST)
        assert no_key.returncode == 2 and "API key" in no_key.stderr
        with_key = run_mio("caption", str(inputs / "img0.png"), "--server", keyed.url, *FAST,
                           env={"MIO_API_KEY": "s3cret"})
        assert with_key.returncode == 0, with_key.stderr
    finally:
        keyed.stop()


def test_unreachable_server_is_one_clear_error(inputs):
    done = run_mio("caption", str(inputs / "img0.png"), "--server", f"http://127.0.0.1:{free_port()}", *FAST)
    assert done.returncode == 3 and "cannot reach mio serve" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_sigterm_finishes_in_flight_work_and_idle_unload(tiny_model, inputs):
    running = Server(tiny_model, "--idle-unload", "1s")
    client = subprocess.Popen([*MIO_COMMAND, "caption", str(inputs), "--server", running.url, "--max-new-tokens",
                               "64", "--beams", "1", "-b", "6", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    while running.health()["requests"] == 0:
        time.sleep(0.05)
    err = running.stop()
    assert running.process.returncode == 0 and "stopped" in err
    out, client_err = client.communicate(timeout=120)
    assert client.returncode == 1, client_err  # broken.png; every other input answered
    assert len(out.splitlines()) == 6 and "Traceback" not in err
    idle = Server(tiny_model, "--idle-unload", "1s")
    try:
        run_mio("caption", str(inputs / "img0.png"), "--server", idle.url, *FAST)
        assert idle.health()["loaded"]
        time.sleep(2.5)
        assert idle.health()["loaded"] == []
    finally:
        idle.stop()
