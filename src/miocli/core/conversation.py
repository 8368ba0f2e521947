"""The conversation model every front end shares: a turn is a role and ordered parts (text, image, audio, video).

    turns = parse_messages([{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image", "path": "photo.jpg"}]}])

Contents may be text, a list of parts, or one media value. A part is text (a str or
`{"type": "text"}`), an OpenAI part (`{"type": "image_url"}` with a data URL or a local path,
`{"type": "input_audio"}`), `{"type": "image" | "audio" | "video", "path": …}`, or a media value
(a Path, file bytes, a PIL image, `(samples, rate)`): a file's kind comes from its content, not its name.

A media part is encoded by its codec once (`Conversation.encode`) and keeps its token strings, so
the next turn reuses them. In the prompt a turn's parts are joined as the reference's templates join
them (text and media by a newline, media next to media as they are, `What am I eating?\\n<image_placeholder_0>`);
media take placeholders numbered across the conversation (images and video frames one count, speech the
other), filled with their token strings. User text stays text; only codecs and mio's own answers
(`Turn.raw`) write media tokens.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miocli import protocol
from miocli.core.inputs import Media, to_media
from miocli.core.tasks import AUDIO, IMAGE, VIDEO
from miocli.errors import InputError, MioError, UsageError
from miocli.protocol import PromptText

TEXT = "text"
ROLES = ("system", "user", "assistant")
_KINDS = {IMAGE: IMAGE, AUDIO: AUDIO, VIDEO: VIDEO, "speech": AUDIO}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)", re.DOTALL)

# File signatures: an attachment's kind comes from its first bytes, whatever its name says.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_AUDIO_MAGIC = (b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def sniff_kind(head: bytes) -> str | None:
    """Image, audio or video from a file's first 16 bytes; None for anything else."""
    if head[:4] == b"RIFF":
        return {b"WAVE": AUDIO, b"WEBP": IMAGE, b"AVI ": VIDEO}.get(head[8:12])
    if head.startswith(_IMAGE_MAGIC):
        return IMAGE
    if head.startswith(_AUDIO_MAGIC):
        return AUDIO
    if head[4:8] == b"ftyp" or head.startswith(b"\x1a\x45\xdf\xa3"):
        return VIDEO
    return None


def attachment(path: str | Path, where: str = "") -> Media:
    """A file as media, its kind read from its content; InputError naming it when it is missing or not media."""
    shown = str(path)
    prefix = f"{where}: " if where else ""
    try:
        with open(Path(path).expanduser(), "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        raise InputError(f"{prefix}cannot attach {shown}: no such file", hint="check the path", source=shown) from None
    except IsADirectoryError:
        raise InputError(f"{prefix}cannot attach {shown}: it is a folder", hint="attach a file", source=shown) from None
    except OSError as exc:
        raise InputError(f"{prefix}cannot attach {shown}: {exc.strerror}", source=shown) from None
    kind = sniff_kind(head)
    if kind is None:
        raise InputError(f"{prefix}cannot attach {shown}: it is not an image, a recording or a video",
                         hint="attach a PNG/JPEG/WebP/GIF/BMP/TIFF image, a WAV/FLAC/OGG/MP3 file or an MP4/MKV/"
                              "WebM/AVI video", source=shown)
    return Media(kind, shown, path=Path(path).expanduser())


@dataclass
class Part:
    """Text, or one image / recording / video; a media part keeps its token strings once encoded."""

    kind: str
    text: str = ""
    media: Media | None = None
    # One string per image, per video keyframe, or per recording.
    tokens: list[str] | None = None
    # Where a media part came from or was written to (for /save and the printed answer).
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.kind == TEXT:
            return {"type": "text", "text": self.text}
        if self.path is None:
            raise UsageError(f"a {self.kind} given in memory cannot be saved as a path",
                             hint="save conversations whose media are files")
        return {"type": self.kind, "path": str(Path(self.path).resolve())}


@dataclass
class Turn:
    """One message. `raw`, when set, is mio's own answer exactly as generated: its media token strings
    are tokens (trusted), and the prompt takes it instead of the parts."""

    role: str
    parts: list[Part] = field(default_factory=list)
    raw: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts if p.kind == TEXT)

    @property
    def media(self) -> list[Part]:
        return [p for p in self.parts if p.kind != TEXT]

    def to_json(self) -> dict[str, Any]:
        if all(p.kind == TEXT for p in self.parts):
            return {"role": self.role, "content": self.text}
        return {"role": self.role, "content": [p.to_json() for p in self.parts]}


