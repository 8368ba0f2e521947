"""Standard output as the results' stream: one line or one JSON object per result, flushed as it comes.

A closed stdout is found before work starts (`require_stdout`), and a reader that goes away
(`| head -1`) ends the output quietly (`silence_stdout`), as a process killed by SIGPIPE would.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from miocli.errors import EnvironmentProblem
from miocli.output.files import json_line


class StdoutClosed(Exception):
    """The reader of stdout went away (`| head -1`) and stdout was the only place results went."""


def stdout_usable() -> bool:
    """False when fd 1 was closed before we started (Python then sets sys.stdout to None)."""
    if sys.stdout is None:
        return False
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return True  # an in-memory stream (a test runner, a notebook): it takes what is written
    try:
        os.fstat(descriptor)
    except OSError:
        return False
    return True


def require_stdout() -> None:
    """A command whose results go to stdout refuses to start when stdout is closed (`>&-`)."""
    if not stdout_usable():
        raise EnvironmentProblem("stdout is closed, so the results would be lost",
                                 hint="redirect it to a file (> FILE) or pass -o DIR where the command has it")


def print_line(text: str) -> None:
    """One line on stdout, flushed: pipelines see each result as it comes."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def one_line(text: str) -> str:
    """Text on one line: backslashes and line breaks escaped, as in a JSON string."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def print_record(record: Any) -> None:
    """One result as a JSON line on stdout (what --json promises), flushed for pipelines."""
    try:
        sys.stdout.write(json_line(record) + "\n")
    except UnicodeEncodeError:
        # A stdout that is not UTF-8 (a latin-1 locale): all-ASCII escapes are the same JSON.
        sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def silence_stdout() -> None:
    """Point fd 1 at /dev/null so that Python's exit-time flush of a closed pipe stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
