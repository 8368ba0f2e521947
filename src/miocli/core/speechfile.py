"""A file holding one long speech segment, read in pieces rather than whole (MIO_PROTOCOL §4).

A speech segment lists all content tokens, then timbre 0, 1 and 2, so frame t needs tokens from four far-apart
places. One pass checks the file (the four parts in order, of equal length, nothing else but whitespace) and
notes where each piece of it lies; decoding then reads the four parts side by side, a block at a time. Memory
stays at a few pieces of text whatever the file's length. A file that is anything else (text around the
segment, images, a malformed segment) is read whole by the ordinary path, which says what is wrong with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from miocli.protocol import SPEECH_BEGIN, SPEECH_CODEBOOK_SIZE, SPEECH_END, SPEECH_LAYERS_IN_OUTPUT

if TYPE_CHECKING:
    import numpy as np

    from miocli.model.runtime import Runtime

PIECE = 1 << 22  # bytes of text parsed at a time
_BODY = re.compile(r"(?:\s*<spch\d{1,9}>)*\s*")


@dataclass
class SpeechFile:
    """Where the pieces of one file's speech segment lie, and how many frames it holds."""

    path: Path
    size: int
    frames: int = 0
    pieces: list[tuple[int, int, int, int]] = field(default_factory=list)  # (start, end, first layer, last layer)

    def blocks(self, frames: int = 4096) -> Iterator[np.ndarray]:
        """(4, n) int64 codes, offsets removed, `frames` at a time (the last block may be shorter)."""
        import numpy as np

        layers = [self._layer(k) for k in range(SPEECH_LAYERS_IN_OUTPUT)]
        pending: list[list[np.ndarray]] = [[] for _ in layers]
        held = [0] * len(layers)
        sent = 0
        while sent < self.frames:
            want = min(frames, self.frames - sent)
            for k, layer in enumerate(layers):
                while held[k] < want:
                    codes = next(layer)
                    pending[k].append(codes)
                    held[k] += len(codes)
            block = np.empty((len(layers), want), dtype=np.int64)
            for k in range(len(layers)):
                joined = np.concatenate(pending[k])
                block[k] = joined[:want]
                pending[k], held[k] = [joined[want:]], held[k] - want
            sent += want
            yield block

    def _layer(self, k: int) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as handle:
            for start, end, first, last in self.pieces:
                if first <= k <= last:
                    handle.seek(start)
                    numbers = _numbers(handle.read(end - start).decode("ascii"))
                    yield numbers[numbers // SPEECH_CODEBOOK_SIZE == k] - SPEECH_CODEBOOK_SIZE * k


def scan(path: Path) -> SpeechFile | None:
    """The file's layout when it is exactly one complete speech segment (whitespace around it allowed), else None."""
    import numpy as np

    found = SpeechFile(path=path, size=path.stat().st_size)
    counts = [0] * SPEECH_LAYERS_IN_OUTPUT
    layer = 0
    with open(path, "rb") as handle:
        head = handle.read(64)
        stripped = head.lstrip()
        if not stripped.startswith(SPEECH_BEGIN.encode()):
            return None
        offset = len(head) - len(stripped) + len(SPEECH_BEGIN)
        handle.seek(offset)
        rest = b""
        while True:
            data = handle.read(PIECE)
            text = rest + data
            ending = not data
            if ending:
                cut = text.rstrip()
                if not cut.endswith(SPEECH_END.encode()):
                    return None
                piece, rest = cut[: -len(SPEECH_END)], b""
            else:
                end = text.find(SPEECH_END.encode())  # what follows the end is checked when the file ends
                cut = end if end >= 0 else text.rfind(b">") + 1
                piece, rest = text[:cut], text[cut:]
                if len(rest) > 64:
                    return None  # a token is a dozen characters: this is not a token stream
            try:
                body = piece.decode("ascii")
            except UnicodeDecodeError:
                return None
            if SPEECH_END in body or not _BODY.fullmatch(body):
                return None
            numbers = _numbers(body)
            if len(numbers):
                parts = numbers // SPEECH_CODEBOOK_SIZE
                steps = np.diff(parts, prepend=layer)
                if parts[-1] >= SPEECH_LAYERS_IN_OUTPUT or steps.min() < 0 or steps.max() > 1:
                    return None  # out of range, out of order or a part missing: the whole-text path says which
                for k, count in enumerate(np.bincount(parts, minlength=SPEECH_LAYERS_IN_OUTPUT)):
                    counts[k] += int(count)
                found.pieces.append((offset, offset + len(piece), int(parts[0]), int(parts[-1])))
                layer = int(parts[-1])
            offset += len(piece)
            if ending:
                break
    if layer != SPEECH_LAYERS_IN_OUTPUT - 1 or len(set(counts)) != 1:
        return None
    found.frames = counts[0]
    return found


def _numbers(body: str) -> np.ndarray:
    import numpy as np

    return np.array(body.replace("<spch", " ").replace(">", " ").split(), dtype=np.int64)


def check_room(runtime: Runtime, name: str, text_bytes: int, frames: int, *, streamed: bool, window: int) -> None:
    """Refuse (exit 3) before any decoding a speech segment that would need more memory than is free.

    Streamed from a file, the need is the decoder and one window whatever the length; held in memory (stdin,
    an inline string, a file with more than one segment), it grows with the text.
    """
    from miocli.codecs.speech.config import SpeechConfig
    from miocli.errors import EnvironmentProblem
    from miocli.model import memory

    budget = runtime.budget()
    if not budget.total:
        return
    config = SpeechConfig.from_file(runtime.model_dir / "SpeechTokenizer" / "config.json")
    need = memory.speech_window_bytes(config.n_filters, config.hop_length, window)
    if "speech" not in runtime.loaded():
        need += memory.codec_bytes(memory.speech_elements(runtime.model_dir / "SpeechTokenizer", ["decoder"]),
                                   "float32")
    whole = 0 if streamed else text_bytes * memory.SPEECH_BYTES_PER_TEXT_BYTE
    if need + whole <= budget.free:
        return
    hours = frames / (config.sample_rate / config.hop_length) / 3600
    message = (f"{name} ({memory.format_bytes(text_bytes)} of speech tokens, {frames} frames, {hours:.1f} h) needs "
               f"about {memory.format_bytes(need + whole)} to decode but {memory.format_bytes(budget.free)} of "
               f"{budget.where} is free")
    if not streamed and need <= budget.free:
        hint = (f"save the segment alone in a file and give its path: a file is decoded in windows in about "
                f"{memory.format_bytes(need)}")
    else:
        hint = "nothing fits: free some memory, or use a machine with more"
    raise EnvironmentProblem(message, hint=hint)


def decode(runtime: Runtime, source: SpeechFile, name: str,
           progress: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
    """The file's samples (float32, 16 kHz), a window at a time, after checking that it fits."""
    from miocli.core import mediatokens

    check_room(runtime, name, source.size, source.frames, streamed=True, window=mediatokens.WINDOW_FRAMES)
    return mediatokens.speech_windows(runtime, source.blocks(), source.frames, progress=progress)
