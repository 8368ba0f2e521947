"""`mio detokenize` of long speech: a token file decoded in windows into a wav written as it comes.

The wav equals one-piece decoding's (the 16-bit samples, measured identical here), and a file that would
need more memory than there is is refused (exit 3) before anything is decoded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from mio_testing import run_mio
from miocli import protocol
from miocli.codecs.speech import SpeechCodec
from miocli.media.audio import audio_bytes

FRAMES = 3000  # about three windows


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    codes = np.random.default_rng(3).integers(0, 1024, (4, FRAMES)).tolist()
    path = tmp_path_factory.mktemp("speech") / "long.txt"
    path.write_text(protocol.speech_codes_to_string(codes, with_timbre=True) + "\n")
    return path


def _one_piece(model: Path, token_file: Path) -> np.ndarray:
    codec = SpeechCodec.load(model / "SpeechTokenizer", parts=frozenset({"decoder"}))
    codes = protocol.speech_codes_from_string(token_file.read_text().strip())
    wave = codec.decode(torch.tensor(codes).unsqueeze(1))[0, 0].numpy()
    return soundfile.read(io.BytesIO(audio_bytes(wave, 16000, "wav")), dtype="int16")[0]


def test_a_long_file_decodes_to_the_one_piece_wav(tiny_model: Path, token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "long.wav"
    done = run_mio("detokenize", str(token_file), "-o", str(out), "--model", str(tiny_model))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    samples, rate = soundfile.read(out, dtype="int16")
    assert rate == 16000 and len(samples) == FRAMES * 320
    np.testing.assert_array_equal(samples, _one_piece(tiny_model, token_file))
    again = run_mio("detokenize", str(token_file), "-o", str(out), "--model", str(tiny_model))
    assert again.returncode == 1 and "already exists" in again.stderr


def test_stdin_decodes_the_same(tiny_model: Path, token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "stdin.wav"
    done = run_mio("detokenize", "-", "-o", str(out), "--model", str(tiny_model), stdin=token_file.read_text())
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(soundfile.read(out, dtype="int16")[0], _one_piece(tiny_model, token_file))


def test_too_big_for_memory_is_refused_before_work(tiny_model: Path, token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "refused.wav"
    done = run_mio("detokenize", str(token_file), "-o", str(out), "--model", str(tiny_model),
                   env={"MIO_MEMORY_LIMIT": "100M"})
    assert done.returncode == 3, done.stderr
    first = done.stderr.splitlines()[0]
    assert str(token_file) in first and "of speech tokens" in first and "needs about" in first
    assert "free some memory" in done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.ci  # slow (a process per step); .ci/run runs the ci mark
def test_held_in_memory_the_hint_is_a_file(tiny_model: Path, tmp_path: Path) -> None:
    """Stdin is held whole, so its need grows with it; the same tokens from a file fit."""
    codes = np.random.default_rng(4).integers(0, 1024, (4, 40_000)).tolist()
    text = protocol.speech_codes_to_string(codes, with_timbre=True)
    limit = {"MIO_MEMORY_LIMIT": "600M"}
    done = run_mio("detokenize", "-", "-o", str(tmp_path / "a.wav"), "--model", str(tiny_model), stdin=text,
                   env=limit)
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("mio: error: stdin (")  # named as given
    assert "save the segment alone in a file" in done.stderr
    path = tmp_path / "t.txt"
    path.write_text(text)
    done = run_mio("detokenize", str(path), "-o", str(tmp_path / "b.wav"), "--model", str(tiny_model), env=limit)
    assert done.returncode == 0, done.stderr
