"""Inputs as the task API takes them: paths, bytes, PIL images, audio arrays, or text.

`Item` is one input of a run: its name (for messages and records), the fields its prompt
template needs, its media (not loaded yet: loading happens batch by batch in the stream),
and a sample number that keeps repeated prompts (`imagine -n 3`) apart under one seed.
`expand_inputs` turns the CLI's arguments (files, folders, globs, '-') into paths.

No torch here.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli.core.tasks import AUDIO, IMAGE, VIDEO
from miocli.errors import InputError, UsageError

if TYPE_CHECKING:
    from miocli.media.video import FrameOptions

EXTENSIONS = {
    IMAGE: {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"},
    AUDIO: {".wav", ".flac", ".ogg", ".mp3", ".opus"},
    VIDEO: {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"},
}


def read_stdin(what: str) -> str:
    """All of stdin as text, or a usage error when it is closed or not UTF-8."""
    if sys.stdin is None:
        raise UsageError(f"stdin is closed, so '-' has no {what} to read", hint=f"give the {what} as arguments")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise UsageError(f"stdin is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         hint="convert it to UTF-8, e.g. with iconv") from None


def expand_inputs(values: Iterable[str], kind: str | tuple[str, ...], recursive: bool = False) -> list[Path]:
    """Files from arguments: paths, folders (recursive with -r), globs, or '-' (paths on stdin).

    A folder gives its files of `kind` (one kind, or several: tokenize takes images and audio).
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    suffixes = {suffix for k in kinds for suffix in EXTENSIONS[k]}
    found: list[Path] = []
    for value in values:
        if value == "-":
            found.extend(Path(line.strip()) for line in read_stdin("paths").splitlines() if line.strip())
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            files = sorted(p for p in walker if p.is_file() and not p.name.startswith("."))
            found.extend(p for p in files if p.suffix.lower() in suffixes)
            _note_skipped(path, [p for p in files if p.suffix.lower() not in suffixes], kinds)
        elif not path.exists() and glob.has_magic(value):
            found.extend(sorted(Path(p) for p in glob.glob(value, recursive=recursive)))
        else:
            found.append(path)  # a missing file is reported as that input's failure
    if not found:
        raise UsageError("no input files",
                         hint=f"give {' or '.join(kinds)} files, folders (with -r to recurse), globs or '-'")
    return found


_PLURALS = {IMAGE: "images", AUDIO: "audio files", VIDEO: "videos"}


def skipped_note(skipped: list[str], kinds: tuple[str, ...]) -> str:
    """'skipped 3: not images (readme.txt, sine.wav, broken.mp4)': what a folder held that the task does not take."""
    shown = ", ".join(skipped[:5]) + (", …" if len(skipped) > 5 else "")
    return f"skipped {len(skipped)}: not {' or '.join(_PLURALS.get(k, k) for k in kinds)} ({shown})"


def _note_skipped(folder: Path, skipped: list[Path], kinds: tuple[str, ...]) -> None:
    # Hidden files (.DS_Store, editors' swap files) are nobody's input: they are not counted.
    if skipped:
        import logging

        names = [str(p.relative_to(folder)) for p in skipped]
        logging.getLogger("miocli").info("%s: %s", folder, skipped_note(names, kinds))


def kind_of_path(path: str | Path) -> str:
    """Image, audio or video, by the file's extension (images are the default)."""
    suffix = Path(path).suffix.lower()
    return next((kind for kind in (AUDIO, VIDEO) if suffix in EXTENSIONS[kind]), IMAGE)


