"""`mio serve` under real clients: token streaming, hang-ups, timeouts and seeded requests sharing batches.

A real server on a free loopback port, driven by the openai SDK, raw sockets and the `--server` client.
How much a cancelled request generated is read from /health's `tokens` (answer tokens generated in all),
not from timings.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mio_testing import Server, one_torch_thread  # noqa: F401 (autouse fixture)
from miocli import Mio

openai = pytest.importorskip("openai")

# No decodable-output rule: the random tiny model then does not stop early, so a cut shows.
FREE = {"beams": 1, "constrain": False}
# The tiny model makes about 1400 tokens a second on one CPU thread (2 cores, December 2026): a request of
# LONG tokens runs for seconds, well past the half second these tests wait before leaving.
LONG = 4000


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[Server]:
    # A wide batch window, so that requests sent together are batched together.
    running = Server(tiny_model, "--batch-window", "0.3", env={"OMP_NUM_THREADS": "1"})
    try:
        yield running
    finally:
        log = running.stop()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def mio(tiny_model: Path) -> Mio:
    return Mio(str(tiny_model), device="cpu")


def body(tokens: int, **extra: Any) -> bytes:
    return json.dumps({"model": "mio", "messages": [{"role": "user", "content": "Tell me a story"}],
                       "max_tokens": tokens, "seed": 0, **FREE, **extra}).encode()


def send_raw(server: Server, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (server.port, len(data)) + data)
    return sock


def settled_tokens(server: Server, timeout_s: float = 120.0) -> int:
    """/health's token count once the worker is idle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = server.health()
        if not health["busy"]:
            return int(health["tokens"])
        time.sleep(0.1)
    raise AssertionError("the worker stayed busy")


def test_a_streamed_answer_comes_a_few_tokens_per_chunk_and_equals_the_whole_one(client: Any, mio: Mio):
    stream = client.chat.completions.create(model="mio", messages=[{"role": "user", "content": "Tell me a story"}],
                                            max_tokens=96, seed=0, stream=True, stream_options={"include_usage": True},
                                            extra_body=FREE)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    tokens = chunks[-1].usage.completion_tokens
    assert tokens == 96 and len(pieces) >= tokens / 4, (len(pieces), tokens)
    assert "".join(pieces) == mio.chat("Tell me a story", max_new_tokens=96, seed=0, **FREE).text


def test_a_streamed_request_with_beams_gets_its_answer_whole(client: Any, mio: Mio):
    chunks = list(client.chat.completions.create(
        model="mio", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, seed=0, stream=True,
        extra_body={"beams": 2}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == [mio.chat("Hello there", max_new_tokens=8, seed=0, beams=2).text]


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_a_client_that_hangs_up_stops_its_generation(server: Server, streamed: bool):
    before = settled_tokens(server)
    sock = send_raw(server, body(LONG, stream=streamed))
    if streamed:
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    else:
        time.sleep(0.5)
    sock.close()
    generated = settled_tokens(server) - before
    assert 0 < generated < LONG / 2, generated
    # The next request is answered as usual.
    status, _ = server.post("/v1/chat/completions", json.loads(body(4)))
    assert status == 200


def test_a_request_past_its_timeout_stops_its_generation(tiny_model: Path):
    running = Server(tiny_model, "--request-timeout", "0.5", env={"OMP_NUM_THREADS": "1"})
    try:
        while running.post("/v1/chat/completions", json.loads(body(4)))[0] != 200:
            pass  # the first requests load the model, which may take longer than the timeout
        before = settled_tokens(running)
        status, raw = running.post("/v1/chat/completions", json.loads(body(LONG)))
        assert status == 504 and json.loads(raw)["error"]["code"] == "timeout"
        assert settled_tokens(running) - before < LONG
    finally:
        log = running.stop()
    assert running.process.returncode == 0, log


def test_concurrent_requests_with_different_seeds_share_a_batch_and_answer_as_alone(server: Server, mio: Mio):
    def ask(seed: int) -> str:
        request = {"model": "mio", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
                   "seed": seed, "temperature": 0.8, **FREE}
        status, raw = server.post("/v1/chat/completions", request)
        assert status == 200, raw
        return json.loads(raw)["choices"][0]["message"]["content"]

    settled_tokens(server)
    batches = server.health()["batches"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [1, 2, 3, 4]))
    assert server.health()["batches"] - batches < 4
    assert answers == [mio.chat("Hello there", max_new_tokens=12, seed=seed, sample=True, temperature=0.8,
                                **FREE).text for seed in (1, 2, 3, 4)]


def test_the_server_client_shows_the_answer_as_it_comes(server: Server, mio: Mio):
    from miocli.serve.client import RemoteMio

    pieces: list[str] = []
    reply = RemoteMio(server.url).chat("Tell me a story", on_text=pieces.append, max_new_tokens=40, seed=0, **FREE)
    assert len(pieces) > 1 and "".join(pieces) == reply.text
    assert reply.text == mio.chat("Tell me a story", max_new_tokens=40, seed=0, **FREE).text
