"""`POST /v1/images/generations` and `/v1/images/edits`: imagine and edit, PNGs as base64."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import Request

from miocli.core.inputs import Item, Media
from miocli.core.results import Result
from miocli.core.tasks import IMAGE
from miocli.serve import wire
from miocli.serve.openai.plans import Plan, run_plan
from miocli.serve.openai.protocol import (
    GENERATION_EXTRAS,
    IGNORED,
    MAX_IMAGES,
    PIXEL_EXTRAS,
    OpenAIError,
    count_field,
    json_object,
    mio_settings,
    read_form,
    refuse_unknown,
    square_size,
    text_field,
)

IMAGE_FIELDS = {"model", "prompt", "n", "size", "response_format", "output_format", *GENERATION_EXTRAS,
                *PIXEL_EXTRAS}


def _image_settings(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Settings and count of an image request (generations and edits take the same)."""
    # Quality and style name OpenAI's own models' variants.
    refuse_unknown(body, IMAGE_FIELDS, IGNORED | {"quality", "style"})
    response_format = body.get("response_format", "b64_json")
    if response_format != "b64_json":
        raise OpenAIError("only response_format b64_json is supported: the server keeps no files to link to",
                          param="response_format", code="unsupported_parameter")
    if body.get("output_format", "png") != "png":
        raise OpenAIError("only output_format png is supported", param="output_format")
    count = count_field(body.get("n"), "n", MAX_IMAGES)
    settings = mio_settings(body, {**GENERATION_EXTRAS, **PIXEL_EXTRAS})
    size = square_size(body.get("size"))
    if size is not None:
        settings["size"] = size
    if count > 1:
        # As `imagine -n`: n different samples, told apart by their sample number under one seed.
        settings.setdefault("sample", True)
    return settings, count


def _image_response(results: list[Result]) -> dict[str, Any]:
    data = [{"b64_json": base64.b64encode(wire.png(r.images[0])).decode("ascii")} for r in results]
    return {"created": int(time.time()), "data": data, "output_format": "png"}


async def generations(mio: Any, worker: Any, request: Request) -> Any:
    body = await json_object(request)
    prompt = text_field(body, "prompt") or ""
    if not prompt.strip():
        raise OpenAIError("'prompt' is empty", param="prompt")
    settings, count = _image_settings(body)
    text_field(body, "model", required=False)
    items = [Item(prompt, {"caption": prompt}, sample=k) for k in range(count)]
    results = await run_plan(mio, worker, Plan("imagine", "imagine", items, settings), request)
    return await asyncio.to_thread(_image_response, results)  # PNG encoding is slow for big images


async def edits(mio: Any, worker: Any, request: Request) -> Any:
    texts, files = await read_form(request)
    if "mask" in files or "mask" in texts:
        raise OpenAIError("masks are not supported: MIO edits the whole image", param="mask",
                          code="unsupported_parameter")
    images = files.pop("image", [])
    if len(images) != 1 or files:
        raise OpenAIError("send exactly one image file (field 'image') and no other files", param="image")
    body: dict[str, Any] = dict(texts)
    prompt = text_field(body, "prompt") or ""
    if not prompt.strip():
        raise OpenAIError("'prompt' is empty", param="prompt")
    body.pop("prompt")
    settings, count = _image_settings(body)
    name, data = images[0]
    media = Media(IMAGE, name, data=data)
    items = [Item(name, {"question": prompt, "instruction": prompt}, [media], sample=k) for k in range(count)]
    results = await run_plan(mio, worker, Plan("edit", "edit", items, settings), request)
    return await asyncio.to_thread(_image_response, results)
