"""The pieces under `MioTokenizer`: its added tokens, the trie that splits text on them, and the
sentencepiece model file, loaded with clear errors and its user-defined pieces read without protobuf."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miocli.errors import ModelError

REDOWNLOAD_HINT = "re-download the model files (`mio download`); `mio doctor` checks every component"


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False


def token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Trie:
    """Leftmost-longest matcher for the added tokens (what the slow tokenizer splits on)."""

    def __init__(self, words: list[str]) -> None:
        self.root: dict[str, Any] = {}
        for word in words:
            node = self.root
            for char in word:
                node = node.setdefault(char, {})
            node[""] = True

    def split(self, text: str) -> list[str]:
        pieces: list[str] = []
        start = 0
        i = 0
        n = len(text)
        while i < n:
            node = self.root
            j = i
            match_end = -1
            while j < n and text[j] in node:
                node = node[text[j]]
                j += 1
                if "" in node:
                    match_end = j
            if match_end < 0:
                i += 1
                continue
            if i > start:
                pieces.append(text[start:i])
            pieces.append(text[i:match_end])
            start = i = match_end
        if start < n:
            pieces.append(text[start:])
        return pieces

    def ends_at(self, text: str, i: int, n: int) -> list[int]:
        """Ends of the words that start at text[i] and end by n, shortest first."""
        node = self.root
        ends: list[int] = []
        j = i
        while j < n and text[j] in node:
            node = node[text[j]]
            j += 1
            if "" in node:
                ends.append(j)
        return ends

    def split_spans(self, text: str, keep: Callable[[int, int], bool]) -> list[tuple[int, int, bool]]:
        """`split` as (start, end, is_word) spans, taking only the words that `keep(start, end)` accepts."""
        spans: list[tuple[int, int, bool]] = []
        start = i = 0
        n = len(text)
        while i < n:
            ends = [end for end in self.ends_at(text, i, n) if keep(i, end)]
            if not ends:
                i += 1
                continue
            if i > start:
                spans.append((start, i, False))
            spans.append((i, ends[-1], True))
            start = i = ends[-1]
        if start < n:
            spans.append((start, n, False))
        return spans


def load_sentencepiece(processor: Any, path: Path) -> None:
    """Load tokenizer.model into `processor`; a damaged file is a ModelError naming it, not a RuntimeError."""
    try:
        processor.Load(str(path))
    except (RuntimeError, OSError, ValueError) as exc:  # sentencepiece reports a bad proto as RuntimeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path} is not a sentencepiece model, it is corrupt or incomplete ({reason})",
                         hint=REDOWNLOAD_HINT) from exc
    if processor.GetPieceSize() == 0:
        raise ModelError(f"{path} holds an empty sentencepiece vocabulary", hint=REDOWNLOAD_HINT)


def user_defined_pieces(model: bytes) -> list[str]:
    """The USER_DEFINED pieces of a serialized sentencepiece ModelProto.

    sentencepiece's Python API tells control and byte pieces apart but not these, and its proto
    module needs the protobuf package, which miocli does not depend on: the protobuf wire format
    is read directly. ModelProto field 1 holds the pieces; in each, field 1 is the text and
    field 3 the type (4 = USER_DEFINED).
    """
    found: list[str] = []
    for number, value in _proto_fields(model):
        # Every USER_DEFINED piece holds the bytes of "field 3 = 4"; most others do not.
        if number != 1 or not isinstance(value, bytes) or b"\x18\x04" not in value:
            continue
        piece, kind = None, 1
        for sub_number, sub_value in _proto_fields(value):
            if sub_number == 1 and isinstance(sub_value, bytes):
                piece = sub_value.decode("utf-8", "replace")
            elif sub_number == 3 and isinstance(sub_value, int):
                kind = sub_value
        if kind == 4 and piece:
            found.append(piece)
    return found


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes | None]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited, None for fixed."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        wire = key & 7
        value: int | bytes | None = None
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            length, position = _varint(data, position)
            value = data[position : position + length]
            position += length
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        else:
            raise ModelError("tokenizer.model is not a sentencepiece model", hint="re-download the model files")
        yield key >> 3, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ModelError("tokenizer.model is not a sentencepiece model", hint="re-download the model files")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
