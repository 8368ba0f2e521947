"""`mio detokenize`: token strings back into files, decoded and written in bounded batches.

One image segment is one input of the core's "detokenize" task, so ten thousand images go
through unCLIP a batch at a time and each is on disk before the next batch starts. The file
type follows the name given with -o; '-' writes one file to stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, BinaryIO

from miocli import protocol
from miocli.core.inputs import Item
from miocli.errors import InputError, UsageError
from miocli.output.files import write_single_file, writes_in_place

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
AUDIO_FORMATS = {".wav": "wav", ".flac": "flac"}


def run_detokenize(mio: Any, text: str | protocol.ParsedOutput, output: str, *, embeddings_only: bool,
                   overwrite: bool, seed: int | None, steps: int, guidance: float, size: int | None,
                   source: str = "the tokens") -> list[str]:
    """Decode one token text (or its parse) into `output` (and NAME-2, … for more segments); returns what was
    written."""
    parsed = protocol.parse_output(text, extract=False) if isinstance(text, str) else text
    for problem in parsed.problems:
        print(f"mio: warning: malformed {problem.kind} segment: {problem.reason}", file=sys.stderr)
    if not parsed.images and not parsed.speeches:
        raise UsageError("no complete <image>…</image> or <spch>…</spch> segment in the input")
    if parsed.images and embeddings_only:
        _format(output, {".npy": "npy"}, "the embeddings", ".npy")
        tokens = "".join(segment.raw for segment in parsed.images)
        [result] = mio.stream("detokenize", [Item("tokens", {"tokens": tokens})], embeddings_only=True, seed=seed)
        result.raise_for_error()
        return [write_single_file(output, lambda handle: _save_npy(handle, result.embeddings), overwrite=overwrite)]
    segments = [s.raw for s in parsed.images] or [s.raw for s in parsed.speeches]
    if parsed.images:
        fmt = _format(output, IMAGE_FORMATS, "an image", ", ".join(IMAGE_FORMATS))
    else:
        fmt = _format(output, AUDIO_FORMATS, "a recording", ", ".join(AUDIO_FORMATS))
    names = _names(output, len(segments))
    if not parsed.images and hasattr(mio, "runtime"):  # held in memory: refused before decoding when too long
        from miocli.core.mediatokens import WINDOW_FRAMES
        from miocli.core.speechfile import check_room

        check_room(mio.runtime, source, sum(len(s) for s in segments),
                   sum(len(s.codes[0]) for s in parsed.speeches), streamed=False, window=WINDOW_FRAMES)
    if not overwrite:
        # Every name first: an existing file stops the command before anything is decoded.
        for name in names:
            if name != "-" and Path(name).exists() and not writes_in_place(Path(name)):
                raise InputError(f"{name} already exists", hint="pass --overwrite to replace it")
    items = (Item(f"segment {n + 1}", {"tokens": raw}) for n, raw in enumerate(segments))
    written: list[str] = []
    for result, name in zip(mio.stream("detokenize", items, seed=seed, steps=steps, guidance=guidance, size=size),
                            names):
        result.raise_for_error()
        if result.images:
            image = result.images[0]
            written.append(write_single_file(name, lambda handle, image=image: image.save(handle, format=fmt),
                                             overwrite=overwrite))
        else:
            data = result.audio[0].to_bytes(fmt)
            written.append(write_single_file(name, lambda handle, data=data: handle.write(data), overwrite=overwrite))
    return written


def speech_format(output: str) -> str:
    """The audio format of `output`, or a usage error naming the types that fit."""
    return _format(output, AUDIO_FORMATS, "a recording", ", ".join(AUDIO_FORMATS))


def default_suffix(parsed: protocol.ParsedOutput, embeddings_only: bool) -> str:
    """The file type of one input's output in a folder: .png for images, .wav for speech, .npy for embeddings."""
    if parsed.images:
        return ".npy" if embeddings_only else ".png"
    return ".wav"


def _format(output: str, formats: dict[str, str], what: str, choices: str) -> str:
    suffix = Path(output).suffix.lower()
    if output == "-" or (suffix not in formats and writes_in_place(Path(output))):
        return next(iter(formats.values()))  # a stream (stdout, /dev/stdout, a pipe) has no name to follow
    if suffix not in formats:
        raise UsageError(f"cannot write {what} as {suffix or 'a file without an extension'} ({output})",
                         hint=f"name the output {choices}, or '-' for stdout")
    return formats[suffix]


def _names(output: str, count: int) -> list[str]:
    """`out.png`, then `out-2.png`, … for several segments; '-' and devices take one."""
    if count > 1 and (output == "-" or writes_in_place(Path(output))):
        raise UsageError(f"the input holds {count} segments and {output} can take only one",
                         hint="give a file name: the segments go to NAME.png, NAME-2.png, …")
    path = Path(output)
    return [output, *(str(path.with_name(f"{path.stem}-{n}{path.suffix}")) for n in range(2, count + 1))]


def _save_npy(handle: BinaryIO, embeddings: Any) -> None:
    import numpy as np

    np.save(handle, np.asarray(embeddings, dtype="float32"), allow_pickle=False)
