"""`mio serve`: one warm MIO for every command, script and OpenAI client.

The server is a thin edge over the task core, assembled here: the worker that owns the model
(`worker.py`), the native route `POST /v1/run/{task}` (`native.py`), the OpenAI-compatible subset
(`openai/`), `GET /health` and the playground page. Safe by default: loopback unless an API key is
set, body size limits, per-request timeouts, 4xx JSON errors, one bad request never harms another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from miocli.errors import EnvironmentProblem, MioError, UsageError
from miocli.serve import wire
from miocli.serve.guard import LOOPBACK, Guard, GuardSettings, GuardState
from miocli.serve.native import add_native_routes
from miocli.serve.openai.routes import add_openai_routes
from miocli.serve.worker import ServeSettings, Worker, log


def check_bind(host: str, api_key: str | None, open_without_key: bool) -> None:
    if host not in LOOPBACK and not api_key and not open_without_key:
        raise UsageError(
            f"--host {host} would let anyone who can reach this machine use the model",
            hint="set --api-key KEY (clients send it as MIO_API_KEY or a Bearer token), or pass "
                 "--insecure-no-api-key to serve other machines without one",
        )


def create_app(mio: Any, settings: ServeSettings, allowed: GuardSettings | None = None) -> FastAPI:
    app = FastAPI(title="mio serve", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)
    worker = Worker(mio, settings)
    app.state.worker = worker
    app.state.mio = mio
    app.state.settings = settings
    started = time.time()

    # Pure ASGI, outside the routes: it reads the body before any route does (see guard.py).
    app.state.guard = GuardState()
    app.add_middleware(Guard, settings=settings, allowed=allowed or GuardSettings(), state=app.state.guard)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        from miocli.model.runtime import memory_in_use

        runtime = mio.runtime
        return {
            "status": "ok", "model": str(runtime.options.model or "default"), "loaded": runtime.loaded(),
            "memory_bytes": memory_in_use(), "uptime_s": round(time.time() - started, 1),
            "requests": worker.requests, "batches": worker.batches, "inputs": worker.items_done,
            "tokens": worker.tokens_generated,
            "busy": worker.busy_since is not None, "version": _version(),
        }

    add_native_routes(app, mio, worker, settings)
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

    folder = files("miocli.serve") / "playground"

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


# Once the in-flight requests are drained or cancelled: how long their connections may take to send
# the last lines, and how long the model thread may take to leave its generation step.
CLOSE_S = 3.0
JOIN_S = 3.0


def listen_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything says "listening": a busy port is one line, exit 3."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot listen on {host}:{port}: {exc.strerror or exc} (check --host)") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse the port
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        busy = exc.errno == errno.EADDRINUSE
        raise EnvironmentProblem(f"cannot listen on {host}:{port}: " + (
            "the port is in use (stop what listens there, or pick another --port)" if busy
            else f"{exc.strerror or exc} (check --host and --port)")) from None
    return sock


def serve(mio: Any, settings: ServeSettings, allowed: GuardSettings | None = None,
          shutdown_timeout_s: float = 10.0) -> int:
    """Run the server until SIGTERM/SIGINT, then stop within a bounded time and exit 0.

    On the signal it stops accepting at once and ends uploads still arriving (503); requests in
    flight get `shutdown_timeout_s` to finish, then the worker cancels them (they end with an error
    line); the model thread is joined before returning.
    """
    import uvicorn

    sock = listen_socket(settings.host, settings.port)
    app = create_app(mio, settings, allowed)
    worker: Worker = app.state.worker
    guard: GuardState = app.state.guard

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for listener in self.servers:
                listener.close()
            guard.close()
            deadline = time.monotonic() + shutdown_timeout_s
            while guard.active and time.monotonic() < deadline and not self.force_exit:
                await asyncio.sleep(0.05)
            worker.shutdown(0)  # cancels what is left; the thread is joined below
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=int(CLOSE_S),
                            lifespan="off")
    server = Server(config)
    # Before uvicorn installs its own handlers (and after it restores these), a signal asks it to
    # stop: one that comes right after "listening" is not lost, and uvicorn's re-raise of the signal
    # that stopped it lands here instead of killing the process, so SIGTERM ends with exit 0.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, server.handle_exit)
    log(f"listening on http://{settings.host}:{settings.port} (model {mio.runtime.model_dir}; components load "
        "on first use)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not worker.shutdown(JOIN_S):
        # The model thread is still inside a generation step that does not check for cancellation.
        # Letting the interpreter exit now would tear torch down under it ("terminate called without
        # an active exception", exit 134); a daemon thread cannot be stopped from outside, so leave
        # without the interpreter's teardown, after flushing what was written.
        log("stopped (the model was still inside a generation step: not waiting for it)")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)
    log("stopped")
    return 0
