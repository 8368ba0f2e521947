"""`POST /v1/chat/completions`: a conversation, or one image or recording with a question, answered in
text or speech (`modalities`), plain or as server-sent events."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from miocli.core.conversation import TEXT, Part, Turn
from miocli.core.deltas import TextDeltas
from miocli.core.inputs import Item, Media
from miocli.core.results import Result
from miocli.core.tasks import AUDIO, IMAGE
from miocli.errors import MioError
from miocli.serve.openai.plans import Plan, count_prompt_tokens, job_error, run_plan, submit_plan, watch_client
from miocli.serve.openai.protocol import (
    AUDIO_EXPIRY_S,
    INPUT_AUDIO_FORMATS,
    MODEL_ID,
    OpenAIError,
    b64decode,
    from_mio,
    json_object,
)
from miocli.serve.openai.schema import ChatRequest, parse
from miocli.serve.worker import events_of

# Conversations longer than this are checked from their size first (a cheap bound; see check_text_size).
SIZE_CHECK_CHARS = 2**16

def _refuse_features(request: ChatRequest) -> None:
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
        value = getattr(request, key)
        if value is not None and not is_unused(value):
            raise OpenAIError(f"'{key}' is not supported by MIO", param=key, code="unsupported_parameter")


def _turns(messages: Any) -> list[Turn]:
    """The messages as the core's conversation turns (role + ordered parts), in OpenAI's errors."""
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
        parts = _content(message.get("content"), f"{param}.content", counter)
        if role == "system" and any(p.kind != TEXT for p in parts):
            raise OpenAIError(f"{param}: a system message holds text only", param=f"{param}.content")
        turns.append(Turn(role, parts))
    return turns


def _content(content: Any, param: str, counter: list[int]) -> list[Part]:
    """A message's parts in order: text, images and recordings."""
    if isinstance(content, str):
        return [Part(TEXT, text=content)]
    if not isinstance(content, list):
        raise OpenAIError(f"{param} must be a string or a list of content parts", param=param)
    parts: list[Part] = []
    for n, part in enumerate(content):
        where = f"{param}[{n}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise OpenAIError(f"{where}: a text part needs its text", param=f"{where}.text")
            parts.append(Part(TEXT, text=part["text"]))
        elif kind == "image_url":
            counter[0] += 1
            parts.append(Part(IMAGE, media=_image_url(part.get("image_url"), where, counter[0])))
        elif kind == "input_audio":
            counter[0] += 1
            parts.append(Part(AUDIO, media=_input_audio(part.get("input_audio"), where, counter[0])))
        else:
            raise OpenAIError(f"{where}: content part type {kind!r} is not supported; use text, image_url "
                              "(data URL) or input_audio", param=where)
    return parts


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
    return Media(IMAGE, f"image {number}", data=b64decode(match.group("data"), f"{where}: the image", param))


def _input_audio(value: Any, where: str, number: int) -> Media:
    if not isinstance(value, dict):
        raise OpenAIError(f"{where}: input_audio must be an object with data and format", param=where)
    kind = value.get("format")
    if kind not in INPUT_AUDIO_FORMATS:
        raise OpenAIError(f"{where}: audio format {kind!r} is not supported; use {', '.join(INPUT_AUDIO_FORMATS)}",
                          param=f"{where}.input_audio.format")
    data = b64decode(value.get("data"), f"{where}: the audio", f"{where}.input_audio.data")
    return Media(AUDIO, f"audio {number}.{kind}", data=data)


