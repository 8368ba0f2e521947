"""Audio in and out: any common file -> 16 kHz mono float32, and waveforms -> wav/flac.

Kept free of torch so commands that only read or write audio stay light.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from miocli import quiet
from miocli.errors import InputError, UsageError

SAMPLE_RATE = 16000
READABLE = ".wav, .flac, .ogg or .mp3"
_WRITE_FORMATS = {"wav": "WAV", "flac": "FLAC"}
# Streaming writers leave these in the WAV data-size field; they do not mean "truncated".
_PLACEHOLDER_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000}
_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a wav/flac/ogg/mp3 file as float32 mono at `sample_rate` (samples in [-1, 1]).

    Channels are averaged; other rates are resampled with soxr. Integer PCM is scaled by
    2**(bits-1), the same scaling the reference pipeline applies, so codes match it.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise InputError(f"audio file not found: {path}", "check the path", source=source)
    if not path.is_file():
        raise InputError(f"{path} is not a file", f"give a {READABLE} file", source=source)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot access {path}: {exc.strerror or exc}", source=source) from exc
    if size == 0:
        raise InputError(f"audio file is empty (0 bytes): {path}", f"give a {READABLE} file", source=source)
    return _decode(path, source, sample_rate)


def audio_from_bytes(data: bytes, name: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The same as read_audio for an audio file's bytes (an upload, a buffer)."""
    if not data:
        raise InputError(f"{name} is empty (0 bytes)", f"give the bytes of a {READABLE} file", source=name)
    return _decode(io.BytesIO(data), name, sample_rate)


def audio_from_array(samples: np.ndarray, rate: int, name: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples given in memory ((n,) or (n, channels), at `rate` Hz) as float32 mono at `sample_rate`.

    Integer arrays are scaled like integer PCM files; float arrays are taken as [-1, 1].
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise InputError(f"{name}: the sample rate must be a positive whole number of Hz (got {rate!r})",
                         "pass the rate the samples were recorded at, e.g. (samples, 16000)", source=name)
    arr = np.asarray(samples)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise InputError(f"{name}: audio must be a non-empty (samples,) or (samples, channels) array, "
                         f"got shape {arr.shape}", source=name)
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / np.float32(2 ** (8 * arr.dtype.itemsize - 1))
    elif not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name}: audio samples must be numbers, got {arr.dtype}", source=name)
    return _to_mono(arr.astype(np.float32, copy=False).reshape(len(arr), -1), int(rate), name, sample_rate)


def _decode(source: Path | io.BytesIO, name: str, sample_rate: int) -> np.ndarray:
    try:
        # libsndfile's mp3 decoder (mpg123) prints "Illegal Audio-MPEG-Header" notes on stderr.
        with quiet.silenced(), sf.SoundFile(source) as f:
            rate = f.samplerate
            _check_not_truncated(f.extra_info, name)
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise InputError(
            f"cannot read {name} as audio ({_reason(exc)})",
            f"the file is corrupt or not audio; give a {READABLE} file",
            source=name,
        ) from exc
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise InputError(f"cannot read {name} as audio ({exc})", f"give a {READABLE} file", source=name) from exc
    if data.shape[0] == 0:
        raise InputError(f"audio file has no samples: {name}", "record or export some sound into it", source=name)
    return _to_mono(data, rate, name, sample_rate)


def _reason(exc: sf.LibsndfileError) -> str:
    """libsndfile's words for why it failed, unless they point the user the wrong way."""
    # It says "File does not exist or is not a regular file (possibly a pipe?)" for an mp3 whose
    # frames do not decode; the file exists (checked before) and is no pipe.
    if "possibly a pipe" in exc.error_string:
        return "its data does not decode"
    return str(exc.error_string)


def _to_mono(data: np.ndarray, rate: int, name: str, sample_rate: int) -> np.ndarray:
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise InputError(f"{name} contains NaN or infinite samples", "re-export it as 16-bit PCM", source=name)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_not_truncated(info: str, path: Path | str) -> None:
    """libsndfile silently reads what is there of a cut-off WAV; a partial download must not
    pass as a shorter recording. Its header report says 'data : N (should be M)' then."""
    match = _DATA_SIZE.search(info)
    if match is None:
        return
    declared, present = int(match.group(1)), int(match.group(2))
    if declared not in _PLACEHOLDER_SIZES and present < declared:
        raise InputError(
            f"audio file is truncated: {path} (header declares {declared} bytes of audio, {present} are present)",
            "re-download or re-export it",
            source=str(path),
        )


