"""A long recording written as it is decoded: soundfile's streaming writer, a window of samples at a time.

`mio detokenize FILE` of one speech segment reads the file in pieces (core/speechfile.py), decodes it a
window at a time and appends each window's samples to the wav, so nothing holds the whole recording. The
file is written under a temporary name and renamed at the end, like every other output: never a half file.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from miocli import quiet
from miocli.core import speechfile
from miocli.errors import InputError, UsageError
from miocli.output.files import atomic_write, write_errors, write_single_file

# A RIFF wav counts its bytes in 32 bits.
WAV_LIMIT = 2**32 - 1024


def write_speech_file(mio: Any, source: speechfile.SpeechFile, name: str, output: str, fmt: str, *,
                      overwrite: bool) -> str:
    """Decode `source` into `output` (wav or flac, '-' for stdout); returns what was written."""
    import soundfile as sf

    runtime = mio.runtime
    rate = 16_000
    target = Path(output)
    if not overwrite and output != "-" and target.exists() and _renamable(target):
        raise InputError(f"{output} already exists", hint="pass --overwrite to replace it")
    if fmt == "wav" and source.frames * 320 * 2 > WAV_LIMIT:
        raise UsageError(f"{name} holds {source.frames / 50 / 3600:.1f} h of speech, more than a wav file can hold "
                         "(4 GB)", hint="name the output .flac")

    def write(path: Path) -> None:
        with _progress(source.frames) as advance:
            chunks = speechfile.decode(runtime, source, name, progress=advance)
            with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16",
                              format=fmt.upper()) as handle:
                for samples in _clipped(chunks):
                    handle.write(samples)

    if output == "-" or not _renamable(target):
        # A stream cannot take a header that is rewritten at the end: the file is made aside, then copied.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mio-speech-") as folder:
            aside = Path(folder) / f"speech.{fmt}"
            with write_errors(aside):
                write(aside)
            return write_single_file(output, lambda handle: _copy(aside, handle), overwrite=overwrite)
    atomic_write(target, write)
    return output


def scan_file(name: str) -> speechfile.SpeechFile | None:
    """The layout of a token file that is one speech segment (decoded in windows), else None."""
    try:
        return speechfile.scan(Path(name))
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None


def _renamable(path: Path) -> bool:
    from miocli.output.files import writes_in_place

    return not writes_in_place(path)


def _copy(path: Path, handle: Any) -> None:
    with open(path, "rb") as source:
        shutil.copyfileobj(source, handle, 1 << 20)


def _clipped(chunks: Iterator[Any]) -> Iterator[Any]:
    """Each window as audio_bytes writes samples: NaN is silence, values clipped to [-1, 1]."""
    import numpy as np

    for samples in chunks:
        yield np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


class _progress:  # noqa: N801 - a context manager used like a function
    """A progress bar of decoded frames on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> Callable[[int, int], None]:
        if not sys.stderr.isatty():
            return lambda done, total: None
        from rich.console import Console
        from rich.progress import Progress

        self._bar = Progress(console=Console(file=quiet.terminal_stderr()), transient=True,
                             # Answers piped on (`| xargs`) must reach the pipe, not the bar's terminal.
                             redirect_stdout=sys.stdout.isatty())
        self._bar.start()
        task = self._bar.add_task("decoding speech", total=self.total)
        return lambda done, total: self._bar.update(task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
