"""`POST /v1/audio/transcriptions` (asr) and `/v1/audio/speech` (tts)."""

from __future__ import annotations

import io
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse, Response

from miocli.core.inputs import Item, Media
from miocli.core.tasks import AUDIO
from miocli.serve.openai.plans import Plan, run_plan
from miocli.serve.openai.protocol import AUDIO_TYPES, OpenAIError, json_object, read_form
from miocli.serve.openai.schema import SpeechRequest, TranscriptionRequest, parse

UNSUPPORTED_TRANSCRIPTION = ("timestamp_granularities", "chunking_strategy", "include")


async def transcriptions(mio: Any, worker: Any, request: Request) -> Any:
    texts, files = await read_form(request)
    uploads = files.pop("file", [])
    if len(uploads) != 1 or files:
        raise OpenAIError("send exactly one audio file (field 'file')", param="file")
    for key in UNSUPPORTED_TRANSCRIPTION:
        if key in texts or f"{key}[]" in texts:
            raise OpenAIError(f"'{key}' is not supported by MIO", param=key, code="unsupported_parameter")
    body = parse(TranscriptionRequest, dict(texts), form=True)
    response_format = body.response_format
    settings = body.mio_settings()
    name, data = uploads[0]
    [result] = await run_plan(mio, worker, Plan("asr", "asr", [Item(name, {}, [Media(AUDIO, name, data=data)])],
                                                settings), request)
    if response_format == "text":
        return PlainTextResponse(result.text)
    if response_format == "json":
        return {"text": result.text}
    if response_format in ("srt", "vtt"):
        from miocli.output.transcripts import render

        return PlainTextResponse(render(result, response_format) + "\n")
    segments = [{"id": n, **segment.to_record()} for n, segment in enumerate(result.segments)]
    return {"task": "transcribe", "language": texts.get("language", "unknown"), "duration": _duration(data),
            "text": result.text, "segments": segments}


def _duration(data: bytes) -> float:
    import soundfile

    try:
        return float(soundfile.info(io.BytesIO(data)).duration)
    except RuntimeError:  # a header soundfile cannot read, though the core could: not worth a failure
        return 0.0


async def speech(mio: Any, worker: Any, request: Request) -> Any:
    # MIO speaks in one voice, chosen by the model; it takes no delivery instructions.
    body = parse(SpeechRequest, await json_object(request))
    text, response_format = body.input, body.response_format
    if not text.strip():
        raise OpenAIError("'input' is empty", param="input")
    settings = body.mio_settings()
    [result] = await run_plan(mio, worker, Plan("tts", "tts", [Item(text, {"text": text})], settings), request)
    return Response(result.audio[0].to_bytes(response_format), media_type=AUDIO_TYPES[response_format])