def _chat_plan(mio: Any, request: ChatRequest) -> Plan:
    _refuse_features(request)
    if request.n not in (None, 1):
        raise OpenAIError("'n' must be 1: one answer per request (send several requests, they are batched)",
                          param="n", code="unsupported_parameter")
    spoken = "audio" in (request.modalities or ["text"])
    if request.audio is not None and not spoken:
        raise OpenAIError("'audio' needs \"audio\" in 'modalities'", param="audio")
    limits = {k: v for k in ("max_completion_tokens", "max_tokens") if (v := getattr(request, k)) is not None}
    if len(set(limits.values())) > 1:
        raise OpenAIError("'max_tokens' and 'max_completion_tokens' differ", param="max_tokens")
    known = {"max_new_tokens": next(iter(limits.values()))} if limits else {}
    known.update({k: v for k in ("steps", "guidance", "size") if (v := getattr(request, k)) is not None})
    settings = request.mio_settings(**known)
    turns = _turns(request.messages)
    media = [p.media for turn in turns for p in turn.media if p.media is not None]
    # One image or recording alone in one message is the task that answers it (see the docs' table);
    # anything else is a conversation.
    single = len(media) == 1 and len(turns) == 1 and turns[0].role == "user"
    plan = _media_plan(turns, media, spoken, settings) if single else _conversation_plan(mio, turns, spoken, settings)
    plan.extra = {"audio_format": request.audio.format if request.audio else "wav", "spoken": spoken}
    plan.limit_name = next(iter(limits), "max_tokens")
    return plan


def _conversation_plan(mio: Any, turns: list[Turn], spoken: bool, settings: dict[str, Any]) -> Plan:
    """A conversation, templated exactly as `Mio.chat` does (Instruct model); its media are encoded with
    the batch it runs in."""
    if turns[-1].role != "user":
        raise OpenAIError("the last message must be the user's", param="messages")
    system = [t.text for t in turns if t.role == "system"]
    if system and spoken:
        raise OpenAIError("a system message cannot be combined with a spoken answer: voice mode has its own",
                          param="messages")
    mode = "voice" if spoken else "custom" if system else "std"
    mio._require_instruct("chat")
    conversation = mio.conversation([t for t in turns if t.role != "system"], mode=mode,
                                    system="\n".join(system) if system else None, files=False)
    if any(t.media for t in conversation):
        item = Item(turns[-1].text, {"mode": mode}, turns=conversation)
        return Plan("chat", "speak" if spoken else "chat", [item], settings)
    from miocli.core.conversation import filled

    prompt = filled(conversation, mode)
    item = Item(turns[-1].text, {"mode": mode}, prompt=prompt)
    return Plan("chat", "speak" if spoken else "chat", [item], settings, prompt=prompt)


def _media_plan(turns: list[Turn], media: list[Media], spoken: bool, settings: dict[str, Any]) -> Plan:
    """One image or recording with an optional question, in one message: the task that answers it."""
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
    from miocli.core.pipeline import context_length

    return context_length(mio.runtime)  # from config.json when the LLM was unloaded meanwhile


def _message(plan: Plan, result: Result) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
    if result.images and plan.task == "chat":
        # Pictures in an answer come as data URLs (OpenRouter's `images`); the text keeps a placeholder where
        # each stood, as Mio.chat's and the streamed pieces do.
        from miocli.serve.wire import png

        message["images"] = [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(png(image)).decode("ascii")}} for image in result.images]
    if plan.extra["spoken"]:
        audio_format = plan.extra["audio_format"]
        message["content"] = None  # as OpenAI: a spoken answer's words are its transcript
        message["audio"] = {"id": f"audio_{secrets.token_hex(12)}",
                            "data": base64.b64encode(result.audio[0].to_bytes(audio_format)).decode("ascii"),
                            "expires_at": int(time.time()) + AUDIO_EXPIRY_S, "transcript": _transcript(result)}
    return message


async def chat_completions(mio: Any, worker: Any, request: Request) -> Any:
    body = parse(ChatRequest, await json_object(request))
    plan = await _checked_plan(mio, body)
    if body.stream:
        with_usage = body.stream_options is not None and body.stream_options.include_usage is True
        return await _streamed(mio, worker, request, plan, with_usage)
    [result] = await run_plan(mio, worker, plan, request)
    usage, finish = await _usage(mio, plan, result)
    choice = {"index": 0, "message": _message(plan, result), "logprobs": None, "finish_reason": finish}
    return {**_head(), "object": "chat.completion", "choices": [choice], "usage": usage}


def _text_size(messages: list[Any]) -> int:
    """Characters of text in the messages (before their parts are checked: malformed ones count 0)."""
    size = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else [content]:
            text = part.get("text") if isinstance(part, dict) else part
            size += len(text) if isinstance(text, str) else 0
    return size


