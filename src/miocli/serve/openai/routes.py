"""The OpenAI routes on the app: one handler per endpoint, every failure as an OpenAI error response."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from miocli.errors import MioError
from miocli.serve.openai.audio import speech, transcriptions
from miocli.serve.openai.chat import chat_completions
from miocli.serve.openai.images import edits, generations
from miocli.serve.openai.protocol import MODEL_ID, OpenAIError, from_mio
from miocli.serve.worker import log


def _handler(func: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
    """Every failure of an OpenAI route as an OpenAI error response."""
    @functools.wraps(func)
    async def wrapped(request: Request) -> Any:
        try:
            return await func(request)
        except OpenAIError as exc:
            return exc.response()
        except MioError as exc:
            return from_mio(exc, queued=False).response()
        except Exception as exc:  # a bug: logged here, the client gets no traceback
            log(f"unexpected {exc.__class__.__name__} in {request.url.path}: {exc}")
            return OpenAIError(f"the server failed on this request ({exc.__class__.__name__})", status=500,
                               kind="server_error").response()
    return wrapped


def add_openai_routes(app: Any, worker: Any) -> None:
    mio = worker.mio

    started = int(time.time())
    card = {"id": MODEL_ID, "object": "model", "created": started, "owned_by": "m-a-p"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> Any:
        if model != MODEL_ID:
            return OpenAIError(f"the model '{model}' does not exist; this server serves '{MODEL_ID}'", status=404,
                               param="model", code="model_not_found").response()
        return card

    routes: dict[str, Callable[[Any, Any, Request], Awaitable[Any]]] = {
        "/v1/chat/completions": chat_completions, "/v1/images/generations": generations, "/v1/images/edits": edits,
        "/v1/audio/transcriptions": transcriptions, "/v1/audio/speech": speech,
    }
    for path, route in routes.items():
        app.post(path)(_handler(_bound(route, mio, worker)))
    _shape_http_errors(app)


def _bound(route: Callable[[Any, Any, Request], Awaitable[Any]], mio: Any,
           worker: Any) -> Callable[[Request], Awaitable[Any]]:
    async def endpoint(request: Request) -> Any:
        return await route(mio, worker, request)

    endpoint.__name__ = route.__name__.lstrip("_")
    return endpoint


def _shape_http_errors(app: Any) -> None:
    """404/405 under /v1/ in OpenAI's shape (the native /v1/run/ routes keep FastAPI's)."""
    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException

    async def handler(request: Request, exc: HTTPException) -> Any:
        path = request.url.path
        if path.startswith("/v1/") and not path.startswith("/v1/run/"):
            return OpenAIError(f"{exc.detail}: {request.method} {path}", status=exc.status_code,
                               code="unknown_url" if exc.status_code == 404 else None).response()
        return await http_exception_handler(request, exc)

    app.add_exception_handler(HTTPException, handler)
