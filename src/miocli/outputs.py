"""Writing results: atomic files, names derived from inputs, no silent overwrite, manifest.jsonl."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miocli.errors import EnvironmentProblem, InputError

MANIFEST = "manifest.jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe stem from free text (a prompt) or an input file name."""
    cleaned = _UNSAFE.sub("-", text.strip()).strip("-._")
    return (cleaned[:limit].rstrip("-._") or "output").lower()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600 files; results should get the permissions any new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@dataclass
class OutputDir:
    """A results folder: checks it can be written, refuses to clobber, keeps the manifest."""

    path: Path
    overwrite: bool = False
    skip_existing: bool = False
    offers_skip_existing: bool = True
    _claimed: set[Path] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot create the output folder {self.path}: {exc.strerror}",
                                     hint="choose another -o folder") from exc
        if not self.path.is_dir():
            raise EnvironmentProblem(f"-o {self.path} exists and is not a folder", hint="choose another -o folder")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise EnvironmentProblem(f"the output folder {self.path} is not writable",
                                     hint="fix its permissions or choose another -o folder")

    def target(self, name: str, source: str | None = None) -> Path:
        """The path for output `name`; raises if it exists and may not be replaced."""
        path = self.path / name
        if path in self._claimed:
            raise InputError(f"two inputs would both write {path}", hint="rename one input", source=source)
        if path.exists() and not self.overwrite:
            raise InputError(
                f"{path} already exists",
                hint="pass --overwrite to replace it or --skip-existing to keep it" if self.offers_skip_existing
                else "pass --overwrite to replace it, or choose another -o folder",
                source=source,
            )
        self._claimed.add(path)
        return path

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def add_record(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        # Appends of one short line are atomic enough for a log written by one process.
        with open(self.path / MANIFEST, "a", encoding="utf-8") as handle:
            handle.write(line)


def print_record(record: Any) -> None:
    """One result as a JSON line on stdout (what --json promises), flushed for pipelines."""
    import sys

    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def relative_to(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
