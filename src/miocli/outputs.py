"""Writing results: atomic files, names derived from inputs, no silent overwrite, manifest.jsonl."""

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from miocli.errors import EnvironmentProblem, InputError, MioError

MANIFEST = "manifest.jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Temporary files of atomic_write: ".{final name}.{pid}.{8 mkstemp chars}.part"; older versions wrote them without
# the pid. The random part is matched exactly so that a user's own hidden ".something.part" is never mistaken for one.
_PART_WITH_PID = re.compile(r"\..+\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.part", re.DOTALL)
_PART_WITHOUT_PID = re.compile(r"\..+\.[a-z0-9_]{8}\.part", re.DOTALL)
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
def _write_errors(path: Path | str) -> Iterator[None]:
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
        with _write_errors(path):
            write(path)
        return
    tmp: Path | None = None
    try:
        with _write_errors(path):
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
        with _write_errors("-"):
            sys.stdout.flush()  # text printed earlier comes before the bytes
            write(sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return "-"
    path = Path(target)
    if writes_in_place(path):
        # An alias of a descriptor that is a regular file (`> out` or `>> log`): append, so `>>` keeps what the
        # file held, as the shell promised; truncating a pipe or device means nothing.
        with _write_errors(path), open(path, "ab" if stat.S_ISREG(os.stat(path).st_mode) else "wb") as handle:
            write(handle)
        return str(path)
    if path.exists() and not overwrite:
        raise InputError(f"{display_name(str(path))} already exists", hint="pass --overwrite to replace it")

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    atomic_write(path, to_file)
    return str(path)


def _refuse_manifest(path: Path, mode: int) -> None:
    """Raise unless `mode` (from lstat) is a regular file: a planted link must not redirect our appends."""
    if stat.S_ISLNK(mode):
        raise EnvironmentProblem(f"{display_name(str(path))} is a symbolic link: refusing to follow it to append the "
                                 "manifest", hint="remove the link or choose another -o folder")
    if not stat.S_ISREG(mode):
        raise EnvironmentProblem(f"{display_name(str(path))} is not a regular file: refusing to append the manifest "
                                 "to it", hint="remove it or choose another -o folder")


def _open_manifest(path: Path, flags: int) -> int:
    """A descriptor of the manifest opened without following a link; refuses anything but a regular file."""
    # O_NONBLOCK: a FIFO planted under the name would otherwise block the open forever; it means nothing for
    # regular files. The umask applies to the 0o666 of a new file, as with open().
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        # ELOOP (a link), ENXIO (a FIFO without reader) or EISDIR: say which odd thing is there.
        with contextlib.suppress(OSError):
            _refuse_manifest(path, os.lstat(path).st_mode)
        raise
    try:
        _refuse_manifest(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _is_stale_part(name: str) -> bool:
    match = _PART_WITH_PID.fullmatch(name)
    if match:
        return not _process_alive(int(match["pid"]))
    return _PART_WITHOUT_PID.fullmatch(name) is not None


def _process_alive(pid: int) -> bool:
    # On Windows os.kill(pid, 0) terminates the process: never ask there, keep the file.
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # PermissionError: alive under another user; anything odd: not ours to judge
    return True


def _note_record(recorded: dict[str, str], record: Any) -> None:
    if not isinstance(record, dict) or "error" in record:
        return
    source, files = record.get("input"), record.get("files")
    if isinstance(source, str) and isinstance(files, list):
        for name in files:
            if isinstance(name, str):
                recorded[name] = source


@dataclass
class OutputDir:
    """A results folder: checks it can be written, refuses to clobber, keeps the manifest."""

    path: Path
    overwrite: bool = False
    skip_existing: bool = False
    offers_skip_existing: bool = True
    # Each name this run will write, with the input it belongs to.
    _claimed: dict[Path, str | None] = field(default_factory=dict)
    removed_parts: list[Path] = field(default_factory=list, init=False)
    _recorded: dict[str, str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot create the output folder {display_name(str(self.path))}: "
                                     f"{exc.strerror}", hint="choose another -o folder") from exc
        if not self.path.is_dir():
            raise EnvironmentProblem(f"-o {display_name(str(self.path))} exists and is not a folder",
                                     hint="choose another -o folder")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise EnvironmentProblem(f"the output folder {display_name(str(self.path))} is not writable",
                                     hint="fix its permissions or choose another -o folder")
        # Refuse a planted manifest link now, before any work, rather than after the first result.
        manifest = self.path / MANIFEST
        with contextlib.suppress(OSError):  # not there yet (or unreadable: add_record reports that)
            _refuse_manifest(manifest, os.lstat(manifest).st_mode)
        self.removed_parts = self.clean_stale_parts()

    def clean_stale_parts(self) -> list[Path]:
        """Remove temporary files that crashed or killed runs left in the folder; returns what was removed.

        Only hidden `.*.part` files of atomic_write's patterns directly in the folder, whose process is gone (or
        that predate the pid in the name); links are removed as links, folders and everything else are kept.
        """
        removed: list[Path] = []
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return removed  # cleaning is a courtesy; the run itself reports real problems with the folder
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(".part")) or not _is_stale_part(entry.name):
                continue
            try:
                if not (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                    continue
                os.unlink(entry.path)  # a link itself, never what it points to
            except OSError:
                continue
            removed.append(Path(entry.path))
        return removed

    def _unclaimed(self, name: str, source: str | None) -> Path:
        path = self.path / name
        # The same input may ask again (checked before generation, written after); another may not.
        if path in self._claimed and (source is None or self._claimed[path] != source):
            raise InputError(f"two inputs would both write {display_name(str(path))}", hint="rename one input",
                             source=source)
        return path

    def claim(self, name: str, source: str | None = None) -> Path:
        """Reserve output `name` for this run without checking the disk (a resumed input keeps its file)."""
        path = self._unclaimed(name, source)
        self._claimed[path] = source
        return path

    def target(self, name: str, source: str | None = None) -> Path:
        """The path for output `name`; raises if it exists and may not be replaced."""
        path = self._unclaimed(name, source)
        if path.exists() and not self.overwrite:
            raise InputError(
                f"{display_name(str(path))} already exists",
                hint="pass --overwrite to replace it or --skip-existing to keep it" if self.offers_skip_existing
                else "pass --overwrite to replace it, or choose another -o folder",
                source=source,
            )
        self._claimed[path] = source
        return path

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def add_record(self, record: dict[str, Any]) -> None:
        """Append `record` to manifest.jsonl as one line, never through a link."""
        path = self.path / MANIFEST
        data = (json_line(record) + "\n").encode("utf-8")
        with _write_errors(path):
            fd = _open_manifest(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                start = os.fstat(fd).st_size
                try:
                    _write_all(fd, data)
                except OSError:
                    # A half line would glue the next record onto it: cut it off, unless another run appended since.
                    with contextlib.suppress(OSError):
                        if start < os.fstat(fd).st_size < start + len(data):
                            os.ftruncate(fd, start)
                    raise
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            os.close(fd)  # network file systems may report a failed write only here
        if self._recorded is not None:
            _note_record(self._recorded, record)

    def recorded_files(self) -> dict[str, str]:
        """Output files the manifest records as written, each mapped to its input (read once, then kept current).

        Records with an "error" and lines that are not JSON objects are skipped; later records win.
        The dict is shared: do not modify it.
        """
        if self._recorded is None:
            recorded: dict[str, str] = {}
            for line in self._manifest_lines():
                try:
                    record = json.loads(line.decode("utf-8"))
                except (ValueError, RecursionError):
                    continue  # a line cut short by a crash, or not ours
                _note_record(recorded, record)
            self._recorded = recorded
        return self._recorded

    def _manifest_lines(self) -> list[bytes]:
        path = self.path / MANIFEST
        try:
            with os.fdopen(_open_manifest(path, os.O_RDONLY), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise EnvironmentProblem(f"cannot read {display_name(str(path))}: {exc.strerror or exc}",
                                     hint="fix it or choose another -o folder") from exc
        return [line for line in data.split(b"\n") if line.strip()]


def print_record(record: Any) -> None:
    """One result as a JSON line on stdout (what --json promises), flushed for pipelines."""
    try:
        sys.stdout.write(json_line(record) + "\n")
    except UnicodeEncodeError:
        # A stdout that is not UTF-8 (a latin-1 locale): all-ASCII escapes are the same JSON.
        sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def relative_to(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