def answer_parts(text: str, files: dict[str, list[str]]) -> list[Part]:
    """An answer's parts in reading order: its text, and its pictures and speech as the files they were
    written to (`files` by kind, "image" and "speech"), for saving the conversation."""
    parts: list[Part] = []
    position = 0
    for match in _ANSWER_MEDIA.finditer(text):
        if text[position:match.start()].strip():
            parts.append(Part(TEXT, text=text[position:match.start()].strip()))
        kind, number = match.group(1), int(match.group(2))
        paths = files.get(kind, [])
        if number < len(paths):
            parts.append(Part(IMAGE if kind == "image" else AUDIO, path=paths[number]))
        position = match.end()
    if text[position:].strip() or not parts:
        parts.append(Part(TEXT, text=text[position:].strip()))
    return parts


def answer_turn(result: Any, files: dict[str, list[str]] | None = None) -> Turn:
    """mio's answer as the conversation's next turn: in the prompt exactly as generated (its pictures and
    speech stay tokens), its parts naming the files they were written to (`files` by kind)."""
    return Turn("assistant", answer_parts(result.text, files or {}), raw=result.raw.strip())


_ANSWER_MEDIA = re.compile(r"<(image|speech)_placeholder_(\d+)>")


def parse_messages(messages: Any, base: Path | None = None, *, files: bool = True) -> list[Turn]:
    """Turns from `[{role, content}, …]` (Turns pass through); relative paths are read from `base`.

    Without `files` (a server reading a client's messages) a part naming a path or a URL is refused:
    media come as their bytes (`{"type": "image", "data": base64}`, data URLs, input_audio)."""
    if isinstance(messages, str):
        return [Turn("user", [Part(TEXT, text=messages)])]
    turns: list[Turn] = []
    for n, message in enumerate(messages):
        if isinstance(message, Turn):
            turns.append(message)
            continue
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise UsageError(f"message {n} should be an object with \"role\" and \"content\"")
        role = message["role"]
        if role not in ROLES:
            raise UsageError(f"message {n} has role {role!r}; use system, user or assistant")
        content = message["content"]
        if isinstance(content, PromptText) and content and not content.plain:
            # mio's own earlier answer (an interactive session's history): its token strings are tokens.
            turns.append(Turn(role, [Part(TEXT, text=str(content))], raw=str(content)))
            continue
        if isinstance(content, PromptText):
            turns.append(Turn(role, [Part(TEXT, text=content)]))  # marked text keeps its marks
            continue
        parts = parse_content(content, f"message {n}", base if files else _NO_FILES)
        if role == "system" and any(p.kind != TEXT for p in parts):
            raise UsageError(f"message {n}: a system message holds text only")
        turns.append(Turn(role, parts))
    return turns


# The `base` of a server's parsing: no path is read.
_NO_FILES = Path("\0no files")


def parse_content(content: Any, where: str, base: Path | None = None) -> list[Part]:
    if isinstance(content, str):
        return [Part(TEXT, text=content)]
    if not isinstance(content, (list, tuple)) or (isinstance(content, tuple) and _is_recording(content)):
        return [_media_part(content, where, base)]
    return [_part(item, f"{where} part {k}", base) for k, item in enumerate(content)]