def is_silent(samples: np.ndarray, threshold: float = 1e-3) -> bool:
    """True when no sample's magnitude exceeds `threshold` (1e-3 is about -60 dBFS)."""
    arr = np.asarray(samples)
    return arr.size == 0 or float(np.max(np.abs(arr))) <= threshold


def _output_format(path: Path, format: str | None) -> str:
    name = (format if format is not None else path.suffix).lower().lstrip(".")
    if name not in _WRITE_FORMATS:
        shown = format if format is not None else (path.suffix or "(no extension)")
        raise UsageError(f"cannot write audio as {shown!r} ({path})", "use a .wav or .flac file name")
    return _WRITE_FORMATS[name]


def write_audio(
    path: Path,
    samples: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    format: str | None = None,
    *,
    subtype: str = "PCM_16",
) -> None:
    """Write mono samples as a wav or flac file (16-bit PCM unless `subtype` says otherwise).

    `format` ("wav"/"flac") wins over the suffix, so callers can write to a temporary name.
    The file is encoded in memory and written with plain file I/O, so a full disk is an
    OSError with its errno like any other write.
    """
    path = Path(path)
    path.write_bytes(audio_bytes(samples, sample_rate, _output_format(path, format), subtype=subtype))


def audio_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, format: str = "wav", *,
                subtype: str = "PCM_16") -> bytes:
    """A wav or flac file's bytes. Samples are clipped to [-1, 1] (integer PCM would wrap around
    otherwise) and NaN becomes silence."""
    file_format = _output_format(Path(f"audio.{format.lower()}"), format)
    arr = np.asarray(samples, dtype=np.float32)
    # Accept the codec's (batch=1, channels=1, samples) output as well as a plain vector.
    if arr.ndim == 0 or sum(d > 1 for d in arr.shape) > 1:
        raise ValueError(f"audio must be mono samples, got shape {arr.shape}")
    arr = arr.reshape(-1)
    arr = np.clip(np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    buffer = io.BytesIO()
    sf.write(buffer, arr, sample_rate, format=file_format, subtype=subtype)
    return buffer.getvalue()


def split_for_prompt(samples: np.ndarray, max_seconds: float, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Split a long recording into [start, end) chunks of at most `max_seconds`.

    Each cut goes at the quietest 20 ms in the last 30% of the window, so words are rarely
    cut in half; the chunks cover the signal in order with no gaps or overlaps.
    """
    if not max_seconds > 0:
        raise UsageError(f"the maximum chunk length must be positive, got {max_seconds} s")
    total = len(samples)
    limit = max(1, int(max_seconds * sample_rate))
    if total <= limit:
        return [(0, total)] if total else []
    half = max(1, int(0.010 * sample_rate))
    chunks: list[tuple[int, int]] = []
    start = 0
    while total - start > limit:
        end = start + limit
        lo = max(start + 1, end - int(0.3 * limit))
        # Energy of the 20 ms around every candidate cut, from a running sum over just this
        # stretch (a whole-file cumulative sum would cost 8 bytes per sample of a long file).
        a, b = max(lo - half, 0), min(end + half, total)
        seg = np.asarray(samples[a:b], dtype=np.float64)
        running = np.concatenate([[0.0], np.cumsum(seg * seg)])
        cuts = np.arange(lo, end + 1)
        loudness = running[np.minimum(cuts + half, b) - a] - running[np.maximum(cuts - half, a) - a]
        # Latest quietest point: on a tie (e.g. a stretch of silence) keep the chunk long.
        cut = int(cuts[len(cuts) - 1 - np.argmin(loudness[::-1])])
        chunks.append((start, cut))
        start = cut
    chunks.append((start, total))
    return chunks


def format_duration(seconds: float) -> str:
    """A duration for messages: '3.38 s' below a minute, '95.3 s (1:35)' or '3725.0 s (1:02:05)' above."""
    if seconds < 60:
        return f"{seconds:.2f} s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return f"{seconds:.1f} s ({clock})"
