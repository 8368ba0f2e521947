"""Audio in and out: any common file -> 16 kHz mono float32, and waveforms -> wav/flac.

Kept free of torch so commands that only read or write audio stay light.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

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
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            _check_not_truncated(f.extra_info, path)
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise InputError(
            f"cannot read {path} as audio ({exc.error_string})",
            f"the file is corrupt or not audio; give a {READABLE} file",
            source=source,
        ) from exc
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise InputError(f"cannot read {path} as audio ({exc})", f"give a {READABLE} file", source=source) from exc
    if data.shape[0] == 0:
        raise InputError(f"audio file has no samples: {path}", "record or export some sound into it", source=source)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise InputError(f"{path} contains NaN or infinite samples", "re-export it as 16-bit PCM", source=source)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_not_truncated(info: str, path: Path) -> None:
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
    """Write mono samples as wav or flac (16-bit PCM unless `subtype` says otherwise).

    `format` ("wav"/"flac") wins over the suffix, so callers can write to a temporary name.
    Samples are clipped to [-1, 1] (integer PCM would wrap around otherwise) and NaN
    becomes silence.
    """
    path = Path(path)
    file_format = _output_format(path, format)
    arr = np.asarray(samples, dtype=np.float32)
    # Accept the codec's (batch=1, channels=1, samples) output as well as a plain vector.
    if arr.ndim == 0 or sum(d > 1 for d in arr.shape) > 1:
        raise ValueError(f"write_audio expects mono samples, got shape {arr.shape}")
    arr = arr.reshape(-1)
    arr = np.clip(np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    try:
        sf.write(path, arr, sample_rate, format=file_format, subtype=subtype)
    except (sf.SoundFileError, OSError) as exc:
        raise InputError(
            f"cannot write {path}: {exc}", "check that the folder exists and is writable", source=str(path)
        ) from exc


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
