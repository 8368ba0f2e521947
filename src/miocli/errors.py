"""Errors that reach the user as one clear line and a documented exit code.

Every module raises these instead of bare exceptions when the cause is something the
user can fix; the CLI prints `message` (plus `hint` when there is one) and exits with
`exit_code`. Anything else is a bug and shows a traceback only with `--debug`.
"""

from __future__ import annotations

import sys


class MioError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MioError):
    """The command line itself is wrong: bad option value, empty prompt, conflicting flags."""

    exit_code = 2


class InputError(MioError):
    """One input (a file, a prompt) cannot be processed; the other inputs still are."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, source: str | None = None) -> None:
        super().__init__(message, hint)
        self.source = source


class ModelError(MioError):
    """The checkpoint is missing, incomplete, corrupt or of the wrong variant."""

    exit_code = 3


def report(exc: MioError, name: str | None = None) -> None:
    """Print `exc` as mio's error line (naming the input when there is one) and its hint, on stderr."""
    prefix = f"{name}: " if name else ""
    print(f"mio: error: {prefix}{exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"  hint: {exc.hint}", file=sys.stderr)


class EnvironmentProblem(MioError):
    """The machine cannot do what was asked: no CUDA, bitsandbytes unusable, unwritable folder."""

    exit_code = 3
