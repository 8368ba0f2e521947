"""`mio serve`: one warm MIO for every command, script and OpenAI client.

The server is a thin edge over the task core. Requests become items of the core's stream;
one worker thread owns the model and runs batches, gathering concurrent requests for the same
task and settings into one generation batch (a short window, capped by --batch-size); each
result goes back to its request as soon as its batch is decoded. With per-prompt seeds a
result does not depend on the requests it was batched with.

Endpoints: `POST /v1/run/{task}` (every task; NDJSON results as they come), `GET /health`,
and the OpenAI-compatible subset in `server_openai.py`. Safe by default: loopback unless an
API key is set, body size limits, per-request timeouts, 4xx JSON errors, one bad request never
harms another.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from miocli import wire
from miocli.errors import EnvironmentProblem, MioError, UsageError
from miocli.inputs import Example, Item
from miocli.results import StoryPart

LOOPBACK = {"127.0.0.1", "::1", "localhost"}

# The server's log: a copy of stderr taken at start. While a decoder runs, miocli.quiet points fd 2
# at /dev/null for the whole process; lines written by other threads then must not vanish with it.
_LOG: Any = None


def log(message: str) -> None:
    global _LOG
    if _LOG is None:
        try:
            _LOG = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
        except (OSError, ValueError, AttributeError):
            _LOG = sys.stderr
    print(f"mio serve: {message}", file=_LOG, flush=True)


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    api_key: str | None = None
    batch_size: int = 8
    batch_window_s: float = 0.005
    max_body_bytes: int = 64 * 2**20
    request_timeout_s: float = 600.0
    idle_unload_s: float | None = None


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h' → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a duration", hint="use e.g. 90s, 10m or 2h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"the duration {text!r} must be above 0")
    return seconds


def check_bind(host: str, api_key: str | None, open_without_key: bool) -> None:
    if host not in LOOPBACK and not api_key and not open_without_key:
        raise UsageError(
            f"--host {host} would let anyone who can reach this machine use the model",
            hint="set --api-key KEY (clients send it as MIO_API_KEY or a Bearer token), or pass "
                 "--insecure-no-api-key to serve other machines without one",
        )


# ---- the worker: one thread owns the model ---------------------------------------------------------
@dataclass
class Job:
    """One request's inputs on their way through the worker."""

    task: str
    items: list[Item]
    settings: dict[str, Any]
    examples: list[Example]
    template: str | None
    embeddings_only: bool
    # Filled by the worker from its thread, read by the request's coroutine on its event loop.
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    next_item: int = 0
    cancelled: bool = False

    def emit(self, kind: str, value: Any) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def key(self) -> str:
        """Jobs with the same key can share a generation batch."""
        examples = [(e.media.name, len(e.media.data or b""), e.answer) for e in self.examples]
        # A client's batch size only says how it chunks its inputs; the server's --batch-size decides.
        settings = {k: v for k, v in self.settings.items() if k != "batch_size"}
        return json.dumps([self.task, settings, examples, self.template, self.embeddings_only], sort_keys=True,
                          default=str)


