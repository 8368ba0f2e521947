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
from miocli.serve.openai.protocol import OpenAIError, json_object, read_form, square_size
from miocli.serve.openai.schema import ImageRequest, parse


def _image_settings(request: ImageRequest) -> dict[str, Any]:
    """Settings of an image request (generations and edits take the same)."""
    if not request.prompt.strip():
        raise OpenAIError("'prompt' is empty", param="prompt")
    settings = request.mio_settings()
    for name in ("steps", "guidance"):
        if getattr(request, name) is not None:
            settings[name] = getattr(request, name)
    size = square_size(request.size)
    if size is not None:
        settings["size"] = size
    if request.n > 1:
        # As `imagine -n`: n different samples, told apart by their sample number under one seed.
        settings.setdefault("sample", True)
    return settings


def _image_response(results: list[Result]) -> dict[str, Any]:
    data = [{"b64_json": base64.b64encode(wire.png(r.images[0])).decode("ascii")} for r in results]
    return {"created": int(time.time()), "data": data, "output_format": "png"}


async def generations(mio: Any, worker: Any, request: Request) -> Any:
    body = parse(ImageRequest, await json_object(request))
    settings, prompt = _image_settings(body), body.prompt
    items = [Item(prompt, {"caption": prompt}, sample=k) for k in range(body.n)]
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
    body = parse(ImageRequest, dict(texts), form=True)
    settings, prompt = _image_settings(body), body.prompt
    name, data = images[0]
    media = Media(IMAGE, name, data=data)
    items = [Item(name, {"question": prompt, "instruction": prompt}, [media], sample=k) for k in range(body.n)]
    results = await run_plan(mio, worker, Plan("edit", "edit", items, settings), request)
    return await asyncio.to_thread(_image_response, results)
