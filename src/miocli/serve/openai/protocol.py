"""What every OpenAI endpoint shares: the body reader, data URLs and base64, and OpenAI's error shape.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 4xx for what the
client can fix, 5xx only for a problem of the server or the model, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from miocli.errors import MioError, UsageError
from miocli.serve.guard import read_json_body

MODEL_ID = "mio"
MAX_IMAGES = 10
MAX_BEAMS = 64
AUDIO_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac")
AUDIO_EXPIRY_S = 3600

class OpenAIError(Exception):
    """A request that gets an OpenAI-shaped error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        # The official clients retry 5xx answers; rerunning a failed generation gives the same failure.
        return JSONResponse(body, status_code=self.status, headers={"x-should-retry": "false"})


def from_mio(exc: MioError, queued: bool, limit_name: str = "max_new_tokens") -> OpenAIError:
    """A core error: the client's (4xx) unless the model or machine failed on queued work.

    The core's messages name the CLI's options; here they get the request's names (`--top-p` is
    `top_p`, `--max-new-tokens` the chat's `max_tokens`), and the first one is the error's param.
    """
    names: list[str] = []

    def plain(match: re.Match[str]) -> str:
        name = match.group(1).replace("-", "_")
        names.append(limit_name if name == "max_new_tokens" else name)
        return names[-1]

    text = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
    message = re.sub(r"(?<![\w-])--([a-z][a-z-]*)", plain, text)
    if queued and exc.exit_code not in (1, 2):
        return OpenAIError(message, status=500, kind="server_error", code="server_error")
    # OpenAI's codes, not mio's class names: an input past the context, or a value the client can fix.
    code = "context_length_exceeded" if "context" in exc.message else "invalid_value"
    return OpenAIError(message, param=names[0] if names else None, code=code)


async def json_object(request: Request) -> dict[str, Any]:
    try:
        body = await read_json_body(request)  # a large body is parsed off the event loop
    except UsageError as exc:
        raise OpenAIError(exc.message) from None
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    return {k: v for k, v in body.items() if v is not None}


async def read_form(request: Request) -> tuple[dict[str, str], dict[str, list[tuple[str, bytes]]]]:
    """A multipart body's text fields and uploaded files (by field name, `image[]` as `image`)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError("this endpoint takes multipart/form-data (a file upload)")
    try:
        form = await request.form()
    except Exception as exc:  # python-multipart's and Starlette's parse errors have no common base
        raise OpenAIError(f"cannot read the multipart body ({str(exc)[:120]})") from None
    texts: dict[str, str] = {}
    files: dict[str, list[tuple[str, bytes]]] = {}
    for key, value in form.multi_items():
        name = key[:-2] if key.endswith("[]") else key
        if isinstance(value, str):
            texts[name] = value
        else:
            files.setdefault(name, []).append((value.filename or name, await value.read()))
    await form.close()
    return texts, files


def square_size(value: Any) -> int | None:
    """'256x256' → 256; 'auto' or nothing keeps the model's size."""
    if value is None or value == "auto":
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if match is None:
        raise OpenAIError(f"size {value!r} is not WIDTHxHEIGHT, e.g. 256x256", param="size")
    width, height = int(match.group(1)), int(match.group(2))
    if width != height:
        raise OpenAIError(f"size {value} is not square: MIO draws square images only", param="size")
    return width  # the core checks the side (a multiple of 64, at most 2048)


def b64decode(text: Any, what: str, param: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise OpenAIError(f"{what} must be a non-empty base64 string", param=param)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(f"{what} is not valid base64", param=param) from None
