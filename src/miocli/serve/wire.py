"""Inputs and results as JSON, for `mio serve` and its clients.

Media travel as bytes (base64): a client reads its files and sends their bytes, the server
never opens a path a client names. Images come back as PNG (lossless), recordings as float32
samples (exact: a wav's 16-bit samples would round on the way), so a client writes exactly the
files an in-process run writes.

Imports neither torch nor anything heavy: a client process stays light.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from miocli import errors
from miocli.core.inputs import Example, Item, Media
from miocli.core.results import Audio, Result, Segment, Step, StoryPart

ERRORS: dict[str, type[errors.MioError]] = {
    cls.__name__: cls for cls in (errors.MioError, errors.UsageError, errors.InputError, errors.ModelError,
                                  errors.EnvironmentProblem)
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise errors.UsageError(f"{what} is not valid base64 ({exc})") from None


# ---- inputs ------------------------------------------------------------------------------------
def media_to_json(media: Media) -> dict[str, Any]:
    """A media input as bytes: a path is read here, on the client's side."""
    if media.samples is not None:
        import numpy as np

        samples = np.ascontiguousarray(media.samples, dtype=np.float32)
        return {"kind": media.kind, "name": media.name, "samples": _b64(samples.tobytes()),
                "shape": list(samples.shape), "rate": media.rate}
    if media.image is not None:
        data = png(media.image)
    elif media.data is not None:
        data = media.data
    else:
        data = Path(media.path).read_bytes() if media.path is not None else b""
    return {"kind": media.kind, "name": media.name, "data": _b64(data)}


def media_from_json(data: dict[str, Any]) -> Media:
    kind, name = _text(data, "kind"), _text(data, "name")
    if kind not in ("image", "audio", "video"):
        raise errors.UsageError(f"media kind must be image, audio or video, not {kind!r}")
    if "samples" in data:
        import numpy as np

        raw = _unb64(_text(data, "samples"), f"{name}: samples")
        samples = np.frombuffer(raw, dtype=np.float32)
        shape = data.get("shape")
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape) and np.prod(shape) == samples.size:
            samples = samples.reshape(shape)
        return Media(kind, name, samples=samples, rate=data.get("rate"))
    return Media(kind, name, data=_unb64(_text(data, "data"), f"{name}: data"))


def prompt_to_json(prompt: Any) -> Any:
    """A ready prompt with the marks of its user text (what may not become tokens), or None."""
    if prompt is None:
        return None
    from miocli.protocol import PromptText

    plain = list(prompt.plain) if isinstance(prompt, PromptText) else [(0, len(prompt))]
    return {"text": str(prompt), "plain": [list(span) for span in plain]}


def prompt_from_json(data: Any) -> Any:
    from miocli.protocol import PromptText

    if data is None:
        return None
    if isinstance(data, str):
        return PromptText.user(data)  # unmarked text is user text: it cannot write tokens
    text = _text(data, "text")
    spans = data.get("plain")
    if not isinstance(spans, list) or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in s)
            for s in spans):
        raise errors.UsageError("a prompt's 'plain' must be a list of [start, end] pairs")
    parts: list[tuple[str, bool]] = []
    position = 0
    for start, end in spans:
        if not position <= start <= end <= len(text):
            raise errors.UsageError("a prompt's 'plain' spans must be in order and inside its text")
        parts += [(text[position:start], False), (text[start:end], True)]
        position = end
    parts.append((text[position:], False))
    return PromptText(parts)


def item_to_json(item: Item) -> dict[str, Any]:
    return {"name": item.name, "fields": item.fields, "media": [media_to_json(m) for m in item.media],
            "sample": item.sample, "with_timbre": item.with_timbre, "prompt": prompt_to_json(item.prompt)}


def item_from_json(data: Any) -> Item:
    if not isinstance(data, dict):
        raise errors.UsageError("each input must be an object")
    fields = data.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        raise errors.UsageError("an input's fields must map names to strings")
    media = data.get("media") or []
    if not isinstance(media, list):
        raise errors.UsageError("an input's media must be a list")
    prompt = prompt_from_json(data.get("prompt"))
    sample = data.get("sample", 0)
    if isinstance(sample, bool) or not isinstance(sample, int):
        raise errors.UsageError("an input's sample must be a whole number")
    return Item(_text(data, "name"), dict(fields), [media_from_json(m) for m in media], sample=sample,
                with_timbre=bool(data.get("with_timbre")), prompt=prompt)


