"""What every OpenAI endpoint shares: the request's fields and typed values, and OpenAI's error shape.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 4xx for what the
client can fix, 5xx only for a problem of the server or the model, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import math
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

# MIO settings a client may add to any request (openai: `extra_body`), typed as JSON values.
GENERATION_EXTRAS = {"seed": "int", "max_new_tokens": "int", "temperature": "number", "top_p": "number",
                     "beams": "int", "sample": "bool", "repetition_penalty": "number", "constrain": "bool"}
PIXEL_EXTRAS = {"steps": "int", "guidance": "number"}
# Chat has OpenAI's own names for seed, temperature, top_p and the token limit.
CHAT_EXTRAS = {k: v for k, v in GENERATION_EXTRAS.items() if k in ("beams", "sample", "repetition_penalty",
                                                                   "constrain")}

# Request fields about the client's account, or hints MIO has no control for: accepted and ignored.
IGNORED = {"user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key"}


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
        return OpenAIError(message, status=500, kind="server_error", code=type(exc).__name__)
    return OpenAIError(message, param=names[0] if names else None, code=type(exc).__name__)


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


def refuse_unknown(body: dict[str, Any], known: set[str], ignored: set[str] = IGNORED) -> None:
    for key in body:
        if key not in known and key not in ignored:
            raise OpenAIError(f"unrecognized request argument supplied: {key}", param=key,
                              code="unknown_parameter")


def text_field(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise OpenAIError(f"you must provide '{key}'", param=key, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise OpenAIError(f"'{key}' must be a string", param=key)
    return value


def typed(value: Any, kind: str, key: str) -> Any:
    """A JSON value (or a multipart field's text) as the setting's type, or a 400."""
    if isinstance(value, str):
        value = _from_form_text(value, kind, key)
    if kind == "bool":
        if not isinstance(value, bool):
            raise OpenAIError(f"'{key}' must be true or false", param=key)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OpenAIError(f"'{key}' must be a number", param=key)
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise OpenAIError(f"'{key}' must be a whole number", param=key)
        return int(value)
    if not math.isfinite(value):
        raise OpenAIError(f"'{key}' must be a finite number", param=key)
    return float(value)


def _from_form_text(text: str, kind: str, key: str) -> Any:
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise OpenAIError(f"'{key}' must be true or false", param=key)
        return text.lower() == "true"
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        raise OpenAIError(f"'{key}' must be a {'whole number' if kind == 'int' else 'number'}", param=key) from None


def mio_settings(body: dict[str, Any], extras: dict[str, str], **known: Any) -> dict[str, Any]:
    """MIO settings from the request (and `known` ones already read): types checked here, ranges
    by the core before queueing (`check_plan`)."""
    given = {key: typed(body[key], kind, key) for key, kind in extras.items() if key in body}
    return _with_sampling({**given, **known})


def _with_sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's sampling knobs in MIO's terms: temperature 0 is greedy, above 0 (or a top_p) samples.

    Without either the task keeps its preset (beam search for text, as the CLI does). Ranges are
    the core's to check (`Mio.check_settings`), but for the number of beams: the core takes any,
    and a few hundred would hold the model for every other client.
    """
    if settings.get("beams", 1) > MAX_BEAMS:
        raise OpenAIError(f"beams must be at most {MAX_BEAMS} on the server", param="beams")
    temperature = settings.pop("temperature", None)
    if temperature is not None and temperature < 0:
        raise OpenAIError("temperature must be 0 or more", param="temperature")
    if "sample" not in settings and (temperature is not None or "top_p" in settings):
        settings["sample"] = temperature != 0
    if temperature:
        settings["temperature"] = temperature
    return settings


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


def count_field(value: Any, key: str, high: int) -> int:
    count = 1 if value is None else typed(value, "int", key)
    if not 1 <= count <= high:
        raise OpenAIError(f"'{key}' must be between 1 and {high}", param=key)
    return int(count)


def b64decode(text: Any, what: str, param: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise OpenAIError(f"{what} must be a non-empty base64 string", param=param)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(f"{what} is not valid base64", param=param) from None
