"""`mio serve` on the tiny checkpoint: warm commands, concurrent requests, a bounded load test.

Builds the tiny checkpoint (miocli.model.tiny) once in a temporary MIO_CACHE and writes small synthetic PNGs
(64x48, as benchmarks/streaming.py) to a temporary folder. Starts the real server as a subprocess,
`mio serve --model TINY --device cpu --port FREE` (its default --batch-size 8), waits for GET /health, and
stops it with SIGTERM at the end. Every caption uses `--max-new-tokens 8 --beams 1`. Figures:

1. Warm commands: `--processes` `mio caption IMG --server URL --json` processes one after another vs as many
   plain `mio caption IMG --model TINY --device cpu --json` processes (one image each, different images),
   each loop after one untimed command (for the server: the one that loads the model). Total wall,
   per-command median / p90 / max, peak RSS of one command process, speed-up, identical stdout.
2. Concurrency: `--clients` threads × `--per-client` captions, each a `POST /v1/run/caption` with one input
   (http.client, a connection per request, settings {"max_new_tokens": 8, "beams": 1, "seed": 0}), vs the
   same requests sent one at a time: requests/s, latency, the server's batches (from /health, where it
   reports them), the ratio, identical captions.
3. Bounded load test on loopback, on a second server started with `--max-body-mb 1 --api-key KEY`:
   `--load-requests` requests from `--load-clients` threads, `--bad-fraction` of them malformed, spread at
   random (seeded) and cycling through: bad JSON (→ 400), corrupt image bytes (→ 200 stream whose result
   carries an input error), a body over 1 MiB (→ 413), a wrong API key (→ 401). Good requests send the key
   and must get one result without an error (and the caption of the one-at-a-time run of part 2). One good
   request first loads the model and is not counted. Also: server alive (process running, GET /health 200),
   server RSS (/proc/PID/status VmRSS, and /health memory_bytes) after the first 50 answered requests (a
   quarter of fewer) vs after the run, and the server's own SIGTERM exit (status, 'mio serve: stopped').

The checkpoint and images are made in a child process, so that this one stays light: on Linux a child's
ru_maxrss starts at its parent's peak RSS, which would hide the size of a `--server` command process.

Run: python benchmarks/serve.py [--processes 32] [--clients 8] [--per-client 16] [--load-requests 500]
                               [--load-clients 16] [--bad-fraction 0.1] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning import child_env, run_measured
from streaming import launcher, machine_facts

SETTINGS = {"max_new_tokens": 8, "beams": 1, "seed": 0}
CLI_OPTIONS = ["--max-new-tokens", "8", "--beams", "1", "--json"]
API_KEY = "serve-bench-key"
HEALTH_WAIT_S = 180.0
HTTP_TIMEOUT_S = 300.0
RSS_MARK = 50  # requests answered before the first RSS reading of the load test (a quarter of fewer requests)
BAD_KINDS = ("bad JSON", "corrupt image", "body over the limit", "wrong API key")
EXPECTED = {"good": "200, a result without error", "bad JSON": "400", "corrupt image": "200, a result with an error",
            "body over the limit": "413", "wrong API key": "401"}


# ---- small helpers -----------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mib(n_bytes: float | None) -> str:
    return "—" if n_bytes is None else f"{n_bytes / 2**20:.0f} MiB"


@dataclass
class Reply:
    status: int | None  # None: no HTTP answer (connection error, timeout)
    seconds: float
    events: list[dict[str, Any]] = field(default_factory=list)  # NDJSON lines of a 200 stream
    body: Any = None  # the JSON of an error answer
    problem: str | None = None  # why there is no (readable) answer

    def results(self) -> list[dict[str, Any]]:
        return [e["result"] for e in self.events if e.get("type") == "result"]

    def ok_text(self) -> str | None:
        """The caption of a 200 stream of exactly one result without error (and no error line), else None."""
        results = self.results()
        if self.status != 200 or len(results) != 1 or "error" in results[0] or any(
                e.get("type") == "error" for e in self.events):
            return None
        return results[0].get("text")

    def describe(self) -> str:
        if self.status is None:
            return f"no answer ({self.problem})"
        if self.status == 200:
            results = self.results()
            errors = [r["error"]["type"] for r in results if "error" in r]
            errors += [e["error"].get("type", "?") for e in self.events if e.get("type") == "error"]
            return f"200, {len(results)} result(s)" + (f", error {'/'.join(errors)}" if errors else "")
        return str(self.status)


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> Reply:
    """One request on a fresh loopback connection, its answer read to the end."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return Reply(None, time.perf_counter() - start, problem=f"{exc.__class__.__name__}: {exc}")
    finally:
        connection.close()
    reply = Reply(response.status, time.perf_counter() - start)
    try:
        if response.status == 200 and method == "POST":
            reply.events = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            reply.body = json.loads(raw)
    except ValueError:
        reply.problem = f"unreadable body: {raw[:200]!r}"
    return reply


