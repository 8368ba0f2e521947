"""A results folder (`-o DIR`): names claimed once, no silent overwrite, manifest.jsonl appended safely.

`OutputDir.write` is a result file's whole way to disk: the name is claimed for its input (an
existing file or a second input with the same name is refused), the file is written atomically
(`files.atomic_write`), and its name relative to the folder comes back for the manifest record.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miocli.errors import EnvironmentProblem, InputError, UsageError
from miocli.output.files import atomic_write, display_name, json_line, relative_to, write_errors

MANIFEST = "manifest.jsonl"
# Temporary files of atomic_write: ".{final name}.{pid}.{8 mkstemp chars}.part"; older versions wrote them without
# the pid. The random part is matched exactly so that a user's own hidden ".something.part" is never mistaken for one.
_PART_WITH_PID = re.compile(r"\..+\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.part", re.DOTALL)
_PART_WITHOUT_PID = re.compile(r"\..+\.[a-z0-9_]{8}\.part", re.DOTALL)


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


def _note_record(recorded: dict[str, str], record: Any, errors: dict[str, str | None] | None = None) -> None:
    if not isinstance(record, dict):
        return
    if errors is not None and isinstance(record.get("input"), str):
        error = record.get("error")
        errors[record["input"]] = error if isinstance(error, str) else None
    if "error" in record:
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
    # Each input's latest record: its error, or None when it succeeded (read with _recorded).
    _errors: dict[str, str | None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.exists() and not self.path.is_dir():
            # A typo on the command line (an input file given as the folder), not a broken machine.
            raise UsageError(f"-o {display_name(str(self.path))} is a file, not a folder",
                             hint="give -o a folder (new or existing)")
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

    def write(self, name: str, write: Callable[[Path], None], source: str | None = None) -> str:
        """Claim output `name` for `source`, write it atomically with `write(tmp_path)`, and return its name
        relative to the folder (as the manifest records it)."""
        path = self.target(name, source=source)
        atomic_write(path, write)
        return relative_to(path, self.path)

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def add_record(self, record: dict[str, Any]) -> None:
        """Append `record` to manifest.jsonl as one line, never through a link."""
        path = self.path / MANIFEST
        data = (json_line(record) + "\n").encode("utf-8")
        with write_errors(path):
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
            _note_record(self._recorded, record, self._errors)

    def records_error(self, source: str, error: str) -> bool:
        """Whether the manifest's latest record for `source` is already this error (a rerun adds no copy)."""
        self.recorded_files()
        return self._errors.get(source) == error

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
                _note_record(recorded, record, self._errors)
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
