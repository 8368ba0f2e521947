"""The guard every model load runs under: a library may neither read stdin nor write to stdout."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator


class _NoInput(io.TextIOBase):
    """sys.stdin while a library loads: every read fails at once, so nothing can prompt and wait.

    transformers asks "Do you wish to run the custom code? [y/N]" with input(); mio never wants
    that question asked (the answer is always no), least of all answered by a pipe meant for mio.
    """

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> str:
        raise OSError("mio does not let a library read stdin while it loads a model")

    def readline(self, size: int | None = -1, /) -> str:
        raise OSError("mio does not let a library read stdin while it loads a model")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no stdin while a model loads")

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def library_stdio() -> Iterator[None]:
    """While a library loads a model: stdin unreadable, and whatever it prints goes to stderr.

    stdout carries mio's results (--json lines a program parses); a library's notice there would
    corrupt them. Reentrant; restores both streams however the block ends.
    """
    saved_stdin = sys.stdin
    sys.stdin = _NoInput()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdin = saved_stdin
