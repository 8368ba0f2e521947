"""The native route, `POST /v1/run/{task}`: every task, inputs as `wire` JSON, NDJSON results as they come.

This is what `--server URL` (`serve.client.RemoteMio`) and the playground page speak.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from miocli.core.inputs import Item
from miocli.errors import MioError, UsageError
from miocli.serve import wire
from miocli.serve.guard import read_json_body
from miocli.serve.worker import Job, ServeSettings, Worker, events_of


def add_native_routes(app: FastAPI, mio: Any, worker: Worker, settings: ServeSettings) -> None:
    @app.post("/v1/run/{task}")
    async def run_task(task: str, request: Request) -> Any:
        body = await _json_body(request)
        job = job_from_json(mio, task, body)
        first = _validate(mio, job)
        if first is not None:
            return first
        worker.submit(job)
        return StreamingResponse(_ndjson(mio, job, settings.request_timeout_s), media_type="application/x-ndjson")


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
    # The answers' text as it is generated ("tokens" lines), for clients that show it as it comes.
    streams_tokens = body.get("stream_tokens", False)
    if not isinstance(streams_tokens, bool):
        raise UsageError("'stream_tokens' must be true or false")
    return Job(task, items, settings, wire.examples_from_json(body.get("examples") or []), template,
               bool(body.get("embeddings_only")), streams_tokens=streams_tokens)


def _chat_item(mio: Any, data: dict[str, Any]) -> Item:
    """A conversation, taken as `Mio.chat` takes it in-process (its media encoded with the batch)."""
    mode = data.get("mode") or "std"
    system = data.get("system")
    if not isinstance(mode, str) or (system is not None and not isinstance(system, str)):
        raise UsageError("'mode' and 'system' must be strings")
    from miocli.protocol import PromptText

    mio._require_instruct("chat")
    messages = data["messages"]
    if not isinstance(messages, list):
        raise UsageError("'messages' must be a list of {role, content} objects")
    # A turn the client marks as mio's own earlier answer keeps its media tokens; all else is user text,
    # and media come as their bytes: the server opens no file a client names.
    turns = [{"role": m.get("role"), "content": PromptText.trusted(m["content"])}
             if isinstance(m, dict) and m.get("trusted") is True and isinstance(m.get("content"), str)
             else {k: v for k, v in m.items() if k != "trusted"} if isinstance(m, dict) else m for m in messages]
    conversation = mio.conversation(turns, mode=mode, system=system, files=False)
    fields = {"mode": mode}
    if data.get("add_generation_prompt", True) is False:
        fields["add_generation_prompt"] = "false"
    if not any(t.media for t in conversation):
        from miocli.core.conversation import filled

        # Text alone is templated here, so that a bad conversation is refused before it is queued.
        return Item(str(data.get("name", "")), fields, prompt=filled(conversation, mode, "add_generation_prompt"
                                                                     not in fields))
    return Item(str(data.get("name", "")), fields, turns=conversation)


async def _json_body(request: Any) -> Any:
    return await read_json_body(request)  # a large body is parsed off the event loop


async def _ndjson(mio: Any, job: Job, timeout_s: float) -> AsyncIterator[bytes]:
    from miocli.core.deltas import TextDeltas

    deltas: dict[int, TextDeltas] = {}
    async for kind, value in events_of(job, timeout_s):
        if kind == "tokens":
            index, ids = value
            stream = deltas.setdefault(index, TextDeltas(mio.runtime.tokenizer.decode))
            line: dict[str, Any] = {"type": "tokens", "index": index, "ids": ids, "text": stream.push(ids)}
        elif kind == "result":
            line = {"type": "result", "result": wire.result_to_json(value)}
        elif kind == "part":
            index, part = value
            line = {"type": "part", "index": index, "part": wire.part_to_json(part)}
        else:
            line = {"type": "error", "error": wire.error_to_json(value)}
        yield (json.dumps(line) + "\n").encode()