def examples_to_json(examples: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    from miocli.core.inputs import to_media

    return [{**media_to_json(to_media(media, f"example {n + 1}")), "answer": answer}
            for n, (media, answer) in enumerate(examples)]


def examples_from_json(data: Any) -> list[Example]:
    if not isinstance(data, list):
        raise errors.UsageError("examples must be a list")
    return [Example(media_from_json(e), _text(e, "answer")) for e in data]


def _text(data: Any, key: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str):
        raise errors.UsageError(f"{key!r} must be a string")
    return value


# ---- results -----------------------------------------------------------------------------------
def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def audio_to_json(audio: Audio) -> dict[str, Any]:
    import numpy as np

    return {"rate": audio.rate, "samples": _b64(np.ascontiguousarray(audio.samples, dtype=np.float32).tobytes())}


def audio_from_json(data: dict[str, Any]) -> Audio:
    import numpy as np

    return Audio(np.frombuffer(_unb64(data["samples"], "samples"), dtype=np.float32).copy(), int(data["rate"]))


def image_from_png(data: str) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(_unb64(data, "image"))) as opened:
        opened.load()
        return opened.copy()


def error_to_json(exc: errors.MioError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code,
            "source": getattr(exc, "source", None)}


def error_from_json(data: dict[str, Any]) -> errors.MioError:
    cls = ERRORS.get(str(data.get("type")), errors.MioError)
    if cls is errors.InputError:
        return errors.InputError(str(data.get("message")), data.get("hint"), source=data.get("source"))
    exc = cls(str(data.get("message")), data.get("hint"))
    if cls is errors.MioError:
        exc.exit_code = int(data.get("exit_code", 3))
    return exc


def part_to_json(part: StoryPart) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": part.kind, "text": part.text}
    if part.image is not None:
        out["image"] = _b64(png(part.image))
    if part.audio is not None:
        out["audio"] = audio_to_json(part.audio)
    return out


def part_from_json(data: dict[str, Any]) -> StoryPart:
    return StoryPart(data["kind"], data.get("text", ""),
                     image_from_png(data["image"]) if data.get("image") else None,
                     audio_from_json(data["audio"]) if data.get("audio") else None)


def result_to_json(result: Result) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": result.task, "input": result.input, "index": result.index, "text": result.text, "raw": result.raw,
        "token_ids": result.token_ids, "problems": result.problems, "image_ids": result.image_ids,
        "speech_codes": result.speech_codes, "chunks": result.chunks,
        "segments": [segment.to_record() for segment in result.segments],
        "images": [_b64(png(image)) for image in result.images],
        "audio": [audio_to_json(audio) for audio in result.audio],
        # Parts name their media by position in images/audio instead of sending them twice.
        "parts": [{"kind": p.kind, "text": p.text, "ref": _ref(result, p)} for p in result.parts],
        "steps": [{"stage": s.stage, "text": s.text, "ref": _index(result.images, s.image)} for s in result.steps],
    }
    if result.embeddings is not None:
        import numpy as np

        embeddings = np.ascontiguousarray(result.embeddings, dtype=np.float32)
        out["embeddings"] = {"shape": list(embeddings.shape), "data": _b64(embeddings.tobytes())}
    if result.error is not None:
        out["error"] = error_to_json(result.error)
    return out


def _index(items: list[Any], value: Any) -> int | None:
    return next((n for n, item in enumerate(items) if item is value), None)


def _ref(result: Result, part: StoryPart) -> int | None:
    if part.image is not None:
        return _index(result.images, part.image)
    if part.audio is not None:
        return _index(result.audio, part.audio)
    return None


def result_from_json(data: dict[str, Any]) -> Result:
    images = [image_from_png(i) for i in data.get("images", [])]
    audio = [audio_from_json(a) for a in data.get("audio", [])]
    result = Result(
        task=data["task"], input=data["input"], index=int(data["index"]), text=data.get("text", ""),
        raw=data.get("raw", ""), token_ids=data.get("token_ids", []), problems=data.get("problems", []),
        images=images, audio=audio, image_ids=data.get("image_ids", []), speech_codes=data.get("speech_codes", []),
        chunks=int(data.get("chunks", 1)),
        segments=[Segment(float(s["start"]), float(s["end"]), str(s["text"])) for s in data.get("segments", [])],
    )
    for part in data.get("parts", []):
        ref = part.get("ref")
        result.parts.append(StoryPart(
            part["kind"], part.get("text", ""),
            image=images[ref] if part["kind"] == "image" and ref is not None else None,
            audio=audio[ref] if part["kind"] == "audio" and ref is not None else None))
    for step in data.get("steps", []):
        ref = step.get("ref")
        result.steps.append(Step(step["stage"], step.get("text", ""), images[ref] if ref is not None else None))
    if data.get("embeddings"):
        import numpy as np

        embeddings = data["embeddings"]
        result.embeddings = np.frombuffer(_unb64(embeddings["data"], "embeddings"),
                                          dtype=np.float32).reshape(embeddings["shape"])
    if data.get("error"):
        result.error = error_from_json(data["error"])
    return result