async def _checked_plan(mio: Any, body: ChatRequest) -> Plan:
    # A conversation of megabytes is refused from its size, before it is templated or tokenized.
    size = _text_size(body.messages)
    context = await asyncio.to_thread(_context_length, mio)
    if size > SIZE_CHECK_CHARS:
        try:
            await asyncio.to_thread(mio.engine.check_text_size, size)
        except MioError as exc:
            raise OpenAIError(f"{exc.message} ({exc.hint})", param="messages",
                              code="context_length_exceeded") from None
    for name in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
        value = getattr(body, name)
        if context is not None and value is not None and value >= context:
            raise OpenAIError(f"invalid '{name}': integer above maximum value; expected a value < {context} (the "
                              f"model's context), but got {value} instead", param=name,
                              code="integer_above_max_value")
    plan = _chat_plan(mio, body)
    plan.extra["context"] = context
    # Streamed answers come token by token, so with one beam unless the request asks for beams (a
    # beam's tokens are only final at its end): those come whole, as vLLM's do.
    if body.stream and "beams" not in plan.settings:
        plan.settings["beams"] = 1
    return plan


def _head() -> dict[str, Any]:
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": MODEL_ID,
            "system_fingerprint": None}


async def _usage(mio: Any, plan: Plan, result: Result) -> tuple[dict[str, int], str]:
    prompt_tokens = await count_prompt_tokens(mio, plan)
    context = plan.extra["context"]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids),
             "total_tokens": prompt_tokens + len(result.token_ids)}
    return usage, _finish_reason(plan, result, prompt_tokens, context)


async def _streamed(mio: Any, worker: Any, request: Request, plan: Plan, with_usage: bool) -> Any:
    """Server-sent events: a chunk per piece of text as the answer is generated (one beam), or the
    answer in one chunk (beams, spoken answers). Nothing is sent before generation has started, so a
    bad input is still a 400; a client that hangs up stops its generation at the next step."""
    spoken = plan.extra["spoken"]
    job = submit_plan(mio, worker, plan, streams_tokens=not spoken and plan.settings.get("beams", 1) == 1)
    events = events_of(job, worker.settings.request_timeout_s)
    watcher = asyncio.create_task(watch_client(request, job))
    try:
        first = await anext(events)
        if first[0] == "error":
            raise job_error(first[1], plan, job)
        if first[0] == "result" and first[1].error is not None:
            raise from_mio(first[1].error, queued=True, limit_name=plan.limit_name)
    except BaseException:
        watcher.cancel()
        job.cancelled = True
        await events.aclose()
        raise
    chunk = {**_head(), "object": "chat.completion.chunk"}
    usage_field = {"usage": None} if with_usage else {}
    deltas = TextDeltas(mio.runtime.tokenizer.decode)

    def sse(delta: dict[str, Any], reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return _sse({**chunk, "choices": [choice], **usage_field})

    async def body() -> AsyncIterator[bytes]:
        try:
            yield sse({"role": "assistant", "content": ""})
            event: tuple[str, Any] | None = first
            while event is not None:
                kind, value = event
                if kind == "tokens":
                    piece = deltas.push(value[1])
                    if piece:
                        yield sse({"content": piece})
                elif kind == "error" or (kind == "result" and value.error is not None):
                    problem = job_error(value, plan, job) if kind == "error" else \
                        from_mio(value.error, queued=True, limit_name=plan.limit_name)
                    yield _sse({"error": {"message": problem.message, "type": problem.kind,
                                          "param": problem.param, "code": problem.code}})
                    break
                elif kind == "result":
                    message = _message(plan, value)
                    rest = {k: v for k, v in message.items() if k in ("audio", "images") and v is not None}
                    if message.get("content"):
                        rest["content"] = deltas.finish(message["content"])
                    usage, finish = await _usage(mio, plan, value)
                    if rest.get("content") or "audio" in rest or "images" in rest:
                        yield sse(rest)
                    yield sse({}, finish)
                    if with_usage:
                        yield _sse({**chunk, "choices": [], "usage": usage})
                    break
                event = await anext(events, None)
            yield b"data: [DONE]\n\n"
        finally:
            watcher.cancel()
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
