"""`mio serve` against hostile pages and rough clients: Host, Origin, Content-Type, body limits, shutdown.

A real server on a free loopback port (tiny checkpoint); raw sockets where a well-behaved client
library would not send what is tested (a foreign Host, a half-sent body, a chunked body over the limit).
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mio_testing import MIO_COMMAND, Server, free_port, run_mio
from miocli.errors import UsageError
from miocli.serve.guard import check_allowed, split_host

ALLOWED = "http://allowed.example:3000"
CHAT = {"inputs": [{"name": "q", "messages": [{"role": "user", "content": "hi"}]}],
        "settings": {"max_new_tokens": 2, "beams": 1, "seed": 0}}


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[Server]:
    running = Server(tiny_model, "--max-body-mb", "1", "--allow-origin", ALLOWED, env={"OMP_NUM_THREADS": "1"})
    try:
        yield running
    finally:
        log = running.stop()
    assert "Traceback" not in log, log


def raw(port: int, head: str, body: bytes = b"", timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One request written as given on a fresh connection: (status, headers, body read until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    pairs = [line.split(": ", 1) for line in lines[1:]]
    headers = {name.lower(): value for name, value in pairs}
    return int(lines[0].split()[1]), headers, rest


def request(port: int, method: str, path: str, host: str | None = None, **headers: str) -> str:
    head = f"{method} {path} HTTP/1.1\nHost: {host or f'127.0.0.1:{port}'}\nConnection: close\n"
    return head + "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in headers.items())


def post_json(port: int, path: str, body: object, host: str | None = None,
              **headers: str) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode()
    head = request(port, "POST", path, host, **{"Content-Type": "application/json", "Content-Length": str(len(data)),
                                                **headers})
    return raw(port, head, data)


# ---- Host ---------------------------------------------------------------------------------------
def test_a_foreign_host_is_refused_and_the_own_names_are_served(server):
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        status, _, body = raw(port, request(port, "GET", "/health", host=host))
        assert status == 403 and "is not this server's name" in json.loads(body)["error"]["message"], host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert raw(port, request(port, "GET", "/health", host=host))[0] == 200, host
    # A foreign Host is refused before anything else, a POST included.
    status, _, _ = post_json(port, "/v1/run/chat", CHAT, host=f"rebound.example:{port}")
    assert status == 403


def test_allow_host_adds_a_name_and_a_key_keeps_the_checks_on(tiny_model):
    running = Server(tiny_model, "--allow-host", "mio.example", "--allow-host", "proxy.example:8443",
                     "--api-key", "k3y")
    try:
        port = running.port

        def health(host: str, **headers: str) -> int:
            return raw(port, request(port, "GET", "/health", host=host, Authorization="Bearer k3y", **headers))[0]

        assert health("mio.example") == 200 and health("mio.example:1234") == 200
        assert health("proxy.example:8443") == 200 and health("proxy.example:8444") == 403
        assert health("other.example") == 403
        assert health(f"127.0.0.1:{port}", Origin="http://evil.example") == 403
        assert raw(port, request(port, "GET", "/health", host="mio.example"))[0] == 401
    finally:
        running.stop()


# ---- Origin, CORS, Content-Type ----------------------------------------------------------------------
def test_a_cross_origin_request_is_refused(server):
    port = server.port
    for path in ("/v1/run/chat", "/v1/chat/completions"):
        status, headers, body = post_json(port, path, CHAT, Origin="http://evil.example")
        error = json.loads(body)["error"]
        assert status == 403 and "evil.example" in error["message"] and {"type", "param", "code"} <= set(error)
        # Each route family's own error shape: OpenAI's on its routes, the native one (with a hint) on /v1/run/.
        assert error["type"] == ("UsageError" if path.startswith("/v1/run/") else "invalid_request_error")
        assert "access-control-allow-origin" not in headers
    assert raw(port, request(port, "GET", "/health", Origin="null"))[0] == 403
    # The server's own page (same origin) and its other loopback names are served, without CORS headers.
    status, headers, _ = post_json(port, "/v1/run/chat", CHAT, Origin=f"http://127.0.0.1:{port}")
    assert status == 200 and "access-control-allow-origin" not in headers
    assert raw(port, request(port, "GET", "/health", Origin=f"http://localhost:{port}"))[0] == 200


def test_an_allowed_origin_gets_cors_headers_and_its_preflight_answered(server):
    port = server.port
    head = request(port, "OPTIONS", "/v1/chat/completions", Origin=ALLOWED,
                   Access_Control_Request_Method="POST",
                   Access_Control_Request_Headers="authorization, content-type")
    status, headers, _ = raw(port, head)
    assert status == 204 and headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type"
    status, headers, _ = post_json(port, "/v1/run/chat", CHAT, Origin=ALLOWED)
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED and headers["vary"] == "Origin"
    # Its errors are readable by the page too.
    status, headers, _ = raw(port, request(port, "POST", "/v1/run/chat", Origin=ALLOWED, Content_Length="0"))
    assert status == 415 and headers["access-control-allow-origin"] == ALLOWED
    # Another origin's preflight is refused.
    head = request(port, "OPTIONS", "/v1/chat/completions", Origin="http://evil.example",
                   Access_Control_Request_Method="POST")
    assert raw(port, head)[0] == 403


def test_json_routes_take_only_json_and_upload_routes_only_multipart(server):
    port = server.port
    data = json.dumps(CHAT).encode()
    for path in ("/v1/run/chat", "/v1/chat/completions", "/v1/images/generations", "/v1/audio/speech"):
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            head = request(port, "POST", path, Content_Type=kind, Content_Length=str(len(data)))
            status, _, body = raw(port, head, data)
            assert status == 415 and "application/json" in json.loads(body)["error"]["message"], (path, kind)
    head = request(port, "POST", "/v1/run/chat", Content_Length=str(len(data)))
    assert raw(port, head, data)[0] == 415  # no Content-Type at all
    head = request(port, "POST", "/v1/run/chat", Content_Type="Application/JSON; charset=utf-8",
                   Content_Length=str(len(data)))
    assert raw(port, head, data)[0] == 200
    status, _, body = post_json(port, "/v1/audio/transcriptions", {"file": "x"})
    assert status == 415 and "multipart/form-data" in json.loads(body)["error"]["message"]


def test_the_options_are_checked():
    assert check_allowed(["Mio.Example", "*"], ["HTTP://Localhost:3000/", "null"]).allow_origins == (
        "http://localhost:3000", "null")
    for hosts, origins in ((["a/b"], []), ([], ["localhost:3000"]), ([], ["http://x/path"]), ([], ["ftp://x"])):
        with pytest.raises(UsageError):
            check_allowed(hosts, origins)
    assert split_host("[::1]:80") == ("::1", 80) and split_host("Name") == ("name", None)
    assert split_host("::1") is None and split_host("a:b") is None and split_host("[::1]x") is None


# ---- bodies -----------------------------------------------------------------------------------------
def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(server):
    """No Content-Length, or a lying one next to chunked framing: 413 once 1 MiB has arrived, not at the end."""
    port = server.port
    for extra in ("", "Content-Length: 20\n"):
        head = request(port, "POST", "/v1/run/chat", Content_Type="application/json",
                       Transfer_Encoding="chunked") + extra
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
            piece = b"x" * 65536
            chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            sent = 0
            answer = b""
            # Up to 64 MiB is offered; the answer must come after a little more than 1 MiB.
            while sent < 64 * 2**20 and not select.select([sock], [], [], 0)[0]:
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(piece)
            while b"\r\n\r\n" not in answer or b"}" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 24 * 2**20, sent  # the limit plus what the kernel buffers, far from the 64 offered
        assert b"larger than 1 MiB" in answer


def test_a_declared_length_over_the_limit_is_refused_before_the_body(server):
    head = request(server.port, "POST", "/v1/run/chat", Content_Type="application/json",
                   Content_Length=str(2 * 2**20))
    status, headers, _ = raw(server.port, head)  # no body sent at all
    assert status == 413 and headers["connection"] == "close"


# ---- shutdown -----------------------------------------------------------------------------------------
def stopped(running: Server, timeout: float = 60) -> tuple[int, float, str]:
    begin = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    code = running.process.wait(timeout=timeout)
    seconds = time.monotonic() - begin
    running.log.seek(0)
    return code, seconds, running.log.read()


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_sigterm_after_timed_out_requests_and_under_load_exits_0(tiny_model, attempt):
    running = Server(tiny_model, "--request-timeout", "0.5", "--shutdown-timeout", "1",
                     env={"OMP_NUM_THREADS": "1"})
    long = {"inputs": [{"name": f"q{n}", "messages": [{"role": "user", "content": f"count to {n}"}]}
                       for n in range(4)], "settings": {"max_new_tokens": 3000, "beams": 1, "seed": attempt}}
    answers: list[tuple[int, bytes]] = []
    clients = [threading.Thread(target=lambda: answers.append(running.post("/v1/run/chat", long)))
               for _ in range(3)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=120)
    # Every request timed out while its batch goes on generating; more arrive as the signal comes.
    assert len(answers) == 3 and all(b"longer than 0.5 s" in body for _, body in answers), answers
    late = [threading.Thread(target=lambda: answers.append(running.post("/v1/run/chat", long)), daemon=True)
            for _ in range(2)]
    for client in late:
        client.start()
    time.sleep(0.2)
    code, _, log = stopped(running)
    assert code == 0, log
    assert "stopped" in log and "terminate called" not in log and "Traceback" not in log, log


def test_a_half_sent_body_does_not_hold_the_shutdown(tiny_model):
    running = Server(tiny_model)
    port = running.port
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = request(port, "POST", "/v1/run/chat", Content_Type="application/json", Content_Length="100000")
        sock.sendall(head.replace("\n", "\r\n").encode() + b'\r\n{"inputs": [')
        time.sleep(0.3)
        code, _, log = stopped(running, timeout=30)
        answer = sock.recv(65536)
    assert code == 0 and "stopped" in log, log
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer


def test_a_busy_port_is_one_line_and_exit_3(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_mio("serve", "--model", str(tiny_model), "--device", "cpu", "--port", str(port), timeout=60)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], done.stderr
    assert "listening" not in done.stderr and "Traceback" not in done.stderr


def test_an_idle_server_stops_on_sigint_with_exit_0(tiny_model):
    """An idle server stops in well under the shutdown timeout: nothing in flight is waited for."""
    process = subprocess.Popen([*MIO_COMMAND, "serve", "--model", str(tiny_model), "--device", "cpu", "--port",
                                str(free_port())], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    assert "listening" in process.stderr.readline()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
