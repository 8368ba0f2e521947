"""An answer's text while it is generated: the new ids of each step in, the text that is safe to show out.

Decoding a prefix of an answer's ids is not a prefix of its final text in three ways, and each is
held back until it settles: the last bytes of a character cut by byte-level tokens (U+FFFD), a tag
still being spelt (`<ima`), and a media segment not yet closed (its codes are shown as the
placeholder that the final text has, `<image_placeholder_0>`, once the segment is complete). The
pieces joined are the answer's final text (`Generated.parsed.text`), which `finish` completes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from miocli import protocol

# A tag being spelt: what may still grow into <image>, </spch>, <img123>, <spch45>, <unk>, ….
_OPEN_TAG = re.compile(r"</?[A-Za-z_]*\d*")
_LONGEST_TAG = 24
_SEGMENTS = ((protocol.IMAGE_BEGIN, protocol.IMAGE_END), (protocol.SPEECH_BEGIN, protocol.SPEECH_END))


class TextDeltas:
    """Text pieces of one answer as its ids arrive (`push`), then the rest (`finish`)."""

    def __init__(self, decode: Callable[[list[int]], str], prefill: str = "") -> None:
        self.decode = decode
        self.prefill = prefill
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: Sequence[int]) -> str:
        """The new text these ids make safe to show ("" while something is held back)."""
        self.ids.extend(int(i) for i in ids)
        return self._advance(shown(self.prefill + self.decode(self.ids)))

    def finish(self, final: str) -> str:
        """What is left of the `final` text after the pieces sent so far."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # an earlier piece would change: wait for the final text
        piece, self.sent = text[len(self.sent):], text
        return piece


def shown(text: str) -> str:
    """The part of a decoded answer prefix that the final answer text starts with."""
    text = text.replace(protocol.UNK, "")
    for begin, end in _SEGMENTS:
        opened = text.rfind(begin)
        if opened >= 0 and text.find(end, opened) < 0:
            text = text[:opened]
    if protocol.IMAGE_BEGIN in text or protocol.SPEECH_BEGIN in text:
        text = protocol.parse_output(text, extract=False).text
    tag = text.rfind("<")
    if tag >= 0 and len(text) - tag <= _LONGEST_TAG and _OPEN_TAG.fullmatch(text, tag):
        text = text[:tag]
    return text.rstrip("\ufffd")
