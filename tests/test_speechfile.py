"""A token file of one long speech segment: read in pieces, checked like the whole-text parse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from miocli import protocol
from miocli.core import speechfile


def _codes(frames: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 1024, (4, frames)).tolist()


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("piece", [1 << 22, 97, 1000])
def test_blocks_equal_the_whole_text_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int) -> None:
    """Small pieces put a piece's end inside a token and inside the change from one layer to the next."""
    monkeypatch.setattr(speechfile, "PIECE", piece)
    codes = _codes(555)
    text = "\n  " + protocol.speech_codes_to_string(codes, with_timbre=True).replace("><spch", "> <spch", 40) + "\n"
    found = speechfile.scan(_file(tmp_path, text))
    assert found is not None and found.frames == 555
    for size in (1, 64, 4096):
        blocks = list(found.blocks(size))
        assert all(block.shape[1] <= size for block in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks, axis=1), protocol.speech_codes_from_string(text))


@pytest.mark.parametrize("text", [
    "hello " + protocol.speech_codes_to_string(_codes(5), with_timbre=True),  # text around it
    protocol.speech_codes_to_string(_codes(5), with_timbre=True) * 2,  # two segments
    protocol.speech_codes_to_string(_codes(5), with_timbre=True)[:-3],  # no end
    "<spch>" + "".join(f"<spch{n}>" for n in (1, 2, 1025, 2049, 3073)) + "</spch>",  # unequal parts
    "<spch>" + "".join(f"<spch{n}>" for n in (1, 2049, 1025, 3073)) + "</spch>",  # out of order
    "<spch>" + "".join(f"<spch{n}>" for n in (1, 1025, 2049, 4097)) + "</spch>",  # out of range
    "<spch>" + "".join(f"<spch{n}>" for n in (1, 1025, 2049)) + "</spch>",  # a part missing
    "<spch><spch1>é<spch1025><spch2049><spch3073></spch>",  # not a token stream
    "<image><img1></image>",
])
def test_anything_else_goes_the_whole_text_way(tmp_path: Path, text: str) -> None:
    assert speechfile.scan(_file(tmp_path, text)) is None


def test_the_whole_text_parse_agrees_on_what_is_complete(tmp_path: Path) -> None:
    good = protocol.speech_codes_to_string(_codes(3), with_timbre=True)
    assert speechfile.scan(_file(tmp_path, good)) is not None
    assert protocol.parse_output(good, extract=False).speeches
