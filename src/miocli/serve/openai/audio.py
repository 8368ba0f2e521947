"""`POST /v1/audio/transcriptions` (asr) and `/v1/audio/speech` (tts)."""

from __future__ import annotations

import io
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response

from miocli.core.inputs import Item, Media
from miocli.core.tasks import AUDIO
from miocli.serve.openai.plans import Plan, run_plan
from miocli.serve.openai.protocol import (
    AUDIO_TYPES,
    GENERATION_EXTRAS,
    IGNORED,
    OpenAIError,
    json_object,
    mio_settings,
    read_form,
    refuse_unknown,
    text_field,
)

TRANSCRIPTION_FIELDS = {"model", "response_format", "temperature", "stream", "timestamp_granularities",
                        "chunking_strategy", "include", "prompt", *GENERATION_EXTRAS}
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


async def transcriptions(mio: Any, worker: Any, request: Request) -> Any:
    texts, files = await read_form(request)
    uploads = files.pop("file", [])
    if len(uploads) != 1 or files:
        raise OpenAIError("send exactly one audio file (field 'file')", param="file")
    body: dict[str, Any] = dict(texts)
    # MIO's transcription has no language setting: the language is the recording's.
    refuse_unknown(body, TRANSCRIPTION_FIELDS, IGNORED | {"language"})
    text_field(body, "model")
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
    settings = mio_settings(body, GENERATION_EXTRAS)
    name, data = uploads[0]
    [result] = await run_plan(mio, worker, Plan("asr", "asr", [Item(name, {}, [Media(AUDIO, name, data=data)])],
                                                settings), request)
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


async def speech(mio: Any, worker: Any, request: Request) -> Any:
    body = await json_object(request)
    # MIO speaks in one voice, chosen by the model; it takes no delivery instructions.
    refuse_unknown(body, SPEECH_FIELDS, IGNORED | {"voice", "instructions"})
    text_field(body, "model")
    text = text_field(body, "input") or ""
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
    settings = mio_settings(body, GENERATION_EXTRAS)
    [result] = await run_plan(mio, worker, Plan("tts", "tts", [Item(text, {"text": text})], settings), request)
    return Response(result.audio[0].to_bytes(response_format), media_type=AUDIO_TYPES[response_format])
