"""The OpenAI-compatible subset of `mio serve`, so existing OpenAI clients work unchanged.

Each request becomes a `Job` on the same worker as the native `/v1/run/{task}` requests, so
it is batched with them and its result comes back as soon as its batch is decoded. This
module only translates: OpenAI request → task, `Item`s and settings (checked before anything
is queued), and `Result` → OpenAI response. docs/server_openai.md lists what maps to what.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 4xx for what the
client can fix, 5xx only for a problem of the server or the model, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, fields
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from miocli import wire
from miocli.errors import MioError, UsageError
from miocli.inputs import Item, Media
from miocli.results import Result
from miocli.tasks import AUDIO, IMAGE

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


def _from_mio(exc: MioError, queued: bool, limit_name: str = "max_new_tokens") -> OpenAIError:
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


def _handler(func: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
    """Every failure of an OpenAI route as an OpenAI error response."""
    @functools.wraps(func)
    async def wrapped(request: Request) -> Any:
        try:
            return await func(request)
        except OpenAIError as exc:
            return exc.response()
        except MioError as exc:
            return _from_mio(exc, queued=False).response()
        except Exception as exc:  # a bug: logged here, the client gets no traceback
            from miocli.server import log

            log(f"unexpected {exc.__class__.__name__} in {request.url.path}: {exc}")
            return OpenAIError(f"the server failed on this request ({exc.__class__.__name__})", status=500,
                               kind="server_error").response()
    return wrapped


# ---- reading requests ---------------------------------------------------------------------------
async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise OpenAIError(f"the request body is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    return {k: v for k, v in body.items() if v is not None}


async def _form(request: Request) -> tuple[dict[str, str], dict[str, list[tuple[str, bytes]]]]:
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


def _refuse_unknown(body: dict[str, Any], known: set[str], ignored: set[str] = IGNORED) -> None:
    for key in body:
        if key not in known and key not in ignored:
            raise OpenAIError(f"unrecognized request argument supplied: {key}", param=key,
                              code="unknown_parameter")


def _text(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise OpenAIError(f"you must provide '{key}'", param=key, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise OpenAIError(f"'{key}' must be a string", param=key)
    return value


def _typed(value: Any, kind: str, key: str) -> Any:
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


def _settings(body: dict[str, Any], extras: dict[str, str], **known: Any) -> dict[str, Any]:
    """MIO settings from the request (and `known` ones already read): types checked here, ranges
    by the core before queueing (`_check`)."""
    given = {key: _typed(body[key], kind, key) for key, kind in extras.items() if key in body}
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


def _square_size(value: Any) -> int | None:
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


def _count(value: Any, key: str, high: int) -> int:
    count = 1 if value is None else _typed(value, "int", key)
    if not 1 <= count <= high:
        raise OpenAIError(f"'{key}' must be between 1 and {high}", param=key)
    return int(count)


def _b64decode(text: Any, what: str, param: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise OpenAIError(f"{what} must be a non-empty base64 string", param=param)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(f"{what} is not valid base64", param=param) from None


# ---- planning: request → job ----------------------------------------------------------------------
@dataclass
class Plan:
    """A job to queue and what the response needs to know about it."""

    task: str  # the core's task name (Mio.stream)
    table: str  # the task table's entry, whose preset and output the settings are checked against
    items: list[Item]
    settings: dict[str, Any]
    # Set for prompts without media, whose token count is known without encoding anything.
    prompt: str | None = None
    # The request's name for max_new_tokens, for the core's "too small for an image" message.
    limit_name: str = "max_new_tokens"
    max_new_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _check(mio: Any, plan: Plan) -> None:
    """The core's own checks on the settings, before anything is queued: a bad value costs no batch."""
    from miocli.api import GenerationOptions
    from miocli.tasks import TASKS

    try:
        mio.check_settings(plan.task, plan.settings)
        names = {f.name for f in fields(GenerationOptions)} - {"seed", "batch_size", "constrain"}
        options = GenerationOptions(**{k: v for k, v in plan.settings.items() if k in names})
        plan.max_new_tokens = mio.engine.settings_for(TASKS[plan.table], options.overrides()).max_new_tokens
    except UsageError as exc:
        raise _from_mio(exc, queued=False, limit_name=plan.limit_name) from None


