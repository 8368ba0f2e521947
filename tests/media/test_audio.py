"""media/audio.py: reading any audio as 16 kHz mono, writing wav/flac, splitting long recordings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import miocli
from miocli.errors import InputError, UsageError
from miocli.media.audio import format_duration, is_silent, read_audio, split_for_prompt, write_audio

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "speech"


def _tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_freq(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# --- reading ----------------------------------------------------------------------------------


def test_golden_wav_reads_as_int16_over_32768() -> None:
    samples = read_audio(GOLDEN / "input.wav")
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, np.load(GOLDEN / "input_waveform.npy")[0])


def test_stereo_44k_is_downmixed_and_resampled(tmp_path: Path) -> None:
    left = _tone(440, 1.0, 44100, 0.6)
    right = _tone(440, 1.0, 44100, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100)
    samples = read_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 16000) <= 1
    assert abs(_dominant_freq(samples, 16000) - 440) < 2
    # Mean of the channels: amplitude (0.6 + 0.2) / 2, up to 16-bit quantisation and resampling.
    assert abs(float(np.abs(samples[2000:-2000]).max()) - 0.4) < 0.01


def test_opposite_channels_cancel_to_silence(tmp_path: Path) -> None:
    tone = _tone(300, 0.5, 16000)
    path = tmp_path / "phase.wav"
    sf.write(path, np.stack([tone, -tone], axis=1), 16000)
    assert is_silent(read_audio(path))


@pytest.mark.parametrize("suffix", [".flac", ".ogg", ".mp3"])
def test_compressed_formats(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tone{suffix}"
    sf.write(path, _tone(1000, 1.0, 22050), 22050)
    samples = read_audio(path)
    # Lossy codecs add encoder delay/padding: the length is only approximately one second.
    assert abs(len(samples) - 16000) < 1600
    assert abs(_dominant_freq(samples, 16000) - 1000) < 5


def test_flac_at_16k_is_exact(tmp_path: Path) -> None:
    ints = (np.random.default_rng(0).integers(-30000, 30000, 8000)).astype(np.int16)
    path = tmp_path / "exact.flac"
    sf.write(path, ints, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(read_audio(path), ints.astype(np.float32) / 32768)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(InputError, match="not found") as info:
        read_audio(path)
    assert str(path) in info.value.message and info.value.source == str(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is not a file"):
        read_audio(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)") as info:
        read_audio(path)
    assert str(path) in info.value.message


def test_text_renamed_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is a shopping list, not a recording\n" * 20)
    with pytest.raises(InputError, match="cannot read .* as audio") as info:
        read_audio(path)
    assert str(path) in info.value.message
    assert "corrupt or not audio" in (info.value.hint or "")


def test_undecodable_mp3(tmp_path: Path) -> None:
    good = tmp_path / "tone.mp3"
    sf.write(good, _tone(440, 1.0, 16000), 16000, format="MP3")
    path = tmp_path / "garbled.mp3"
    path.write_bytes(good.read_bytes()[:200] + np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    with pytest.raises(InputError, match="cannot read .* as audio") as info:
        read_audio(path)
    # libsndfile's own words here ("does not exist ... possibly a pipe?") point the user elsewhere.
    assert "pipe" not in info.value.message and "exist" not in info.value.message
    assert str(path) in info.value.message


def test_wav_cut_inside_header(tmp_path: Path) -> None:
    full = tmp_path / "full.wav"
    sf.write(full, _tone(440, 0.5, 16000), 16000)
    path = tmp_path / "cut.wav"
    path.write_bytes(full.read_bytes()[:20])
    with pytest.raises(InputError, match="cannot read"):
        read_audio(path)


def test_wav_cut_inside_data(tmp_path: Path) -> None:
    full = tmp_path / "full.wav"
    sf.write(full, _tone(440, 0.5, 16000), 16000)
    path = tmp_path / "cut.wav"
    path.write_bytes(full.read_bytes()[:5000])
    with pytest.raises(InputError, match="truncated") as info:
        read_audio(path)
    assert str(path) in info.value.message


def test_streamed_wav_with_placeholder_size_is_accepted(tmp_path: Path) -> None:
    # Writers that stream to a pipe cannot seek back and leave 0xFFFFFFFF as the data size.
    full = tmp_path / "full.wav"
    sf.write(full, _tone(440, 0.5, 16000), 16000)
    data = bytearray(full.read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"
    data[4:8] = b"\xff\xff\xff\xff"
    path = tmp_path / "streamed.wav"
    path.write_bytes(bytes(data))
    assert len(read_audio(path)) == 8000


def test_wav_without_samples(tmp_path: Path) -> None:
    path = tmp_path / "nothing.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(InputError, match="no samples"):
        read_audio(path)


def test_silence(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, dtype=np.float32), 16000)
    samples = read_audio(path)
    assert len(samples) == 16000
    assert is_silent(samples)
    assert not is_silent(_tone(440, 0.1, 16000, 0.01))
    assert is_silent(_tone(440, 0.1, 16000, 0.01), threshold=0.02)
    assert is_silent(np.zeros(0, dtype=np.float32))


def test_module_does_not_import_torch() -> None:
    src = str(Path(miocli.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys, miocli.media.audio; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- writing ----------------------------------------------------------------------------------


def test_write_wav_pcm16_and_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    tone = _tone(440, 0.25, 16000)
    write_audio(path, tone[None, None, :])  # the codec's (batch, 1, samples) shape
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 16000, 1)
    np.testing.assert_allclose(read_audio(path), tone, atol=1 / 32768)


def test_write_flac_by_suffix_and_explicit_format(tmp_path: Path) -> None:
    tone = _tone(440, 0.25, 16000)
    write_audio(tmp_path / "a.FLAC", tone)
    assert sf.info(tmp_path / "a.FLAC").format == "FLAC"
    tmp_name = tmp_path / ".b.flac.partial"
    write_audio(tmp_name, tone, format="flac")
    assert sf.info(tmp_name).format == "FLAC"
    write_audio(tmp_path / ".c.tmp", tone, 24000, format="wav")
    assert (sf.info(tmp_path / ".c.tmp").format, sf.info(tmp_path / ".c.tmp").samplerate) == ("WAV", 24000)


def test_write_float_subtype(tmp_path: Path) -> None:
    path = tmp_path / "f.wav"
    write_audio(path, np.array([0.123456789, -0.5], dtype=np.float32), subtype="FLOAT")
    np.testing.assert_array_equal(sf.read(path, dtype="float32")[0], np.array([0.123456789, -0.5], np.float32))


def test_write_clips_instead_of_wrapping(tmp_path: Path) -> None:
    path = tmp_path / "loud.wav"
    write_audio(path, np.array([2.0, -3.0, np.nan, 0.5], dtype=np.float32))
    data, _ = sf.read(path, dtype="int16")
    assert data.tolist() == [32767, -32768, 0, 16384]


def test_write_rejects_unknown_format_and_multichannel(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\.mp3") as info:
        write_audio(tmp_path / "x.mp3", np.zeros(10, np.float32))
    assert "x.mp3" in info.value.message
    with pytest.raises(UsageError, match="no extension"):
        write_audio(tmp_path / "x", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="mono"):
        write_audio(tmp_path / "x.wav", np.zeros((2, 10), np.float32))


def test_write_to_missing_folder_is_a_plain_os_error(tmp_path: Path) -> None:
    # Writers at the edge turn OSErrors (full disk included) into one error naming the file.
    path = tmp_path / "no" / "such" / "out.wav"
    with pytest.raises(FileNotFoundError):
        write_audio(path, np.zeros(10, np.float32))


# --- splitting --------------------------------------------------------------------------------


def _check_cover(chunks: list[tuple[int, int]], total: int, limit: int) -> None:
    assert chunks[0][0] == 0 and chunks[-1][1] == total
    for (_, end), (start, _) in zip(chunks, chunks[1:], strict=False):
        assert end == start
    assert all(0 < e - s <= limit for s, e in chunks)


def test_split_short_is_one_chunk() -> None:
    assert split_for_prompt(np.zeros(16000, np.float32), 1.0) == [(0, 16000)]
    assert split_for_prompt(np.zeros(0, np.float32), 1.0) == []


def test_split_cuts_in_pauses() -> None:
    rate = 16000
    rng = np.random.default_rng(1)
    # "Words" of 0.7-1.3 s separated by 0.25 s pauses, 40 s in all.
    pieces, pauses, pos = [], [], 0
    while pos < 40 * rate:
        word = (0.3 * rng.standard_normal(int(rng.uniform(0.7, 1.3) * rate))).astype(np.float32)
        pieces += [word, np.zeros(rate // 4, np.float32)]
        pos += len(word)
        pauses.append((pos, pos + rate // 4))
        pos += rate // 4
    samples = np.concatenate(pieces)
    chunks = split_for_prompt(samples, 10.0)
    _check_cover(chunks, len(samples), 10 * rate)
    assert len(chunks) >= 4
    for _, cut in chunks[:-1]:
        assert any(a <= cut <= b for a, b in pauses), cut


def test_split_noise_respects_limit_and_quiet_dip() -> None:
    rate = 16000
    samples = (0.3 * np.random.default_rng(2).standard_normal(25 * rate)).astype(np.float32)
    samples[int(8.5 * rate) : int(8.6 * rate)] *= 0.01  # one quiet dip in the last 30% of window 1
    chunks = split_for_prompt(samples, 10.0)
    _check_cover(chunks, len(samples), 10 * rate)
    assert int(8.5 * rate) <= chunks[0][1] <= int(8.6 * rate)


def test_split_exact_and_odd_lengths() -> None:
    for total in (30 * 16000, 30 * 16000 + 1, 16001):
        samples = np.ones(total, np.float32)
        _check_cover(split_for_prompt(samples, 1.0), total, 16000)
    _check_cover(split_for_prompt(np.ones(1000, np.float32), 0.001), 1000, 16)


def test_split_rejects_non_positive_length() -> None:
    with pytest.raises(UsageError, match="positive"):
        split_for_prompt(np.zeros(10, np.float32), 0)


def test_split_parts_fit_the_frames_of_a_prompt() -> None:
    # run_jobs asks for parts of `frames / 50` seconds; each must encode to at most `frames` frames
    # of 320 samples, whatever the float rounding of that length.
    samples = (0.3 * np.random.default_rng(3).standard_normal(20 * 16000)).astype(np.float32)
    for frames in (37, 169, 171, 333):
        chunks = split_for_prompt(samples, frames / 50)
        _check_cover(chunks, len(samples), frames * 320)
        assert all(-(-(e - s) // 320) <= frames for s, e in chunks)


# --- messages ---------------------------------------------------------------------------------


def test_format_duration() -> None:
    assert format_duration(0) == "0.00 s"
    assert format_duration(3.38) == "3.38 s"
    assert format_duration(59.994) == "59.99 s"
    assert format_duration(95.25) == "95.2 s (1:35)"
    assert format_duration(3725.0) == "3725.0 s (1:02:05)"
