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


# A line of an error stays readable in a terminal: names longer than this are shortened in the middle
# (messages themselves are written to stay under about 200 characters).
LONGEST_NAME = 120


def shorten_middle(text: str, limit: int = LONGEST_NAME) -> str:
    """`text` at most `limit` characters, its middle replaced by '…' (both ends of a path say the most)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def fit_line(line: str) -> str:
    """A message line with each overlong word (a path, a hub URL) shortened in the middle; nothing else is cut."""
    return " ".join(shorten_middle(word) for word in line.split(" "))


def article(word: str) -> str:
    """'a video', 'an image', 'an audio file': the article English puts before `word`."""
    return ("an " if word[:1].lower() in "aeio" else "a ") + word


def report(exc: MioError, name: str | None = None) -> None:
    """Print `exc` as mio's error line (naming the input once) and its hint, on stderr."""
    # Messages raised for one file often name it already ("image not found: x.png").
    prefix = f"{name}: " if name and name not in exc.message else ""
    print(fit_line(f"mio: error: {prefix}{exc.message}"), file=sys.stderr)
    if exc.hint:
        print(fit_line(f"  hint: {exc.hint}"), file=sys.stderr)


class EnvironmentProblem(MioError):
    """The machine cannot do what was asked: no CUDA, bitsandbytes unusable, unwritable folder."""

    exit_code = 3
