"""Keep third-party libraries' own stderr chatter off the user's terminal.

FFmpeg (through OpenCV), mpg123 and libsndfile print notes and errors straight to file
descriptor 2 from C ("Illegal Audio-MPEG-Header", NAL unit errors), and PIL, diffusers and
PySceneDetect warn or log through Python. None of it tells the user anything our own one-line
`mio: error: ...` does not, and printed before that line it buries it. `silenced()` points fd 2
at /dev/null around a library call and drops Python warnings raised inside it.

Wrap only the library calls themselves: whatever is written to stderr inside the block is lost,
so code that prints our own messages must stay outside it. `set_enabled(False)` (for
`--verbose`) or MIO_VERBOSE_LIBS=1 in the environment makes it a no-op, to see what a library
said while debugging.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

ENV_VERBOSE = "MIO_VERBOSE_LIBS"

enabled = True

# fd 2 is one per process: the first thread in redirects, the last one out restores it.
_lock = threading.Lock()
_depth = 0
_saved_fd: int | None = None
_saved_warnings: Any = None  # the outermost block's warnings.catch_warnings()
_terminal: Any = None  # our own stderr for progress bars, see terminal_stderr()


def set_enabled(value: bool) -> None:
    """Turn silencing on or off for the whole process (`--verbose` turns it off)."""
    global enabled
    enabled = bool(value)


def is_active() -> bool:
    """Whether `silenced()` would silence anything now."""
    return enabled and os.environ.get(ENV_VERBOSE, "") != "1"


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Discard what libraries write to stderr (C and Python alike) for the duration.

    Reentrant and usable from several threads: fd 2 stays redirected until the last block exits.
    """
    if not is_active():
        yield
        return
    _enter()
    try:
        yield
    finally:
        _exit()


def _enter() -> None:
    global _depth, _saved_fd, _saved_warnings
    with _lock:
        _depth += 1
        if _depth > 1:
            return
        # Whatever we printed before must reach the terminal, not /dev/null.
        _flush()
        catcher = warnings.catch_warnings()
        catcher.__enter__()
        warnings.simplefilter("ignore")
        _saved_warnings = catcher
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (a detached process): nothing to silence
            return
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            os.close(saved)
            return
        try:
            os.dup2(null, 2)
        except OSError:
            os.close(saved)
            return
        finally:
            os.close(null)
        _saved_fd = saved


def terminal_stderr() -> Any:
    """A text stream to the user's stderr that `silenced()` does not mute, for our own progress bars.

    A bar is redrawn while a library call runs (an image's denoising steps): written to fd 2 then, it
    would land in /dev/null. This writes to a copy of fd 2 taken outside any silenced block.
    """
    global _terminal
    with _lock:
        if _terminal is None:
            source = _saved_fd if _saved_fd is not None else 2
            try:
                _terminal = os.fdopen(os.dup(source), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                                      errors="replace")
            except OSError:
                _terminal = sys.stderr
        return _terminal


def _exit() -> None:
    global _depth, _saved_fd, _saved_warnings
    with _lock:
        _depth -= 1
        if _depth > 0:
            return
        # Library text still buffered in Python goes where it was written: to /dev/null.
        _flush()
        if _saved_fd is not None:
            try:
                os.dup2(_saved_fd, 2)
            finally:
                os.close(_saved_fd)
                _saved_fd = None
        if _saved_warnings is not None:
            _saved_warnings.__exit__(None, None, None)
            _saved_warnings = None


def _flush() -> None:
    for stream in (sys.stderr, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