def caption_body(name: str, data: bytes) -> bytes:
    media = [{"kind": "image", "name": name, "data": base64.b64encode(data).decode("ascii")}]
    return json.dumps({"inputs": [{"name": name, "fields": {}, "media": media, "sample": 0}],
                       "settings": SETTINGS}).encode()


def headers(key: str | None) -> dict[str, str]:
    out = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
    if key is not None:
        out["Authorization"] = f"Bearer {key}"
    return out


# ---- the server process --------------------------------------------------------------------------
class Server:
    """A `mio serve` subprocess: started and waited for, stopped with SIGTERM."""

    def __init__(self, model: Path, env: dict[str, str], log: Path, extra: list[str], api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*launcher(), "serve", "--model", str(model), "--device", "cpu", "--port", str(self.port), *extra]
        self.env, self.log, self.api_key = env, log, api_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_record: tuple[int | None, float, bool] | None = None

    def __enter__(self) -> Server:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env)
        start = time.perf_counter()
        while time.perf_counter() - start < HEALTH_WAIT_S:
            if self.proc.poll() is not None:
                raise SystemExit(f"{' '.join(self.cmd)}: exited {self.proc.returncode} before answering /health\n"
                                 f"{self.log_text()[-3000:]}")
            status, _ = self.health()
            if status == 200:
                print(f"server on {self.url} answered /health after {time.perf_counter() - start:.1f} s",
                      file=sys.stderr)
                return self
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{' '.join(self.cmd)}: no /health 200 within {HEALTH_WAIT_S:g} s\n{self.log_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.stop_record is None:
            self.stop()

    def health(self) -> tuple[int | None, dict[str, Any]]:
        reply = http_call(self.port, "GET", "/health", headers=headers(self.api_key))
        return reply.status, reply.body if isinstance(reply.body, dict) else {}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def proc_status(self, key: str) -> int | None:
        """A /proc/PID/status figure in bytes (VmRSS, VmHWM), None when the process is gone."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def stop(self) -> tuple[int | None, float, bool]:
        """SIGTERM and wait: (exit status as Popen reports it, seconds to exit, whether it logged 'stopped')."""
        assert self.proc is not None
        start = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print(f"server {self.url} still running 60 s after SIGTERM: killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()
        self.stop_record = (self.proc.returncode, time.perf_counter() - start,
                            "mio serve: stopped" in self.log_text())
        return self.stop_record


# ---- 1. warm commands ----------------------------------------------------------------------------
def warm_commands(server: Server, model: Path, images: list[Path], env: dict[str, str]) -> None:
    prog = launcher()
    configs = {
        f"plain `mio caption IMG --model TINY --device cpu` ({len(images)} processes)":
            lambda img: [*prog, "caption", str(img), "--model", str(model), "--device", "cpu", *CLI_OPTIONS],
        f"`mio caption IMG --server URL` ({len(images)} processes)":
            lambda img: [*prog, "caption", str(img), "--server", server.url, *CLI_OPTIONS],
    }
    plain, warm = list(configs)
    rows: dict[str, tuple[float, list[float], int]] = {}
    outputs: dict[str, list[str]] = {}
    first: dict[str, float] = {}
    for name, make in configs.items():
        done = run_measured(make(images[0]), env)  # untimed: the server loads the model, the page cache warms
        if done.returncode != 0:
            raise SystemExit(f"{name}: first command exited {done.returncode}\n{done.stderr[-3000:]}")
        first[name] = done.wall_s
        walls, rss, outs = [], 0, []
        start = time.perf_counter()
        for img in images:
            done = run_measured(make(img), env)
            if done.returncode != 0:
                raise SystemExit(f"{name}: {img.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
            walls.append(done.wall_s)
            rss = max(rss, done.max_rss_kib)
            outs.append(done.stdout)
        rows[name] = (time.perf_counter() - start, walls, rss)
        outputs[name] = outs
        print(f"{name}: {rows[name][0]:.1f} s", file=sys.stderr)

    print(f"\n1. Warm commands: {len(images)} `mio caption IMG {' '.join(CLI_OPTIONS)}` processes one after another "
          f"(different 64x48 PNGs), after one untimed command each\n")
    print("| commands | total wall | per command median | p90 | max | peak RSS per process | untimed first command "
          "| speed-up (total wall) |")
    print("|---|---|---|---|---|---|---|---|")
    reference = rows[plain][0]
    for name in configs:
        total, walls, rss = rows[name]
        print(f"| {name} | {total:.2f} s | {statistics.median(walls):.3f} s | {percentile(walls, 90):.3f} s "
              f"| {max(walls):.3f} s | {rss / 1024:.0f} MiB | {first[name]:.2f} s | {reference / total:.1f}× |")
    same = sum(a == b for a, b in zip(outputs[plain], outputs[warm]))
    under = sum(w < 0.3 for w in rows[warm][1])
    print(f"\nidentical stdout (`--json` records) between the two: {same}/{len(images)}; "
          f"targets: speed-up ≥ 10× (got {reference / rows[warm][0]:.1f}×), each warm command < 0.3 s "
          f"({under}/{len(images)} were, max {max(rows[warm][1]):.3f} s)")
    for a, b, img in zip(outputs[plain], outputs[warm], images):
        if a != b:
            print(f"  {img.name}: plain {a.strip()!r} vs server {b.strip()!r}")


# ---- 2. concurrency ------------------------------------------------------------------------------
def concurrency(server: Server, images: list[Path], clients: int, per_client: int) -> dict[str, str]:
    """Returns the one-at-a-time captions by image name (the reference of the load test)."""
    total = clients * per_client
    chosen = [images[i % len(images)] for i in range(total)]
    bodies = [caption_body(p.name, p.read_bytes()) for p in chosen]

    def counters() -> tuple[int | None, int | None]:
        _, info = server.health()
        return info.get("batches"), info.get("inputs")

    replies: dict[str, list[Reply | None]] = {}
    walls: dict[str, float] = {}
    batches: dict[str, tuple[int | None, int | None]] = {}

    before = counters()
    start = time.perf_counter()
    replies["one at a time"] = [http_call(server.port, "POST", "/v1/run/caption", b, headers(None)) for b in bodies]
    walls["one at a time"] = time.perf_counter() - start
    after = counters()
    batches["one at a time"] = (None if None in (before[0], after[0]) else after[0] - before[0],
                                None if None in (before[1], after[1]) else after[1] - before[1])
    print(f"one at a time: {walls['one at a time']:.1f} s", file=sys.stderr)

    concurrent = f"{clients} concurrent clients × {per_client}"
    got: list[Reply | None] = [None] * total
    gate = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        gate.wait()
        for i in range(c * per_client, (c + 1) * per_client):
            got[i] = http_call(server.port, "POST", "/v1/run/caption", bodies[i], headers(None))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    before = counters()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    walls[concurrent] = time.perf_counter() - start
    after = counters()
    batches[concurrent] = (None if None in (before[0], after[0]) else after[0] - before[0],
                           None if None in (before[1], after[1]) else after[1] - before[1])
    replies[concurrent] = got
    print(f"{concurrent}: {walls[concurrent]:.1f} s", file=sys.stderr)

    print(f"\n2. Concurrency: {total} `POST /v1/run/caption` requests, one input each, "
          f"settings {json.dumps(SETTINGS)}, server --batch-size 8 (default)\n")
    print("| requests sent | wall | requests/s | latency median | p90 | answered with a result | server batches "
          "| inputs per batch | throughput ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = total / walls["one at a time"]
    texts: dict[str, list[str | None]] = {}
    for name, answers in replies.items():
        texts[name] = [r.ok_text() if r is not None else None for r in answers]
        latencies = [r.seconds for r in answers if r is not None]
        ok = sum(t is not None for t in texts[name])
        n_batches, n_inputs = batches[name]
        per_batch = f"{n_inputs / n_batches:.1f}" if n_batches and n_inputs is not None else "—"
        print(f"| {name} | {walls[name]:.2f} s | {total / walls[name]:.1f} | {statistics.median(latencies):.3f} s "
              f"| {percentile(latencies, 90):.3f} s | {ok}/{total} | {'—' if n_batches is None else n_batches} "
              f"| {per_batch} | {(total / walls[name]) / reference:.2f}× |")
    same = sum(a is not None and a == b for a, b in zip(texts["one at a time"], texts[concurrent]))
    print(f"\nidentical captions, concurrent vs one at a time: {same}/{total}; target: throughput ratio ≥ 3× "
          f"(got {(total / walls[concurrent]) / reference:.2f}×)")
    for name, answers in replies.items():
        for i, r in enumerate(answers):
            if r is None or r.ok_text() is None:
                print(f"  {name}: request {i} ({chosen[i].name}): {r.describe() if r else 'not sent'}")
    reference_texts: dict[str, str] = {}
    for img, text in zip(chosen, texts["one at a time"]):
        if text is not None:
            reference_texts.setdefault(img.name, text)
    return reference_texts


# ---- 3. bounded load test ------------------------------------------------------------------------
@dataclass
class Spec:
    kind: str
    image: str
    body: bytes
    key: str | None


def load_specs(images: list[Path], count: int, bad_fraction: float, seed: int = 0) -> list[Spec]:
    rng = random.Random(seed)
    bad_count = round(count * bad_fraction)
    bad_at = {index: BAD_KINDS[n % len(BAD_KINDS)] for n, index in enumerate(sorted(rng.sample(range(count),
                                                                                               bad_count)))}
    specs = []
    for i in range(count):
        img = images[i % len(images)]
        data = img.read_bytes()
        kind = bad_at.get(i, "good")
        body, key = caption_body(img.name, data), API_KEY
        if kind == "bad JSON":
            body = body[: len(body) // 2]  # cut in the middle
        elif kind == "corrupt image":
            # A PNG signature and header, then noise: it looks like a PNG until it is decoded.
            body = caption_body(img.name, data[:64] + rng.randbytes(2000))
        elif kind == "body over the limit":
            body = caption_body(img.name, rng.randbytes(900 * 1024))  # ~1.2 MiB of JSON after base64
        elif kind == "wrong API key":
            key = "not-the-key"
        specs.append(Spec(kind, img.name, body, key))
    return specs


def load_test(model: Path, env: dict[str, str], root: Path, images: list[Path], count: int, clients: int,
              bad_fraction: float, reference: dict[str, str]) -> Server:
    specs = load_specs(images, count, bad_fraction)
    replies: list[Reply | None] = [None] * count
    lock = threading.Lock()
    position = iter(range(count))
    answered = 0
    mark: dict[str, Any] = {}
    marked = min(RSS_MARK, max(1, count // 4))
    server = Server(model, env, root / "serve-load.log", ["--max-body-mb", "1", "--api-key", API_KEY], API_KEY)
    with server:
        warm_up = http_call(server.port, "POST", "/v1/run/caption", caption_body(images[0].name,
                                                                               images[0].read_bytes()),
                            headers(API_KEY))
        if warm_up.ok_text() is None:
            raise SystemExit(f"load test: the warm-up request failed: {warm_up.describe()} {warm_up.body}")
        def client() -> None:
            nonlocal answered
            while True:
                with lock:
                    i = next(position, None)
                if i is None:
                    return
                replies[i] = http_call(server.port, "POST", "/v1/run/caption", specs[i].body, headers(specs[i].key))
                with lock:
                    answered += 1
                    take = answered == marked
                if take:
                    mark["rss"] = server.proc_status("VmRSS")
                    mark["health"] = server.health()[1].get("memory_bytes")

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        print(f"load test: {count} requests in {wall:.1f} s", file=sys.stderr)
        alive = server.alive()
        status, info = server.health()
        rss_after, hwm = server.proc_status("VmRSS"), server.proc_status("VmHWM")
        unexpected = [line for line in server.log_text().splitlines() if "unexpected" in line or "Traceback" in line]
        server.stop()

    def handled(spec: Spec, reply: Reply | None) -> bool:
        if reply is None or reply.status is None:
            return False
        if spec.kind == "good":
            return reply.ok_text() is not None
        if spec.kind == "corrupt image":
            results = reply.results()
            return reply.status == 200 and len(results) == 1 and results[0].get("error", {}).get("type") == "InputError"
        want = {"bad JSON": 400, "body over the limit": 413, "wrong API key": 401}[spec.kind]
        return reply.status == want

    print(f"\n3. Bounded load test on loopback: {count} requests from {clients} client threads, "
          f"{round(count * bad_fraction)} malformed ({bad_fraction:.0%}, spread at random, seed 0), server "
          f"`--max-body-mb 1 --api-key KEY`, {wall:.1f} s ({count / wall:.1f} requests/s), after one uncounted "
          f"good request that loaded the model ({warm_up.seconds:.2f} s)\n")
    print("| requests | sent | expected answer | handled as expected | answers seen | latency median | p90 |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("good", *BAD_KINDS):
        pairs = [(s, r) for s, r in zip(specs, replies) if s.kind == kind]
        if not pairs:
            continue
        ok = sum(handled(s, r) for s, r in pairs)
        seen: dict[str, int] = {}
        for _, r in pairs:
            label = r.describe() if r is not None else "not sent"
            seen[label] = seen.get(label, 0) + 1
        latencies = [r.seconds for _, r in pairs if r is not None]
        print(f"| {kind} | {len(pairs)} | {EXPECTED[kind]} | {ok}/{len(pairs)} "
              f"| {'; '.join(f'{label} ×{n}' for label, n in sorted(seen.items()))} "
              f"| {statistics.median(latencies):.3f} s | {percentile(latencies, 90):.3f} s |")
    good = [(s, r) for s, r in zip(specs, replies) if s.kind == "good"]
    known = [(s, r) for s, r in good if s.image in reference]
    same = sum(r is not None and r.ok_text() == reference[s.image] for s, r in known)
    rss_mark = mark.get("rss")
    ratio = f"{rss_after / rss_mark:.3f}" if rss_mark and rss_after else "—"
    health_ratio = (f"{info['memory_bytes'] / mark['health']:.3f}"
                    if mark.get("health") and info.get("memory_bytes") else "—")
    print(f"\ngood requests with the caption of the one-at-a-time run (part 2): {same}/{len(known)}")
    print(f"\n| server alive after the run | RSS after first {marked} answered | RSS after all | ratio (target ≤ 1.10) "
          f"| /health memory_bytes after {marked} → after all | ratio | peak RSS (VmHWM) | server log: unexpected / "
          "Traceback lines |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {'yes' if alive else 'NO'}, /health {status} | {mib(rss_mark)} | {mib(rss_after)} | {ratio} "
          f"| {mib(mark.get('health'))} → {mib(info.get('memory_bytes'))} | {health_ratio} | {mib(hwm)} "
          f"| {len(unexpected)} |")
    for line in unexpected[:10]:
        print(f"  {line}")
    for i, (s, r) in enumerate(zip(specs, replies)):
        if not handled(s, r):
            detail = r.describe() if r is not None else "not sent"
            body = f" {json.dumps(r.body)[:300]}" if r is not None and r.body is not None else ""
            print(f"  request {i} ({s.kind}, {s.image}): {detail}{body}")
    return server


def prepare(root: Path, count: int) -> Path:
    """The tiny checkpoint and `count` PNGs, made in a child process: on Linux a child's ru_maxrss starts at
    its parent's peak RSS, so this process stays light (no torch) for the command processes' figures."""
    script = ("import sys; from pathlib import Path; from captioning import build_tiny; "
              "from streaming import write_pool; root = Path(sys.argv[1]); "
              "write_pool(root / 'images', int(sys.argv[2])); print(build_tiny(root / 'cache'))")
    done = subprocess.run([sys.executable, "-c", script, str(root), str(count)], cwd=Path(__file__).parent,
                          env=child_env(root / "cache"), stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building the tiny checkpoint or the images failed (exit {done.returncode})")
    return Path(done.stdout.strip().splitlines()[-1])


def shutdown_table(servers: dict[str, Server]) -> None:
    print("\nServers stopped with SIGTERM\n")
    print("| server | exit status | seconds to exit | logged 'mio serve: stopped' |")
    print("|---|---|---|---|")
    for name, server in servers.items():
        if server.stop_record is None:
            continue
        code, seconds, stopped = server.stop_record
        status = f"killed by signal {-code}" if code is not None and code < 0 else str(code)
        print(f"| {name} | {status} | {seconds:.2f} s | {'yes' if stopped else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=32, help="commands in each loop of part 1")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads in part 2")
    parser.add_argument("--per-client", type=int, default=16, help="captions per client in part 2")
    parser.add_argument("--load-requests", type=int, default=500, help="requests in the load test")
    parser.add_argument("--load-clients", type=int, default=16, help="client threads in the load test")
    parser.add_argument("--bad-fraction", type=float, default=0.1, help="share of malformed load-test requests")
    parser.add_argument("--quick", action="store_true",
                        help="small numbers: 4 processes, 2 clients × 4, 40 load requests from 4 threads")
    args = parser.parse_args()
    if args.quick:
        args.processes, args.clients, args.per_client, args.load_requests, args.load_clients = 4, 2, 4, 40, 4

    machine_facts()
    print(f"mio: {' '.join(launcher())}; tiny checkpoint, CPU; captions with --max-new-tokens 8 --beams 1; "
          f"64x48 PNGs; {args.processes} processes, {args.clients} clients × {args.per_client}, "
          f"{args.load_requests} load requests from {args.load_clients} threads, {args.bad_fraction:.0%} malformed")
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="mio-serve-bench-") as tmp:
        root = Path(tmp)
        model = prepare(root, max(args.processes, args.clients * args.per_client, 32))
        env = child_env(root / "cache")
        images = sorted((root / "images").glob("*.png"))
        with Server(model, env, root / "serve.log", []) as server:
            servers["parts 1-2 (defaults)"] = server
            warm_commands(server, model, images[: args.processes], env)
            reference = concurrency(server, images, args.clients, args.per_client)
            alive = server.alive() and server.health()[0] == 200
            unexpected = [line for line in server.log_text().splitlines()
                          if "unexpected" in line or "Traceback" in line]
            server.stop()
        print(f"\nserver of parts 1-2 alive at their end: {'yes' if alive else 'NO'}; "
              f"unexpected / Traceback lines in its log: {len(unexpected)}")
        servers["part 3 (--max-body-mb 1 --api-key KEY)"] = load_test(
            model, env, root, images, args.load_requests, args.load_clients, args.bad_fraction, reference)
        shutdown_table(servers)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
