"""`mio serve`: one warm MIO for every command, script and OpenAI client.

The server is a thin edge over the task core, assembled here: the worker that owns the model
(`worker.py`), the native route `POST /v1/run/{task}` (`native.py`), the OpenAI-compatible subset
(`openai/`), `GET /health` and the playground page. Safe by default: loopback unless an API key is
set, body size limits, per-request timeouts, 4xx JSON errors, one bad request never harms another.
"""

from __future__ import annotations

import hmac
import signal
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from miocli.errors import MioError, UsageError
from miocli.serve import wire
from miocli.serve.native import add_native_routes
from miocli.serve.openai.routes import add_openai_routes
from miocli.serve.worker import ServeSettings, Worker, log

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def check_bind(host: str, api_key: str | None, open_without_key: bool) -> None:
    if host not in LOOPBACK and not api_key and not open_without_key:
        raise UsageError(
            f"--host {host} would let anyone who can reach this machine use the model",
            hint="set --api-key KEY (clients send it as MIO_API_KEY or a Bearer token), or pass "
                 "--insecure-no-api-key to serve other machines without one",
        )


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
