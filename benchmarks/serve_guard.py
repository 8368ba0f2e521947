"""`mio serve` under rough clients: a 43 MiB body next to a small answer, and how the server stops.

Builds the tiny checkpoint once (as benchmarks/serve.py) and starts real `mio serve --model TINY --device cpu`
subprocesses on free loopback ports (OMP_NUM_THREADS=1). Figures:

1. Big bodies, on a server with its defaults (--max-body-mb 64): a 4-token chat (`POST /v1/chat/completions`,
   max_tokens 4, beams 1, seed 0) is timed idle (median of 5, after one that loads the model), then again and
   again, one after another, while one 43 MiB chat body is sent and handled. The delay is the slowest of those
   concurrent answers minus the idle median. Bodies: (a) a 43 MiB user message with `tools` (which MIO
   refuses: 400 as soon as the body is parsed, before any prompt), (b) the same message without `tools` (a
   valid request: its prompt is built and refused as over the context, the part the core does), (c) 70 MiB
   offered chunked without Content-Length on a raw socket, reading while sending (413 once 64 MiB have
   arrived). Each body's status and seconds, and the server's peak RSS (VmHWM) after each.
2. Shutdown: seconds from SIGTERM to exit and the exit status, for an idle server, for a server whose
   3 requests timed out at --request-timeout 0.5 while their batch (4 × 3000 new tokens) still runs (the model
   loaded first by small requests)
   (`--tries` servers; the model thread is given 3 s to leave before the process exits without it), and
   for a server with a client stuck half-way through its body.

Run: python benchmarks/serve_guard.py [--tries 3] [--mib 43] [--parts bodies,shutdown]
"""

from __future__ import annotations

import argparse
import http.client
import json
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from captioning import child_env
from serve import Server, prepare
from streaming import machine_facts

SMALL = json.dumps({"model": "mio", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 0,
                    "beams": 1}).encode()
JSON_HEADERS = {"Content-Type": "application/json"}


def post(port: int, body: bytes, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> tuple[int | None, float]:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", path, body=body, headers=headers or JSON_HEADERS)
        response = connection.getresponse()
        response.read()
        status: int | None = response.status
    except (OSError, http.client.HTTPException):
        status = None
    finally:
        connection.close()
    return status, time.perf_counter() - start


def big_chat(mib: int, tools: bool) -> bytes:
    words = "lorem ipsum dolor sit amet " * (mib * 2**20 // 27 + 1)
    body: dict[str, Any] = {"model": "mio", "messages": [{"role": "user", "content": words[: mib * 2**20]}],
                            "max_tokens": 4, "beams": 1}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "f"}}]
    return json.dumps(body).encode()


def chunked_over_limit(port: int, total: int) -> tuple[int | None, float]:
    """`total` bytes offered chunked without Content-Length on a raw socket, reading while sending (a server
    that refuses early answers before the client is done): (status, seconds to the answer)."""
    start = time.perf_counter()
    piece = b" " * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    answer, sent = b"", 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /v1/run/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (or closed) before the body was done
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(piece)
        answer = answer or sock.recv(200)
    seconds = time.perf_counter() - start
    print(f"chunked body: answered after {sent / 2**20:.1f} MiB of {total / 2**20:.0f} MiB were sent",
          file=sys.stderr)
    return (int(answer.split()[1]) if answer.startswith(b"HTTP/") else None), seconds


