"""`mio serve` under real clients, on the tiny checkpoint: streaming, hang-ups, timeouts, seeded batches.

Starts the real server (`python -m miocli serve --model TINY --device cpu --port FREE`) from this checkout,
or from the source folders given with `--src` (e.g. an older checkout's `src/`, for before/after figures in
one run), each with OMP_NUM_THREADS=1. Figures per server:

1. Streaming: a `stream: true` chat of `--tokens` new tokens (one beam, seed 0, no decodable-output rule so
   the random model does not stop early): content chunks, completion tokens, tokens per chunk, time to the
   first content chunk and to the whole answer, their ratio.
2. Hang-up: an idle 4-token answer's latency (median of 5); then a client starts a `--tokens` answer (plain,
   not streamed), hangs up after 0.5 s, and a 4-token answer is sent at once: its latency, minus the idle one.
   The same for a streamed client that hangs up after its first chunk, and for a request that runs past
   `--request-timeout` (a second server started with `--request-timeout 1`).
3. Seeded requests: 4 concurrent sampled chats of 32 tokens (temperature 0.8) with seeds 1-4, against the same 4
   sent one after another: wall time ratio (concurrent / sequential), identical answers.
4. Throughput: 8 client threads × 4 chats of 16 tokens (seed 0): requests/s, and the server's batches.

Run: python benchmarks/serve_clients.py [--tokens 96] [--src OLD/src --src NEW/src]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HEALTH_WAIT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, model: Path, src: str | None, *extra: str) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if src:
            env["PYTHONPATH"] = src
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed at stop)
        self.process = subprocess.Popen([sys.executable, "-m", "miocli", "serve", "--model", str(model), "--device",
                                         "cpu", "--port", str(self.port), *extra], env=env, stderr=self.log)
        deadline = time.monotonic() + HEALTH_WAIT_S
        while time.monotonic() < deadline:
            try:
                self.call("GET", "/health")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()

    def health(self) -> dict[str, Any]:
        return json.loads(self.call("GET", "/health")[1])

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


def chat_body(text: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "mio", "messages": [{"role": "user", "content": text}], "max_tokens": tokens, "seed": 0,
            "beams": 1, "constrain": False, **extra}


def timed_chat(server: Server, tokens: int = 4, expect_ok: bool = True, **extra: Any) -> float:
    start = time.perf_counter()
    status, _ = server.call("POST", "/v1/chat/completions", chat_body("Hello there", tokens, **extra))
    if expect_ok:
        assert status == 200, status
    elif status != 200:
        raise TimeoutError(status)
    return time.perf_counter() - start


def streamed(server: Server, tokens: int) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    body = json.dumps(chat_body("Tell me a story", tokens, stream=True, stream_options={"include_usage": True}))
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first, chunks, usage = None, 0, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        data = json.loads(line[6:])
        if data.get("usage"):
            usage = data["usage"]["completion_tokens"]
        for choice in data.get("choices", []):
            if choice["delta"].get("content"):
                chunks += 1
                first = first if first is not None else time.perf_counter() - start
    whole = time.perf_counter() - start
    return {"chunks": chunks, "tokens": usage, "first": first or whole, "whole": whole}


def hang_up(server: Server, tokens: int, stream: bool) -> float:
    """A client that leaves mid-answer, then the next 4-token answer's latency."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps(chat_body("Tell me a story", tokens, stream=stream)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (server.port, len(body)) + body)
    if stream:
        sock.recv(1)  # the answer has started
    else:
        time.sleep(0.5)
    sock.close()
    return timed_chat(server)


def seeded(server: Server) -> tuple[float, bool]:
    def one(seed: int, out: dict[int, bytes]) -> None:
        body = chat_body("Hello there", 32, seed=seed, temperature=0.8)
        out[seed] = json.loads(server.call("POST", "/v1/chat/completions", body)[1])["choices"][0]["message"]["content"]

    alone: dict[int, bytes] = {}
    start = time.perf_counter()
    for seed in range(1, 5):
        one(seed, alone)
    sequential = time.perf_counter() - start
    together: dict[int, bytes] = {}
    threads = [threading.Thread(target=one, args=(seed, together)) for seed in range(1, 5)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (time.perf_counter() - start) / sequential, together == alone


def throughput(server: Server, clients: int = 8, per_client: int = 4) -> tuple[float, int]:
    batches = server.health().get("batches", 0)

    def client() -> None:
        for _ in range(per_client):
            timed_chat(server, 16)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * per_client / (time.perf_counter() - start), server.health().get("batches", 0) - batches


def measure(model: Path, src: str | None, tokens: int) -> dict[str, str]:
    server = Server(model, src)
    row: dict[str, str] = {}
    try:
        timed_chat(server)  # loads the model
        s = streamed(server, tokens)
        row["stream: content chunks / tokens"] = f"{s['chunks']:.0f} / {s['tokens']:.0f}"
        row["stream: first chunk / whole (s)"] = f"{s['first']:.2f} / {s['whole']:.2f} ({s['first'] / s['whole']:.0%})"
        idle = statistics.median(timed_chat(server) for _ in range(5))
        row["idle 4-token answer (s)"] = f"{idle:.3f}"
        row["after a plain hang-up (s, extra)"] = f"+{hang_up(server, tokens * 20, stream=False) - idle:.2f}"
        row["after a streamed hang-up (s, extra)"] = f"+{hang_up(server, tokens * 20, stream=True) - idle:.2f}"
        ratio, same = seeded(server)
        row["4 seeded concurrent / sequential"] = f"{ratio:.2f}x ({'same answers' if same else 'ANSWERS DIFFER'})"
        rate, batches = throughput(server)
        row["8 clients x 4 chats (req/s, batches)"] = f"{rate:.1f} ({batches})"
    finally:
        row["SIGTERM exit"] = str(server.stop())
    timeout_server = Server(model, src, "--request-timeout", "1")
    try:
        while timeout_server.call("POST", "/v1/chat/completions", chat_body("Hello there", 4))[0] != 200:
            pass  # the first requests load the model, which may take longer than the timeout
        idle = statistics.median(timed_chat(timeout_server) for _ in range(3))
        timeout_server.call("POST", "/v1/chat/completions", chat_body("Tell me a story", tokens * 20))
        try:
            row["after a timed-out request (s, extra)"] = f"+{timed_chat(timeout_server, expect_ok=False) - idle:.2f}"
        except TimeoutError:
            # It waited behind the abandoned generation until its own time ran out.
            row["after a timed-out request (s, extra)"] = "504 (timed out too)"
    finally:
        row["SIGTERM exit after a timeout"] = str(timeout_server.stop())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96, help="new tokens of the streamed answer")
    parser.add_argument("--src", action="append", help="a source folder to run the server from (repeatable)")
    args = parser.parse_args()
    from miocli.model.tiny import ensure_tiny_checkpoint

    model = ensure_tiny_checkpoint("instruct")
    sources = args.src or [None]
    rows = [measure(model, src, args.tokens) for src in sources]
    names = [src or "this checkout" for src in sources]
    print(f"| figure | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for key in rows[0]:
        print(f"| {key} | {' | '.join(r.get(key, '-') for r in rows)} |")


if __name__ == "__main__":
    main()