def _is_recording(value: tuple[Any, ...]) -> bool:
    return len(value) == 2 and isinstance(value[1], int) and hasattr(value[0], "shape")


def _part(item: Any, where: str, base: Path | None) -> Part:
    if isinstance(item, str):
        return Part(TEXT, text=item)
    if not isinstance(item, dict):
        return _media_part(item, where, base)
    kind = item.get("type")
    if kind == TEXT:
        if not isinstance(item.get("text"), str):
            raise UsageError(f"{where}: a text part needs its \"text\"")
        return Part(TEXT, text=item["text"])
    if kind == "image_url":
        value = item.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            raise UsageError(f"{where}: an image_url part needs its url")
        return _image_url(url, where, base)
    if kind == "input_audio":
        value = item.get("input_audio")
        data = value.get("data") if isinstance(value, dict) else None
        if not isinstance(data, str):
            raise UsageError(f"{where}: an input_audio part needs base64 \"data\"")
        return Part(AUDIO, media=Media(AUDIO, f"{where} audio", data=_b64(data, where)))
    if kind in _KINDS and isinstance(item.get("data"), str):
        data = _b64(item["data"], where)
        found = sniff_kind(data[:16])
        if found != _KINDS[kind]:
            raise InputError(f"{where}: the data is {found or 'not media'}, not {_KINDS[kind]}", source=where)
        return Part(found, media=Media(found, f"{where} {found}", data=data))
    if kind in _KINDS:
        source = item.get("path", item.get(kind))
        if isinstance(source, str):
            media = _path_media(source, where, base)
            if media.kind != _KINDS[kind]:
                raise InputError(f"{where}: {source} holds {media.kind}, not {_KINDS[kind]}", source=source)
            return Part(media.kind, media=media, path=str(media.path))
        if source is None:
            raise UsageError(f"{where}: a {kind} part needs its \"path\"")
        return _media_part(source, where, base)
    raise UsageError(f"{where}: part type {kind!r} is not supported",
                     hint="use text, image_url, input_audio, or image/audio/video with a path")


def _media_part(value: Any, where: str, base: Path | None) -> Part:
    if base == _NO_FILES and not isinstance(value, (bytes, bytearray, memoryview)):
        raise UsageError(f"{where}: a {type(value).__name__} is not a message part here")
    if isinstance(value, Path):
        media = _path_media(str(value), where, base)
        return Part(media.kind, media=media, path=str(media.path))
    if isinstance(value, (bytes, bytearray, memoryview)):
        kind = sniff_kind(bytes(value[:16]))
        if kind is None:
            raise InputError(f"{where}: the bytes are not an image, a recording or a video", source=where)
        return Part(kind, media=Media(kind, where, data=bytes(value)))
    try:
        media = to_media(value, where)
    except MioError as exc:
        raise InputError(exc.message, exc.hint, source=where) from None
    return Part(media.kind, media=media)


def _path_media(source: str, where: str, base: Path | None) -> Media:
    if base == _NO_FILES:
        raise UsageError(f"{where}: the server reads no files", hint="send the media's bytes as base64 \"data\"")
    path = Path(source).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return attachment(path, where)


def _image_url(url: str, where: str, base: Path | None) -> Part:
    if re.match(r"https?://", url, re.IGNORECASE):
        raise UsageError(f"{where}: mio downloads nothing; give the image as a file or a data URL")
    match = _DATA_URL.fullmatch(url)
    if match is None:
        return _media_part(Path(url.removeprefix("file://")), where, base)
    if ";base64" not in match.group("params").lower() or not (match.group("mime") or "").startswith("image/"):
        raise UsageError(f"{where}: the image_url must be a base64 image data URL (data:image/png;base64,...)")
    return Part(IMAGE, media=Media(IMAGE, f"{where} image", data=_b64(match.group("data"), where)))


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{where}: the data is not valid base64") from None