def big_bodies(server: Server, mib: int) -> None:
    post(server.port, SMALL)  # loads the model
    idle = statistics.median(post(server.port, SMALL)[1] for _ in range(5))
    cases: dict[str, tuple[Any, dict[str, str]]] = {
        f"(a) {mib} MiB chat with `tools` (refused once parsed)": (big_chat(mib, True), JSON_HEADERS),
        f"(b) {mib} MiB chat, valid (prompt built, over the context)": (big_chat(mib, False), JSON_HEADERS),
        "(c) 70 MiB offered chunked, no Content-Length": (70 * 2**20, {})}
    print(f"\n1. A 4-token chat next to one big body (server defaults, --max-body-mb 64); idle 4-token chat: "
          f"{idle:.3f} s (median of 5)\n")
    print("| big body | its answer | its seconds | concurrent 4-token chats | slowest | delay vs idle "
          "| server peak RSS after |")
    print("|---|---|---|---|---|---|---|")
    for name, (body, headers) in cases.items():
        result: list[tuple[int | None, float]] = []
        sender = threading.Thread(target=lambda b=body, h=headers, r=result: r.append(
            chunked_over_limit(server.port, b) if isinstance(b, int) else post(server.port, b, headers=h)))
        sender.start()
        small: list[float] = []
        while sender.is_alive():
            small.append(post(server.port, SMALL)[1])
        sender.join()
        status, seconds = result[0]
        slowest = max(small) if small else 0.0
        print(f"| {name} | {status} | {seconds:.2f} s | {len(small)} | {slowest:.3f} s | {slowest - idle:+.3f} s "
              f"| {(server.proc_status('VmHWM') or 0) / 2**20:.0f} MiB |")


def timed_out_then_sigterm(model: Path, env: dict[str, str], root: Path, attempt: int) -> tuple[int | None, float]:
    server = Server(model, env, root / f"timeouts-{attempt}.log", ["--request-timeout", "0.5"])
    with server:
        while post(server.port, SMALL)[0] != 200:
            pass  # loads the model first (a load in progress is not cancelled), so the batch below is generating
        body = json.dumps({"inputs": [{"name": f"q{n}", "messages": [{"role": "user", "content": f"count {n}"}]}
                                      for n in range(4)],
                           "settings": {"max_new_tokens": 3000, "beams": 1, "seed": attempt}}).encode()
        threads = [threading.Thread(target=post, args=(server.port, body, "/v1/run/chat")) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        code, seconds, _ = server.stop()
    if "terminate called" in server.log_text():
        print(f"  try {attempt}: 'terminate called' in the log", file=sys.stderr)
    return code, seconds


def half_sent_then_sigterm(model: Path, env: dict[str, str], root: Path) -> tuple[int | None, float, bytes]:
    server = Server(model, env, root / "half-sent.log", [])
    with server, socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(f"POST /v1/run/chat HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: "
                     "application/json\r\nContent-Length: 100000\r\n\r\n{\"inputs\": [".encode())
        time.sleep(0.5)
        code, seconds, _ = server.stop()
        answer = sock.recv(200)
    return code, seconds, answer.split(b"\r\n", 1)[0]


def shutdowns(model: Path, env: dict[str, str], root: Path, tries: int) -> None:
    rows: list[tuple[str, int | None, float]] = []
    with Server(model, env, root / "idle.log", []) as idle:
        code, seconds, _ = idle.stop()
    rows.append(("idle server", code, seconds))
    for attempt in range(1, tries + 1):
        code, seconds = timed_out_then_sigterm(model, env, root, attempt)
        rows.append((f"3 requests timed out, their batch still generating (try {attempt})", code, seconds))
    code, seconds, answer = half_sent_then_sigterm(model, env, root)
    rows.append((f"a client half-way through its body (it got {answer.decode(errors='replace')!r})", code, seconds))
    print("\n2. SIGTERM\n")
    print("| server | exit status | seconds to exit |")
    print("|---|---|---|")
    for name, code, seconds in rows:
        status = f"killed by signal {-code}" if code is not None and code < 0 else str(code)
        print(f"| {name} | {status} | {seconds:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=3, help="servers stopped after timed-out requests")
    parser.add_argument("--mib", type=int, default=43, help="size of the big chat bodies")
    parser.add_argument("--parts", default="bodies,shutdown", help="which figures: bodies, shutdown or both")
    args = parser.parse_args()
    machine_facts()
    with tempfile.TemporaryDirectory(prefix="mio-serve-guard-") as tmp:
        root = Path(tmp)
        model = prepare(root, 1)
        env = {**child_env(root / "cache"), "OMP_NUM_THREADS": "1"}
        if "bodies" in args.parts:
            with Server(model, env, root / "big.log", []) as server:
                big_bodies(server, args.mib)
        if "shutdown" in args.parts:
            shutdowns(model, env, root, args.tries)


if __name__ == "__main__":
    main()