async def _results(mio: Any, worker: Any, plan: Plan) -> list[Result]:
    """Queue the plan's job and wait for all its results; a failed input fails the request."""
    from miocli.server import Job, events_of

    _check(mio, plan)
    job = Job(plan.task, plan.items, plan.settings, [], None, False)
    worker.submit(job)
    timeout = worker.settings.request_timeout_s
    started = time.monotonic()
    results: list[Result | None] = [None] * len(plan.items)
    try:
        async with aclosing(events_of(job, timeout)) as events:
            async for kind, value in events:
                if kind == "result":
                    results[value.index] = value
                elif kind == "error":
                    if time.monotonic() - started >= timeout:
                        raise OpenAIError(value.message, status=504, kind="timeout", code="timeout")
                    raise _from_mio(value, queued=True, limit_name=plan.limit_name)
    except asyncio.CancelledError:
        job.cancelled = True  # the client went away: its place in the queue goes to others
        raise
    done = [r for r in results if r is not None]
    for result in done:
        if result.error is not None:
            raise _from_mio(result.error, queued=True, limit_name=plan.limit_name)
    if len(done) != len(plan.items):
        raise OpenAIError("the server lost part of this request's results", status=500, kind="server_error")
    return done


async def _prompt_tokens(mio: Any, plan: Plan) -> int:
    """The prompt's token count when it has no media (counting those would mean encoding them again)."""
    if plan.prompt is None:
        return 0
    from miocli.pipeline import Prompt

    return len(await asyncio.to_thread(mio.prompt_ids, Prompt(plan.prompt)))


# ---- chat -------------------------------------------------------------------------------------------
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
               "stream", "stream_options", "modalities", "audio", *CHAT_EXTRAS,
               # Accepted at their "off" values only (see _refuse_features).
               "tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format",
               "stop", "presence_penalty", "frequency_penalty", "logit_bias", "prediction", "reasoning_effort",
               "web_search_options", "verbosity"}


def _refuse_features(body: dict[str, Any]) -> None:
    """Options MIO cannot honour are refused unless they are at the value that means "not used"."""
    unused: dict[str, Callable[[Any], bool]] = {
        "tools": lambda v: v == [], "functions": lambda v: v == [],
        "tool_choice": lambda v: v == "none", "function_call": lambda v: v == "none",
        "logprobs": lambda v: v is False, "top_logprobs": lambda v: v == 0,
        "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
        "stop": lambda v: v in ([], ""), "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0,
        "logit_bias": lambda v: v == {}, "prediction": lambda v: False, "reasoning_effort": lambda v: False,
        "web_search_options": lambda v: False, "verbosity": lambda v: False,
    }
    for key, is_unused in unused.items():
        if key in body and not is_unused(body[key]):
            raise OpenAIError(f"'{key}' is not supported by MIO", param=key, code="unsupported_parameter")


@dataclass
class Turn:
    role: str
    text: str
    media: list[Media]


