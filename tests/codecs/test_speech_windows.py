"""Windowed speech decoding against one-piece decoding, on the golden codec (the real layout, small widths)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from miocli.codecs.speech import SpeechCodec
from miocli.codecs.speech.windows import decode_windows, split_decoder

FOLDER = Path(__file__).resolve().parent.parent / "golden" / "speech" / "SpeechTokenizer"
FRAMES = 700
# float32 rounding of the same kernels on another length (measured: 5.1e-7 on samples of up to 1.06).
NOISE = 2e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def codec() -> SpeechCodec:
    return SpeechCodec.load(FOLDER, parts=frozenset({"decoder"}))


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 1024, (4, FRAMES))


@pytest.fixture(scope="module")
def whole(codec: SpeechCodec, codes: np.ndarray) -> np.ndarray:
    return codec.decode(torch.from_numpy(codes).unsqueeze(1))[0, 0].numpy()


def windowed(codec: SpeechCodec, codes: np.ndarray, block: int = 50, **options: int) -> np.ndarray:
    blocks = [codes[:, i : i + block] for i in range(0, codes.shape[1], block)]
    return np.concatenate(list(decode_windows(codec, blocks, codes.shape[1], **options)))


def test_one_window_is_the_one_piece_decode(codec: SpeechCodec, codes: np.ndarray, whole: np.ndarray) -> None:
    np.testing.assert_array_equal(windowed(codec, codes, window=FRAMES), whole)


@pytest.mark.parametrize(("window", "block"), [(100, 50), (37, 64), (1, 700), (699, 13)])
def test_windows_match_one_piece_within_float_noise(codec: SpeechCodec, codes: np.ndarray, whole: np.ndarray,
                                                    window: int, block: int) -> None:
    out = windowed(codec, codes, block, window=window)
    assert out.shape == whole.shape
    assert np.abs(out - whole).max() < NOISE


def test_the_overlap_is_needed(codec: SpeechCodec, codes: np.ndarray, whole: np.ndarray) -> None:
    """Without context the seams are wrong by far more than noise; the measured minimum is one frame, and the
    layers' computed reach (used by default) covers it."""
    assert np.abs(windowed(codec, codes, window=100, context=0) - whole).max() > 1e-2
    assert np.abs(windowed(codec, codes, window=100, context=1) - whole).max() < NOISE
    assert split_decoder(codec.net.decoder).post_context >= 1


def test_lstm_state_is_carried(codec: SpeechCodec, codes: np.ndarray, whole: np.ndarray,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows that restart the LSTM (what plain overlapping would do) are audibly different."""
    from miocli.codecs.speech import windows

    original = windows._lstm_step
    monkeypatch.setattr(windows, "_lstm_step", lambda skip, x, state: original(skip, x, None))
    assert np.abs(windowed(codec, codes, window=100) - whole).max() > 1e-2


def test_progress_counts_frames(codec: SpeechCodec, codes: np.ndarray) -> None:
    seen: list[tuple[int, int]] = []
    windowed(codec, codes, window=300, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (FRAMES, FRAMES)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
