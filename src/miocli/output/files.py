"""Single files, written safely: atomic writes, streams written in place, names fit for files and terminals.

Everything that reaches the disk goes through `atomic_write` (a temporary file in the same folder,
then a rename: never a half file) or `write_single_file` (one command's one file, '-' for stdout).
An OSError becomes `OutputWriteError`: one line that names the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from miocli.errors import EnvironmentProblem, InputError, MioError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
# /dev/stdout and friends name a descriptor the caller already holds, even when it points at a regular file
# (`-o /dev/stdout > out.png`): a temporary file and a rename there would replace the link in /dev, not write.
_DESCRIPTOR_ALIAS = re.compile(r"/dev/(stdout|stderr|fd/[0-9]+)|/proc/(self|thread-self|[0-9]+)/fd/[0-9]+")
_NO_SPACE: set[int] = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NO_SPACE_HINT = "free some space (or choose another -o folder) and resume with --skip-existing"
SINGLE_NO_SPACE_HINT = "free some space and run the command again"


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe stem from free text (a prompt) or an input file name."""
    cleaned = _UNSAFE.sub("-", text.strip()).strip("-._")
    return (cleaned[:limit].rstrip("-._") or "output").lower()


def display_name(text: str) -> str:
    """`text` (a path) printable as UTF-8: bytes of a name that were not UTF-8 are shown as \\xNN."""
    if not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(_show_surrogate, text)


def _show_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    # U+DC80..U+DCFF is how surrogateescape (os.fsdecode) carries an undecodable byte: show that byte.
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def json_line(record: Any) -> str:
    """`record` as one line of JSON (no newline) that always encodes as UTF-8, whatever the file names in it."""
    text = json.dumps(record, ensure_ascii=False)
    # ensure_ascii=False copies lone surrogates (names that are not UTF-8) into the text, where encoding fails;
    # a JSON \u escape keeps the exact str for json.loads. They can only occur inside JSON strings.
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


class OutputWriteError(EnvironmentProblem):
    """Writing a result failed (full disk, quota, permissions, I/O error): one error line instead of a traceback."""

    def __init__(self, path: Path | str, error: OSError) -> None:
        what = "standard output" if str(path) == "-" else display_name(str(path))
        super().__init__(f"cannot write {what}: {_reason(error, path)}",
                         hint=NO_SPACE_HINT if error.errno in _NO_SPACE else None)
        self.path = path
        self.errno = error.errno


def _reason(error: OSError, path: Path | str) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    # A file other than the result (a missing helper program, a parent folder) is part of the explanation;
    # our own temporary file is not, the user never asked for it.
    other = error.filename
    if isinstance(other, (str, bytes, os.PathLike)) and error.strerror:
        other_path = Path(os.fsdecode(other))
        target = Path(path)
        ours = other_path == target or (other_path.parent == target.parent
                                        and other_path.name.startswith(f".{target.name}."))
        if not ours:
            reason += f": {display_name(str(other_path))}"
    return reason


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def writes_in_place(path: Path) -> bool:
    """Whether `path` is a stream (terminal, pipe, device, socket) that must be written, not renamed over."""
    # Checked first: with descriptor 1 closed, /dev/stdout names nothing, and must still never be renamed over.
    if os.name == "posix" and _DESCRIPTOR_ALIAS.fullmatch(os.path.abspath(path)):
        return True
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.contextmanager
def write_errors(path: Path | str) -> Iterator[None]:
    """Turn an OSError inside the block into OutputWriteError for `path`."""
    try:
        yield
    except OSError as exc:
        # A callback may raise our own errors (an InputError from an encoder); those already say what to do.
        if isinstance(exc, MioError):
            raise
        raise OutputWriteError(path, exc) from exc


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file.

    A terminal, pipe, device or socket is written in place (renaming over it would replace it, not write to it).
    OSErrors become OutputWriteError; other exceptions pass through, and no temporary file is left either way.
    """
    path = Path(path)
    if writes_in_place(path):
        with write_errors(path):
            write(path)
        return
    tmp: Path | None = None
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            # The pid lets a later run tell a leftover of a crashed process from a file being written right now.
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent)
            tmp = Path(tmp_name)
            os.close(fd)
            # mkstemp creates 0600 files; results should get the permissions any new file gets.
            os.chmod(tmp, 0o666 & ~_umask())
            write(tmp)
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            # Best effort: failing here must not hide the real error, and a later run removes the leftover.
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_single_file(target: str | Path, write: Callable[[BinaryIO], None], *, overwrite: bool) -> str:
    """Write the one file of a command: "-" is stdout, a stream is written in place, anything else atomically.

    An existing regular file is replaced only with `overwrite`. Returns the path written ("-" for stdout).
    """
    try:
        return _write_single_file(target, write, overwrite)
    except OutputWriteError as exc:
        if exc.errno in _NO_SPACE:
            exc.hint = SINGLE_NO_SPACE_HINT  # one file: no -o folder to resume in
        raise


def _write_single_file(target: str | Path, write: Callable[[BinaryIO], None], overwrite: bool) -> str:
    if str(target) == "-":
        with write_errors("-"):
            sys.stdout.flush()  # text printed earlier comes before the bytes
            write(sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return "-"
    path = Path(target)
    if writes_in_place(path):
        # An alias of a descriptor that is a regular file (`> out` or `>> log`): append, so `>>` keeps what the
        # file held, as the shell promised; truncating a pipe or device means nothing.
        with write_errors(path), open(path, "ab" if stat.S_ISREG(os.stat(path).st_mode) else "wb") as handle:
            write(handle)
        return str(path)
    if path.exists() and not overwrite:
        raise InputError(f"{display_name(str(path))} already exists", hint="pass --overwrite to replace it")

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    atomic_write(path, to_file)
    return str(path)


def relative_to(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