# ---- the prompt ---------------------------------------------------------------------------------
def contents(turns: Sequence[Turn]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The chat template's {role, content} turns (placeholders in place) and the image and speech
    strings that fill them, in placeholder order. Every media part must be encoded."""
    images: list[str] = []
    speeches: list[str] = []
    messages: list[dict[str, Any]] = []
    for n, turn in enumerate(turns):
        if turn.raw is not None:
            messages.append({"role": turn.role, "content": PromptText.trusted(turn.raw)})
            continue
        pieces: list[tuple[str, bool]] = []
        previous: str | None = None
        for part in turn.parts:
            if part.kind == TEXT:
                from miocli.core.validate import check_text

                check_text(part.text, f"content of message {n}")
                # User text unless the caller marked it (a PromptText keeps its own marks).
                piece: tuple[str, bool] = (part.text, not isinstance(part.text, PromptText))
            else:
                if part.tokens is None:
                    raise UsageError(f"message {n}: its {part.kind} is not encoded yet")
                target = speeches if part.kind == AUDIO else images
                placeholder = protocol.speech_placeholder if part.kind == AUDIO else protocol.image_placeholder
                piece = ("".join(placeholder(len(target) + k) for k in range(len(part.tokens))), False)
                target.extend(part.tokens)
            if previous is not None and (previous == TEXT or part.kind == TEXT):
                pieces.append(("\n", False))
            pieces.append(piece)
            previous = part.kind
        messages.append({"role": turn.role, "content": PromptText(pieces)})
    return messages, images, speeches


def prompt_text(turns: Sequence[Turn], mode: str, add_generation_prompt: bool = True) -> tuple[
        PromptText, list[str], list[str]]:
    """The conversation in the reference's chat template (placeholders kept), and its media strings."""
    messages, images, speeches = contents(turns)
    if mode == "custom" and (not messages or messages[0]["role"] != "system"):
        raise UsageError("custom mode needs a system turn first",
                         hint="pass --system TEXT or start the messages with one")
    text = protocol.apply_chat_template([messages], mode, add_generation_prompt=add_generation_prompt)[0]
    return (text if isinstance(text, PromptText) else PromptText.trusted(text)), images, speeches


def filled(turns: Sequence[Turn], mode: str, add_generation_prompt: bool = True) -> PromptText:
    """The prompt with its media token strings in place (what is tokenized)."""
    text, images, speeches = prompt_text(turns, mode, add_generation_prompt)
    result = protocol.fill_placeholders(text, images, speeches)
    return result if isinstance(result, PromptText) else PromptText.trusted(result)


def to_wire(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """The turns as JSON messages a server takes: media as base64 data, mio's own answers marked `trusted`."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.raw is not None:
            messages.append({"role": turn.role, "content": turn.raw, "trusted": True})
            continue
        if all(part.kind == TEXT for part in turn.parts):
            messages.append({"role": turn.role, "content": turn.text})
            continue
        content: list[dict[str, Any]] = []
        for part in turn.parts:
            if part.kind == TEXT:
                content.append({"type": "text", "text": part.text})
            elif part.media is not None:
                content.append({"type": part.kind, "data": base64.b64encode(_bytes(part.media)).decode("ascii")})
        messages.append({"role": turn.role, "content": content})
    return messages


def _bytes(media: Media) -> bytes:
    """A media input's file bytes (a PIL image as PNG, samples as WAV)."""
    import io

    if media.data is not None:
        return media.data
    if media.path is not None:
        try:
            return media.path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {media.path}: {exc.strerror}", source=media.name) from None
    buffer = io.BytesIO()
    if media.image is not None:
        media.image.save(buffer, format="PNG")
        return buffer.getvalue()
    from miocli.core.results import Audio
    from miocli.media.audio import audio_from_array

    return Audio(audio_from_array(media.samples, media.rate, media.name)).to_bytes("wav")