class Worker:
    """Runs jobs on the model in one thread, batching items of jobs that share a key."""

    def __init__(self, mio: Any, settings: ServeSettings) -> None:
        self.mio = mio
        # A warm server keeps every component that fits (a one-shot command releases sooner).
        mio.runtime.long_lived = True
        self.settings = settings
        self.pending: list[Job] = []
        self.lock = threading.Condition()
        self.busy_since: float | None = None
        self.last_work = time.monotonic()
        self.requests = 0
        self.batches = 0
        self.items_done = 0
        self.thread = threading.Thread(target=self._loop, name="mio-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (from the request's coroutine: its loop receives the events)."""
        job.loop = asyncio.get_running_loop()
        with self.lock:
            self.pending.append(job)
            self.requests += 1
            self.lock.notify()

    def _take_batch(self) -> tuple[list[tuple[Job, int]], Job] | None:
        """Up to batch_size items of the oldest job's key, from that job and any others with the same key."""
        with self.lock:
            self.pending = [j for j in self.pending if not j.cancelled and j.next_item < len(j.items)]
            if not self.pending:
                return None
            first = self.pending[0]
            limit = self._batch_limit(first)
            chosen: list[tuple[Job, int]] = []
            for job in [j for j in self.pending if j.key() == first.key()]:
                while job.next_item < len(job.items) and len(chosen) < limit:
                    chosen.append((job, job.next_item))
                    job.next_item += 1
            return chosen, first

    def _batch_limit(self, job: Job) -> int:
        # Interleave decodes its images while streaming: one story at a time. Otherwise the server's
        # --batch-size decides (a client's batch size only chunks its requests).
        return 1 if job.task == "interleave" else self.settings.batch_size

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.pending:
                    if not self.lock.wait(timeout=self._idle_wait()):
                        self._maybe_unload()
            # A short window lets concurrent requests for the same task join this batch.
            time.sleep(self.settings.batch_window_s)
            taken = self._take_batch()
            if taken is None:
                continue
            chosen, first = taken
            self.busy_since = time.monotonic()
            try:
                self._run(chosen, first)
            finally:
                self.busy_since = None
                self.last_work = time.monotonic()

    def _run(self, chosen: list[tuple[Job, int]], first: Job) -> None:
        items = [job.items[index] for job, index in chosen]
        settings = {**first.settings, "batch_size": len(items)}
        self.batches += 1
        self.items_done += len(items)

        def on_part(position: int, part: StoryPart) -> None:
            job, index = chosen[position]
            job.emit("part", (index, part))

        try:
            stream = self.mio.stream(first.task, items, examples=[(e.media, e.answer) for e in first.examples],
                                     template=first.template, embeddings_only=first.embeddings_only,
                                     on_part=on_part, **settings)
            for result in stream:
                job, index = chosen[result.index]
                result.index = index
                job.emit("result", result)
        except MioError as exc:
            # A usage, model or environment problem ends every job of this batch with that error.
            for job in {id(job): job for job, _ in chosen}.values():
                job.cancelled = True
                job.emit("error", exc)
        except Exception as exc:  # a bug must not kill the worker (and with it every later request)
            log(f"unexpected {exc.__class__.__name__} in a batch of {first.task}: {exc}")
            problem = MioError(f"the server failed on this batch ({exc.__class__.__name__}: {exc})")
            for job in {id(job): job for job, _ in chosen}.values():
                job.cancelled = True
                job.emit("error", problem)

    def _idle_wait(self) -> float | None:
        if self.settings.idle_unload_s is None:
            return None
        return max(0.05, self.settings.idle_unload_s - (time.monotonic() - self.last_work))

    def _maybe_unload(self) -> None:
        idle = self.settings.idle_unload_s
        if idle is not None and time.monotonic() - self.last_work >= idle and self.mio.runtime.loaded():
            unloaded = self.mio.runtime.unload()
            log(f"idle for {idle:g} s: unloaded {', '.join(unloaded)}")


# ---- the app ---------------------------------------------------------------------------------------
def create_app(mio: Any, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="mio serve", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)
    worker = Worker(mio, settings)
    app.state.worker = worker
    app.state.mio = mio
    app.state.settings = settings
    started = time.time()

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Any:
        begin = time.perf_counter()
        response = await _guarded(request, call_next, settings)
        client = request.client.host if request.client else "-"
        log(f"{client} {request.method} {request.url.path} {response.status_code} {time.perf_counter() - begin:.3f}s")
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        from miocli.runtime import memory_in_use

        runtime = mio.runtime
        return {
            "status": "ok", "model": str(runtime.options.model or "default"), "loaded": runtime.loaded(),
            "memory_bytes": memory_in_use(), "uptime_s": round(time.time() - started, 1),
            "requests": worker.requests, "batches": worker.batches, "inputs": worker.items_done,
            "busy": worker.busy_since is not None, "version": _version(),
        }

    @app.post("/v1/run/{task}")
    async def run_task(task: str, request: Request) -> Any:
        body = await _json_body(request)
        job = job_from_json(mio, task, body)
        first = _validate(mio, job)
        if first is not None:
            return first
        worker.submit(job)
        return StreamingResponse(_ndjson(job, settings.request_timeout_s), media_type="application/x-ndjson")

    from miocli.server_openai import add_openai_routes

    add_openai_routes(app, worker)
    add_playground_routes(app)

    @app.exception_handler(MioError)
    async def mio_error(_request: Request, exc: MioError) -> Any:
        status = 400 if exc.exit_code in (1, 2) else 500
        return JSONResponse({"error": wire.error_to_json(exc)}, status_code=status)

    return app


# The playground page's files, shipped in the package; served as they are (no build step, no CDN).
PLAYGROUND_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                    "style.css": "text/css; charset=utf-8"}


def add_playground_routes(app: FastAPI) -> None:
    """`GET /` and its two assets: a page that drives this server's own API from a browser."""
    from importlib.resources import files

    from fastapi.responses import Response

    folder = files("miocli") / "playground"

    def asset(name: str) -> Response:
        # Files are read on each request: small, and a changed install shows at once.
        return Response(folder.joinpath(name).read_bytes(), media_type=PLAYGROUND_FILES[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                 "media-src 'self' data: blob:; style-src 'self'; script-src 'self'"})

    @app.get("/")
    async def page() -> Response:
        return asset("index.html")

    @app.get("/playground/{name}")
    async def playground_file(name: str) -> Response:
        if name not in PLAYGROUND_FILES or name == "index.html":
            return JSONResponse({"error": {"type": "UsageError", "message": f"no such file: {name}"}},
                                status_code=404)
        return asset(name)


def _version() -> str:
    from miocli import __version__

    return __version__


def _validate(mio: Any, job: Job) -> Any:
    """Settings are checked before the job is queued, so a bad request is a 400 and costs no batch."""
    try:
        mio.check_settings(job.task, job.settings, job.template)
    except MioError as exc:
        return JSONResponse({"error": wire.error_to_json(exc)}, status_code=400)
    return None