# File signatures, for bytes that come without a name (uploads, buffers).
_AUDIO_MAGIC = (b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3",)


def kind_of_bytes(data: bytes) -> str:
    head = data[:16]
    if head[:4] == b"RIFF":
        return AUDIO if head[8:12] == b"WAVE" else VIDEO if head[8:11] == b"AVI" else IMAGE
    if head.startswith(_AUDIO_MAGIC):
        return AUDIO
    if head[4:8] == b"ftyp" or head.startswith(_VIDEO_MAGIC):
        return VIDEO
    return IMAGE


@dataclass
class Media:
    """One media input, not loaded yet: a path, file bytes, a PIL image or audio samples."""

    kind: str
    name: str
    path: Path | None = None
    data: bytes | None = None
    image: Any = None
    samples: Any = None
    rate: int | None = None

    def load(self, frames: FrameOptions | None = None) -> list[Any]:
        """Decoded media: [RGB image], [16 kHz mono samples], or a video's keyframe images."""
        if self.kind == IMAGE:
            from miocli.media import image as images

            if self.image is not None:
                return [images.image_from_pil(self.image, self.name)]
            if self.data is not None:
                return [images.image_from_bytes(self.data, self.name)]
            return [images.load_image(self.path)]
        if self.kind == AUDIO:
            from miocli.media import audio

            if self.samples is not None:
                return [audio.audio_from_array(self.samples, self.rate, self.name)]
            if self.data is not None:
                return [audio.audio_from_bytes(self.data, self.name)]
            return [audio.read_audio(self.path)]
        from miocli.media.video import FrameOptions, keyframes_of_bytes

        frames = frames or FrameOptions()
        if self.data is not None:
            return [keyframe.image for keyframe in keyframes_of_bytes(self.data, self.name, frames)]
        return [keyframe.image for keyframe in frames.extract(self.path)]


def to_media(value: Any, name: str, kind: str | None = None, rate: int | None = None) -> Media:
    """A Media from what a caller passed: str/Path, bytes, a PIL image, samples, or (samples, rate)."""
    if isinstance(value, Media):
        return value
    if isinstance(value, (str, Path)):
        path = Path(value)
        return Media(kind or kind_of_path(path), str(value) if isinstance(value, str) else str(path), path=path)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return Media(kind or kind_of_bytes(data), name, data=data)
    if isinstance(value, tuple) and len(value) == 2:
        samples, given_rate = value
        return Media(AUDIO, name, samples=samples, rate=given_rate)
    if _is_pil(value):
        return Media(IMAGE, name, image=value)
    shape = getattr(value, "shape", None)
    if shape is not None:
        if len(shape) == 3 and kind != AUDIO:
            from PIL import Image

            try:
                return Media(IMAGE, name, image=Image.fromarray(value))
            except (TypeError, ValueError) as exc:
                raise InputError(f"{name}: cannot read a {shape} {value.dtype} array as an image ({exc})",
                                 hint="give (height, width, 3) uint8 pixels", source=name) from None
        if rate is None:
            raise InputError(f"{name}: audio samples need their rate", hint="pass (samples, rate) or rate=...",
                             source=name)
        return Media(AUDIO, name, samples=value, rate=rate)
    raise InputError(f"{name}: cannot use a {type(value).__name__} as media",
                     hint="give a path, file bytes, a PIL image, or audio samples with their rate", source=name)


def _is_pil(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("PIL.") and hasattr(value, "mode") and hasattr(value, "size")


@dataclass
class Item:
    """One input of a run: what its prompt needs and what identifies it."""

    name: str
    fields: dict[str, str] = field(default_factory=dict)
    media: list[Media] = field(default_factory=list)
    # Keeps the samples of one repeated prompt apart under one seed (imagine -n).
    sample: int = 0
    # Audio inputs encoded with all four layers (tokenize --with-timbre).
    with_timbre: bool = False
    # A ready prompt text (chat, generate) instead of the task's template.
    prompt: str | None = None
    # This input's own seed instead of the run's (the server batches requests with different seeds).
    seed: int | None = None
    # chat: a conversation (`conversation.Turn`s) whose media are encoded and prompt built with the batch.
    turns: list[Any] | None = None


@dataclass
class Example:
    """A solved in-context example: its media and the answer it should get."""

    media: Media
    answer: str


LABEL_CHARS = 40


def input_label(item: Item) -> str:
    """The input as the user gave it, for an error line: a path or '-' as it is; a text input when short, or
    its first LABEL_CHARS characters and its size (`prompt (36 KB) "hello world…"`) so a long one does not fill
    the screen."""
    name = item.name
    if item.media or (len(name) <= LABEL_CHARS and "\n" not in name):
        return name
    size = len(name.encode("utf-8", "surrogateescape"))
    shown = f"{size} bytes" if size < 1000 else f"{size / 1000:.0f} KB" if size < 1_000_000 else f"{size / 1e6:.1f} MB"
    head = " ".join(name[:LABEL_CHARS].split())
    return f'{"prompt" if item.prompt is not None else "text"} ({shown}) "{head}…"'