def _turns(messages: Any) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty list", param="messages")
    turns = []
    counter = [0]
    for n, message in enumerate(messages):
        param = f"messages[{n}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"{param} must be an object", param=param)
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(f"{param}: role {role!r} is not supported; use system, user or assistant",
                              param=f"{param}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise OpenAIError(f"{param}: tool calls are not supported by MIO", param=f"{param}.tool_calls")
        if role == "assistant" and message.get("audio") is not None:
            raise OpenAIError(f"{param}: the server keeps no audio to refer to by id",
                              param=f"{param}.audio", code="unsupported_parameter")
        text, media = _content(message.get("content"), f"{param}.content", counter)
        if media and role != "user":
            raise OpenAIError(f"{param}: only user messages may hold images or audio", param=f"{param}.content")
        turns.append(Turn(role, text, media))
    return turns


def _content(content: Any, param: str, counter: list[int]) -> tuple[str, list[Media]]:
    """A message's text (parts joined by newlines) and its media."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise OpenAIError(f"{param} must be a string or a list of content parts", param=param)
    texts: list[str] = []
    media: list[Media] = []
    for n, part in enumerate(content):
        where = f"{param}[{n}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise OpenAIError(f"{where}: a text part needs its text", param=f"{where}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            counter[0] += 1
            media.append(_image_url(part.get("image_url"), where, counter[0]))
        elif kind == "input_audio":
            counter[0] += 1
            media.append(_input_audio(part.get("input_audio"), where, counter[0]))
        else:
            raise OpenAIError(f"{where}: content part type {kind!r} is not supported; use text, image_url "
                              "(data URL) or input_audio", param=where)
    return "\n".join(texts), media


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)", re.DOTALL)


def _image_url(value: Any, where: str, number: int) -> Media:
    url = value.get("url") if isinstance(value, dict) else value
    param = f"{where}.image_url.url"
    if not isinstance(url, str):
        raise OpenAIError(f"{where}: image_url needs a url", param=param)
    if re.match(r"https?://", url, re.IGNORECASE):
        raise OpenAIError(f"{where}: the server downloads nothing; send the image as a data URL "
                          "(data:image/png;base64,...)", param=param, code="unsupported_url")
    match = _DATA_URL.fullmatch(url)
    if match is None or ";base64" not in match.group("params").lower():
        raise OpenAIError(f"{where}: the image must be a base64 data URL (data:image/png;base64,...)", param=param)
    mime = match.group("mime") or ""
    if not mime.lower().startswith("image/"):
        raise OpenAIError(f"{where}: the data URL holds {mime or 'no type'}, not an image", param=param)
    return Media(IMAGE, f"image {number}", data=_b64decode(match.group("data"), f"{where}: the image", param))


def _input_audio(value: Any, where: str, number: int) -> Media:
    if not isinstance(value, dict):
        raise OpenAIError(f"{where}: input_audio must be an object with data and format", param=where)
    kind = value.get("format")
    if kind not in INPUT_AUDIO_FORMATS:
        raise OpenAIError(f"{where}: audio format {kind!r} is not supported; use {', '.join(INPUT_AUDIO_FORMATS)}",
                          param=f"{where}.input_audio.format")
    data = _b64decode(value.get("data"), f"{where}: the audio", f"{where}.input_audio.data")
    return Media(AUDIO, f"audio {number}.{kind}", data=data)


def _chat_plan(mio: Any, body: dict[str, Any]) -> Plan:
    _refuse_unknown(body, CHAT_FIELDS, IGNORED | {"parallel_tool_calls"})
    _refuse_features(body)
    _text(body, "model")
    if "n" in body and _typed(body["n"], "int", "n") != 1:
        raise OpenAIError("'n' must be 1: one answer per request (send several requests, they are batched)",
                          param="n", code="unsupported_parameter")
    modalities = body.get("modalities", ["text"])
    if not isinstance(modalities, list) or not modalities or any(m not in ("text", "audio") for m in modalities):
        raise OpenAIError("'modalities' must be [\"text\"] or [\"text\", \"audio\"]", param="modalities")
    spoken = "audio" in modalities
    audio_format = _audio_format(body.get("audio"), spoken)
    limits = {k: _typed(body[k], "int", k) for k in ("max_completion_tokens", "max_tokens") if k in body}
    if len(set(limits.values())) > 1:
        raise OpenAIError("'max_tokens' and 'max_completion_tokens' differ", param="max_tokens")
    known = {"max_new_tokens": next(iter(limits.values()))} if limits else {}
    settings = _settings(body, {**CHAT_EXTRAS, "seed": "int", "temperature": "number", "top_p": "number"}, **known)
    turns = _turns(body.get("messages"))
    media = [m for turn in turns for m in turn.media]
    plan = _media_plan(turns, media, spoken, settings) if media else _conversation_plan(mio, turns, spoken, settings)
    plan.extra = {"audio_format": audio_format, "spoken": spoken}
    plan.limit_name = next(iter(limits), "max_tokens")
    return plan


def _audio_format(value: Any, spoken: bool) -> str:
    if value is None:
        return "wav"
    if not spoken:
        raise OpenAIError("'audio' needs \"audio\" in 'modalities'", param="audio")
    kind = value.get("format", "wav") if isinstance(value, dict) else None
    if not isinstance(kind, str) or kind not in AUDIO_TYPES:
        raise OpenAIError(f"audio format {kind!r} is not supported; use wav or flac", param="audio.format")
    return str(kind)


def _conversation_plan(mio: Any, turns: list[Turn], spoken: bool, settings: dict[str, Any]) -> Plan:
    """A text conversation, templated exactly as `Mio.chat` does (Instruct model)."""
    if turns[-1].role != "user":
        raise OpenAIError("the last message must be the user's", param="messages")
    system = [t.text for t in turns if t.role == "system"]
    if system and spoken:
        raise OpenAIError("a system message cannot be combined with a spoken answer: voice mode has its own",
                          param="messages")
    mode = "voice" if spoken else "custom" if system else "std"
    mio._require_instruct("chat")
    prompt = mio.chat_prompt([{"role": t.role, "content": t.text} for t in turns if t.role != "system"],
                             mode=mode, system="\n".join(system) if system else None)
    item = Item(turns[-1].text, {"mode": mode}, prompt=prompt)
    return Plan("chat", "speak" if spoken else "chat", [item], settings, prompt=prompt)


def _media_plan(turns: list[Turn], media: list[Media], spoken: bool, settings: dict[str, Any]) -> Plan:
    """One image or recording with an optional question: the task that answers it (see the docs' table)."""
    if len(media) > 1:
        raise OpenAIError("MIO takes one image or one recording per request", param="messages")
    if len(turns) != 1:
        raise OpenAIError("an image or recording must come in a single user message, without system or "
                          "earlier messages", param="messages")
    question = turns[0].text.strip()
    [given] = media
    if given.kind == IMAGE and spoken:
        raise OpenAIError("a spoken answer about an image is not supported; ask for text", param="modalities")
    if given.kind == AUDIO and spoken and question:
        raise OpenAIError("a spoken answer to a recording takes the recording alone, without text",
                          param="messages")
    if question:
        table = "ask-image" if given.kind == IMAGE else "ask-audio"
        item = Item(given.name, {"question": question, "instruction": question}, [given])
        return Plan("ask", table, [item], settings)
    task = "caption" if given.kind == IMAGE else "speech2speech" if spoken else "asr"
    return Plan(task, task, [Item(given.name, {}, [given])], settings)


def _transcript(result: Result) -> str:
    return re.sub(r"<(image|speech)_placeholder_\d+>", "", result.text).strip()


def _finish_reason(plan: Plan, result: Result, prompt_tokens: int, context: int | None) -> str:
    """"length" when the answer ran into max_tokens or the model's context, else "stop"."""
    # The core drops the stop token, so the limits are what tell. A long recording is transcribed
    # in parts, each with its own limit.
    if result.chunks > 1:
        return "stop"
    used = len(result.token_ids)
    full = context is not None and prompt_tokens > 0 and prompt_tokens + used >= context
    return "length" if used >= plan.max_new_tokens or full else "stop"


def _context_length(mio: Any) -> int | None:
    from miocli.pipeline import context_length

    return context_length(mio.runtime)  # from config.json when the LLM was unloaded meanwhile


def _message(plan: Plan, result: Result) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
    if plan.extra["spoken"]:
        audio_format = plan.extra["audio_format"]
        message["content"] = None  # as OpenAI: a spoken answer's words are its transcript
        message["audio"] = {"id": f"audio_{secrets.token_hex(12)}",
                            "data": base64.b64encode(result.audio[0].to_bytes(audio_format)).decode("ascii"),
                            "expires_at": int(time.time()) + AUDIO_EXPIRY_S, "transcript": _transcript(result)}
    return message


async def _chat(mio: Any, worker: Any, request: Request) -> Any:
    body = await _json_object(request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError("'stream' must be true or false", param="stream")
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or not set(options) <= {"include_usage", "include_obfuscation"}:
        raise OpenAIError("'stream_options' may only hold include_usage", param="stream_options")
    plan = _chat_plan(mio, body)
    # Generation is not token-streamed: the answer is awaited first, so a bad input is still a 400.
    [result] = await _results(mio, worker, plan)
    prompt_tokens = await _prompt_tokens(mio, plan)
    context = await asyncio.to_thread(_context_length, mio)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids),
             "total_tokens": prompt_tokens + len(result.token_ids)}
    ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": ident, "created": created, "model": MODEL_ID, "system_fingerprint": None}
    message, finish = _message(plan, result), _finish_reason(plan, result, prompt_tokens, context)
    if not stream:
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
    chunk = {**head, "object": "chat.completion.chunk"}
    with_usage = options.get("include_usage") is True
    content = {k: v for k, v in message.items() if k in ("content", "audio") and v is not None}
    deltas = [({"role": "assistant", "content": ""}, None), (content, None), ({}, finish)]

    async def events() -> AsyncIterator[bytes]:
        for delta, reason in deltas:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            yield _sse({**chunk, "choices": [choice], **({"usage": None} if with_usage else {})})
        if with_usage:
            yield _sse({**chunk, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


# ---- images -----------------------------------------------------------------------------------------
IMAGE_FIELDS = {"model", "prompt", "n", "size", "response_format", "output_format", *GENERATION_EXTRAS,
                *PIXEL_EXTRAS}


def _image_settings(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Settings and count of an image request (generations and edits take the same)."""
    # Quality and style name OpenAI's own models' variants.
    _refuse_unknown(body, IMAGE_FIELDS, IGNORED | {"quality", "style"})
    response_format = body.get("response_format", "b64_json")
    if response_format != "b64_json":
        raise OpenAIError("only response_format b64_json is supported: the server keeps no files to link to",
                          param="response_format", code="unsupported_parameter")
    if body.get("output_format", "png") != "png":
        raise OpenAIError("only output_format png is supported", param="output_format")
    count = _count(body.get("n"), "n", MAX_IMAGES)
    settings = _settings(body, {**GENERATION_EXTRAS, **PIXEL_EXTRAS})
    size = _square_size(body.get("size"))
    if size is not None:
        settings["size"] = size
    if count > 1:
        # As `imagine -n`: n different samples, told apart by their sample number under one seed.
        settings.setdefault("sample", True)
    return settings, count


def _image_response(results: list[Result]) -> dict[str, Any]:
    data = [{"b64_json": base64.b64encode(wire.png(r.images[0])).decode("ascii")} for r in results]
    return {"created": int(time.time()), "data": data, "output_format": "png"}


async def _generations(mio: Any, worker: Any, request: Request) -> Any:
    body = await _json_object(request)
    prompt = _text(body, "prompt") or ""
    if not prompt.strip():
        raise OpenAIError("'prompt' is empty", param="prompt")
    settings, count = _image_settings(body)
    _text(body, "model", required=False)
    items = [Item(prompt, {"caption": prompt}, sample=k) for k in range(count)]
    results = await _results(mio, worker, Plan("imagine", "imagine", items, settings))
    return await asyncio.to_thread(_image_response, results)  # PNG encoding is slow for big images


async def _edits(mio: Any, worker: Any, request: Request) -> Any:
    texts, files = await _form(request)
    if "mask" in files or "mask" in texts:
        raise OpenAIError("masks are not supported: MIO edits the whole image", param="mask",
                          code="unsupported_parameter")
    images = files.pop("image", [])
    if len(images) != 1 or files:
        raise OpenAIError("send exactly one image file (field 'image') and no other files", param="image")
    body: dict[str, Any] = dict(texts)
    prompt = _text(body, "prompt") or ""
    if not prompt.strip():
        raise OpenAIError("'prompt' is empty", param="prompt")
    body.pop("prompt")
    settings, count = _image_settings(body)
    name, data = images[0]
    media = Media(IMAGE, name, data=data)
    items = [Item(name, {"question": prompt, "instruction": prompt}, [media], sample=k) for k in range(count)]
    results = await _results(mio, worker, Plan("edit", "edit", items, settings))
    return await asyncio.to_thread(_image_response, results)


# ---- audio ------------------------------------------------------------------------------------------
TRANSCRIPTION_FIELDS = {"model", "response_format", "temperature", "stream", "timestamp_granularities",
                        "chunking_strategy", "include", "prompt", *GENERATION_EXTRAS}
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


async def _transcriptions(mio: Any, worker: Any, request: Request) -> Any:
    texts, files = await _form(request)
    uploads = files.pop("file", [])
    if len(uploads) != 1 or files:
        raise OpenAIError("send exactly one audio file (field 'file')", param="file")
    body: dict[str, Any] = dict(texts)
    # MIO's transcription has no language setting: the language is the recording's.
    _refuse_unknown(body, TRANSCRIPTION_FIELDS, IGNORED | {"language"})
    _text(body, "model")
    for key in ("timestamp_granularities", "chunking_strategy", "include"):
        if key in body:
            raise OpenAIError(f"'{key}' is not supported by MIO", param=key, code="unsupported_parameter")
    if body.get("stream", "false").lower() != "false":
        raise OpenAIError("streamed transcription is not supported", param="stream", code="unsupported_parameter")
    response_format = body.get("response_format", "json")
    if response_format not in TRANSCRIPTION_FORMATS:
        raise OpenAIError(f"response_format {response_format!r} is not supported; use "
                          f"{', '.join(TRANSCRIPTION_FORMATS)}", param="response_format")
    # The prompt (a style hint for Whisper) has no counterpart in MIO's transcription prompt.
    body.pop("prompt", None)
    settings = _settings(body, GENERATION_EXTRAS)
    name, data = uploads[0]
    [result] = await _results(mio, worker, Plan("asr", "asr", [Item(name, {}, [Media(AUDIO, name, data=data)])],
                                                settings))
    if response_format == "text":
        return PlainTextResponse(result.text)
    if response_format == "json":
        return {"text": result.text}
    return {"task": "transcribe", "language": texts.get("language", "unknown"), "duration": _duration(data),
            "text": result.text}


def _duration(data: bytes) -> float:
    import soundfile

    try:
        return float(soundfile.info(io.BytesIO(data)).duration)
    except RuntimeError:  # a header soundfile cannot read, though the core could: not worth a failure
        return 0.0


SPEECH_FIELDS = {"model", "input", "response_format", "speed", "stream_format", *GENERATION_EXTRAS}


async def _speech(mio: Any, worker: Any, request: Request) -> Any:
    body = await _json_object(request)
    # MIO speaks in one voice, chosen by the model; it takes no delivery instructions.
    _refuse_unknown(body, SPEECH_FIELDS, IGNORED | {"voice", "instructions"})
    _text(body, "model")
    text = _text(body, "input") or ""
    if not text.strip():
        raise OpenAIError("'input' is empty", param="input")
    response_format = body.get("response_format", "wav")
    if not isinstance(response_format, str) or response_format not in AUDIO_TYPES:
        raise OpenAIError(f"response_format {response_format!r} is not supported; use wav or flac",
                          param="response_format", code="unsupported_parameter")
    if body.get("speed", 1.0) != 1.0:
        raise OpenAIError("'speed' other than 1 is not supported", param="speed", code="unsupported_parameter")
    if body.get("stream_format", "audio") != "audio":
        raise OpenAIError("only stream_format audio is supported", param="stream_format")
    settings = _settings(body, GENERATION_EXTRAS)
    [result] = await _results(mio, worker, Plan("tts", "tts", [Item(text, {"text": text})], settings))
    return Response(result.audio[0].to_bytes(response_format), media_type=AUDIO_TYPES[response_format])


# ---- routes -----------------------------------------------------------------------------------------
def add_openai_routes(app: Any, worker: Any) -> None:
    mio = worker.mio

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": int(time.time()),
                                            "owned_by": "m-a-p"}]}

    routes: dict[str, Callable[[Any, Any, Request], Awaitable[Any]]] = {
        "/v1/chat/completions": _chat, "/v1/images/generations": _generations, "/v1/images/edits": _edits,
        "/v1/audio/transcriptions": _transcriptions, "/v1/audio/speech": _speech,
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