def job_from_json(mio: Any, task: str, body: Any) -> Job:
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise UsageError("'inputs' must be a non-empty list")
    settings = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise UsageError("'settings' must be an object")
    template = body.get("template")
    if template is not None and not isinstance(template, str):
        raise UsageError("'template' must be a string")
    task = task.replace("-", "_")
    items = [_chat_item(mio, i) if task == "chat" and isinstance(i, dict) and "messages" in i
             else wire.item_from_json(i) for i in inputs]
    return Job(task, items, settings,
               wire.examples_from_json(body.get("examples") or []), template, bool(body.get("embeddings_only")))


def _chat_item(mio: Any, data: dict[str, Any]) -> Item:
    """A conversation, templated here exactly as `Mio.chat` does in-process."""
    mode = data.get("mode") or "std"
    system = data.get("system")
    if not isinstance(mode, str) or (system is not None and not isinstance(system, str)):
        raise UsageError("'mode' and 'system' must be strings")
    from miocli.protocol import PromptText

    mio._require_instruct("chat")
    messages = data["messages"]
    if not isinstance(messages, list):
        raise UsageError("'messages' must be a list of {role, content} objects")
    # A turn the client marks as mio's own earlier answer keeps its media tokens; all else is user text.
    turns = [{"role": m.get("role"), "content": PromptText.trusted(m["content"])}
             if isinstance(m, dict) and m.get("trusted") is True and isinstance(m.get("content"), str)
             else {k: v for k, v in m.items() if k != "trusted"} if isinstance(m, dict) else m for m in messages]
    prompt = mio.chat_prompt(turns, mode=mode, system=system,
                             add_generation_prompt=data.get("add_generation_prompt", True) is not False)
    return Item(str(data.get("name", "")), {"mode": mode}, prompt=prompt)


async def _json_body(request: Any) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"the request body is not valid JSON ({str(exc)[:120]})") from None


async def events_of(job: Job, timeout_s: float) -> AsyncIterator[tuple[str, Any]]:
    """The job's events as the worker produces them, ending after its last result (or an error)."""
    deadline = time.monotonic() + timeout_s
    done = 0
    try:
        while done < len(job.items):
            try:
                kind, value = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancelled = True
                yield "error", EnvironmentProblem(f"the request took longer than {timeout_s:g} s",
                                                  hint="send fewer inputs per request or raise --request-timeout")
                return
            if kind == "result":
                done += 1
            yield kind, value
            if kind == "error":
                return
    finally:
        # A client that went away frees the rest of its work for others.
        job.cancelled = job.cancelled or done < len(job.items)


async def _ndjson(job: Job, timeout_s: float) -> AsyncIterator[bytes]:
    async for kind, value in events_of(job, timeout_s):
        if kind == "result":
            line: dict[str, Any] = {"type": "result", "result": wire.result_to_json(value)}
        elif kind == "part":
            index, part = value
            line = {"type": "part", "index": index, "part": wire.part_to_json(part)}
        else:
            line = {"type": "error", "error": wire.error_to_json(value)}
        yield (json.dumps(line) + "\n").encode()


async def _guarded(request: Any, call_next: Callable[[Any], Any], settings: ServeSettings) -> Any:
    """Key check and body size limit, before any handler reads the body."""
    def refuse(status: int, message: str, hint: str | None = None) -> Any:
        # The native error shape, with OpenAI's `param` and `code` so OpenAI clients read it too.
        return JSONResponse({"error": {"type": "UsageError", "message": message, "hint": hint, "exit_code": 2,
                                       "param": None, "code": None}}, status_code=status)

    # The page itself holds no secret: it loads without the key and asks for it before calling the API.
    public = request.method == "GET" and (request.url.path == "/" or request.url.path.startswith("/playground/"))
    if settings.api_key is not None and not public and not _authorized(request, settings.api_key):
        return refuse(401, "a valid API key is needed", "send it as 'Authorization: Bearer KEY' (MIO_API_KEY)")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
        return refuse(413, f"the request body is larger than {settings.max_body_bytes // 2**20} MiB",
                      "send fewer or smaller inputs per request")
    if length is None and request.method in ("POST", "PUT", "PATCH"):
        return refuse(411, "the request needs a Content-Length header", "send the body in one piece")
    return await call_next(request)


def _authorized(request: Any, key: str) -> bool:
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    return hmac.compare_digest(token.encode(), key.encode())


def serve(mio: Any, settings: ServeSettings) -> int:
    """Run the server until SIGTERM/SIGINT; in-flight requests are finished first."""
    import uvicorn

    app = create_app(mio, settings)
    where = f"http://{settings.host}:{settings.port}"
    log(f"listening on {where} (model {mio.runtime.model_dir}; components load on first use)")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(settings.request_timeout_s), lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
    # place that re-raise lands here instead of killing the process, so SIGTERM ends with exit 0.
    stopped_by: list[int] = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda received, _frame: stopped_by.append(received))
    server.run()
    log("stopped (in-flight requests were finished)")
    return 0
