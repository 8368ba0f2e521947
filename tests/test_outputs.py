"""Result files: safe names, atomic writes, no silent overwrite, and the manifest."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from miocli.errors import EnvironmentProblem, InputError, MioError, UsageError
from miocli.output.files import (
    NO_SPACE_HINT,
    OutputWriteError,
    atomic_write,
    atomic_write_text,
    display_name,
    json_line,
    relative_to,
    slug,
    write_single_file,
    writes_in_place,
)
from miocli.output.folder import MANIFEST, OutputDir
from miocli.output.stdout import print_record

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX file types and permission bits")


# ---- slug --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A red kite over a green hill", "a-red-kite-over-a-green-hill"),
        ("Hello, World!", "hello-world"),
        ("  spaced   out  ", "spaced-out"),
        ("photo.JPG", "photo.jpg"),
        ("café au lait", "caf-au-lait"),
        ("../../etc/passwd", "etc-passwd"),
        (".hidden", "hidden"),
        ("under_score-dash", "under_score-dash"),
        ("", "output"),
        ("!!!", "output"),
        ("日本語", "output"),
        ("...", "output"),
    ],
)
def test_slug(text: str, expected: str):
    assert slug(text) == expected


def test_slug_is_always_a_plain_safe_name():
    for text in ["a/b\\c:d*e?f\"g<h>i|j", "x" * 200, "-- leading and trailing --", "tab\there\nnewline"]:
        name = slug(text)
        assert name and len(name) <= 40
        assert all(c.isalnum() or c in "._-" for c in name), name
        assert not name.startswith((".", "-")) and not name.endswith((".", "-"))


def test_slug_limit_does_not_leave_a_trailing_separator():
    assert slug("abcd efgh", limit=5) == "abcd"
    assert slug("word " * 20, limit=12) == "word-word-wo"


# ---- atomic_write ---------------------------------------------------------------------------------
def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_atomic_write_writes_through_a_temporary_file_in_the_same_folder(tmp_path: Path):
    target = tmp_path / "sub" / "dir" / "out.txt"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert not target.exists()  # nothing visible under the final name while writing
        tmp.write_text("done")

    atomic_write(target, write)
    assert target.read_text() == "done"
    # Same folder: the final rename never crosses a file system.
    assert seen[0].parent == target.parent and seen[0] != target
    assert leftovers(target.parent) == []


def test_failed_write_leaves_no_file(tmp_path: Path):
    target = tmp_path / "out.wav"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"RIFF half a header")
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        atomic_write(target, write)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_text("previous")

    def write(tmp: Path) -> None:
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_text() == "previous"
    assert leftovers(tmp_path) == []


def test_failed_chmod_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Setting the permissions of the temporary file can fail too (odd file systems, ACLs): the
    # temporary file must still be removed and nothing written under the final name.
    target = tmp_path / "out.txt"

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    with pytest.raises(OutputWriteError) as caught:
        atomic_write_text(target, "never")
    assert caught.value.errno == errno.EPERM and "Operation not permitted" in caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_replacement_is_a_rename_not_an_in_place_rewrite(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_text("old content")
    # A reader that opened the old file keeps reading the old file: only a rename does that.
    with open(target, encoding="utf-8") as reader:
        atomic_write_text(target, "new content")
        assert reader.read() == "old content"
    assert target.read_text(encoding="utf-8") == "new content"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_usual_permissions(tmp_path: Path):
    # Results are shared and served like any file the user writes: umask decides, as with open().
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_atomic_write_text_is_utf8(tmp_path: Path):
    target = tmp_path / "caption.txt"
    atomic_write_text(target, "un café ☕\n")
    assert target.read_bytes() == "un café ☕\n".encode()


# ---- OutputDir -------------------------------------------------------------------------------------
def test_output_dir_is_created(tmp_path: Path):
    out = OutputDir(tmp_path / "a" / "b")
    assert out.path.is_dir()
    assert out.target("x.txt") == tmp_path / "a" / "b" / "x.txt"
    assert OutputDir(str(tmp_path / "c")).path == tmp_path / "c"  # a string -o works too


def test_existing_file_is_refused_without_overwrite(tmp_path: Path):
    (tmp_path / "cat.png").write_bytes(b"png")
    out = OutputDir(tmp_path)
    with pytest.raises(InputError) as caught:
        out.target("cat.png", source="cat.jpg")
    error = caught.value
    assert str(tmp_path / "cat.png") in error.message
    assert "--overwrite" in (error.hint or "") and "--skip-existing" in (error.hint or "")
    assert error.source == "cat.jpg"
    assert (tmp_path / "cat.png").read_bytes() == b"png"
    assert out.exists("cat.png") and not out.exists("dog.png")


def test_overwrite_allows_existing_files(tmp_path: Path):
    (tmp_path / "cat.png").write_bytes(b"png")
    out = OutputDir(tmp_path, overwrite=True)
    assert out.target("cat.png") == tmp_path / "cat.png"


@pytest.mark.parametrize("overwrite", [False, True])
def test_same_name_twice_in_one_run_is_refused(tmp_path: Path, overwrite: bool):
    # Two inputs named alike (a.jpg, a.png) must not silently write over each other's result,
    # even with --overwrite, which is about files from earlier runs.
    out = OutputDir(tmp_path, overwrite=overwrite)
    out.target("a.caption.txt", source="a.jpg")
    with pytest.raises(InputError, match="two inputs would both write") as caught:
        out.target("a.caption.txt", source="a.png")
    assert str(tmp_path / "a.caption.txt") in caught.value.message
    assert caught.value.source == "a.png"
    assert out.target("b.caption.txt") == tmp_path / "b.caption.txt"


def test_folder_under_a_regular_file_is_an_environment_problem(tmp_path: Path):
    (tmp_path / "file").write_text("I am a file")
    with pytest.raises(EnvironmentProblem, match="cannot create the output folder") as caught:
        OutputDir(tmp_path / "file" / "out")
    assert "-o" in (caught.value.hint or "")


def test_output_path_that_is_a_file_is_a_usage_error(tmp_path: Path):
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(UsageError) as caught:
        OutputDir(tmp_path / "results")
    assert str(tmp_path / "results") in caught.value.message
    assert caught.value.exit_code == 2


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_is_an_environment_problem(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(EnvironmentProblem, match="not writable"):
            OutputDir(folder)
    finally:
        folder.chmod(0o700)


# ---- manifest ------------------------------------------------------------------------------------
def test_manifest_lines_are_json_records(tmp_path: Path):
    out = OutputDir(tmp_path)
    records = [
        {"input": "a.jpg", "output": "a.caption.txt", "text": "a cat\non a chair"},
        {"input": "b.wav", "output": "b.asr.txt", "text": "un café ☕", "problems": ["malformed speech"]},
        {"prompt": 'quotes " and \\ backslashes', "seconds": 1.5, "ok": True, "ids": [1, 2, 3]},
    ]
    for record in records:
        out.add_record(record)
    lines = (tmp_path / MANIFEST).read_text(encoding="utf-8").splitlines()
    # One record per line, even when a value holds a newline.
    assert len(lines) == len(records)
    assert [json.loads(line) for line in lines] == records
    assert "☕" in lines[1]  # kept readable, not \u-escaped


def test_manifest_appends_across_runs(tmp_path: Path):
    OutputDir(tmp_path).add_record({"run": 1})
    OutputDir(tmp_path).add_record({"run": 2})
    lines = (tmp_path / MANIFEST).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["run"] for line in lines] == [1, 2]


def test_relative_to():
    assert relative_to(Path("/a/b/c.txt"), Path("/a")) == "b/c.txt"
    assert relative_to(Path("/x/c.txt"), Path("/a")) == "/x/c.txt"


# ---- never through a link: the manifest ---------------------------------------------------------------
@POSIX
def test_planted_manifest_link_is_refused_before_any_work(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("../victim", out / MANIFEST)
    with pytest.raises(EnvironmentProblem) as caught:
        OutputDir(out)
    assert str(out / MANIFEST) in caught.value.message and "refus" in caught.value.message
    assert caught.value.exit_code == 3
    assert victim.read_text() == "precious\n"


@POSIX
@pytest.mark.parametrize("dangling", [False, True])
def test_link_planted_during_a_run_is_not_appended_through(tmp_path: Path, dangling: bool):
    # O_CREAT alone would follow a dangling link and create its target: O_NOFOLLOW refuses both kinds.
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("precious\n")
    out = OutputDir(tmp_path / "out")
    os.symlink("../victim", out.path / MANIFEST)
    with pytest.raises(EnvironmentProblem, match="symbolic link: refusing to follow") as caught:
        out.add_record({"input": "a.jpg"})
    assert str(out.path / MANIFEST) in caught.value.message
    assert victim.read_text() == "precious\n" if not dangling else not victim.exists()
    assert (out.path / MANIFEST).is_symlink()


@POSIX
@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_manifest_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str):
    out = OutputDir(tmp_path)

    def plant() -> None:
        if kind == "folder":
            (tmp_path / MANIFEST).mkdir()
        else:
            os.mkfifo(tmp_path / MANIFEST)

    plant()
    # A FIFO without a reader must not block the run: it is refused like a folder.
    with pytest.raises(EnvironmentProblem, match="not a regular file: refusing to append"):
        out.add_record({"run": 1})
    with pytest.raises(EnvironmentProblem, match="not a regular file"):
        OutputDir(tmp_path)
    with pytest.raises(EnvironmentProblem, match="not a regular file"):
        out.recorded_files()


@POSIX
def test_manifest_permissions_follow_the_umask(tmp_path: Path):
    umask = os.umask(0o027)
    try:
        OutputDir(tmp_path).add_record({"run": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / MANIFEST).stat().st_mode) == 0o640


def test_manifest_line_is_written_whole_across_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    out = OutputDir(tmp_path)
    record = {"input": "a.jpg", "text": "un café ☕ " * 20}
    out.add_record(record)
    out.add_record({"run": 2})
    lines = (tmp_path / MANIFEST).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [record, {"run": 2}]


def test_full_disk_while_appending_is_one_error_and_leaves_no_half_line(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    out = OutputDir(tmp_path)
    out.add_record({"run": 1})
    real_write = os.write
    calls: list[int] = []

    def write_then_fail(fd: int, data: bytes) -> int:
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write_then_fail)
    with pytest.raises(OutputWriteError) as caught:
        out.add_record({"run": 2, "text": "long enough to be cut"})
    error = caught.value
    assert error.message == f"cannot write {tmp_path / MANIFEST}: No space left on device"
    assert error.errno == errno.ENOSPC and error.hint == NO_SPACE_HINT
    assert error.path == tmp_path / MANIFEST and error.exit_code == 3
    monkeypatch.setattr(os, "write", real_write)
    out.add_record({"run": 3})
    lines = (tmp_path / MANIFEST).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"run": 1}, {"run": 3}]


def test_manifest_folder_gone_is_an_output_write_error(tmp_path: Path):
    out = OutputDir(tmp_path / "out")
    (tmp_path / "out").rmdir()
    with pytest.raises(OutputWriteError, match="No such file or directory") as caught:
        out.add_record({"run": 1})
    assert caught.value.errno == errno.ENOENT


# ---- temporary files: names and stale leftovers --------------------------------------------------------
PART = re.compile(r"\.out\.txt\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.part")


def test_temporary_file_names_the_result_and_the_process(tmp_path: Path):
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("x")

    atomic_write(tmp_path / "out.txt", write)
    match = PART.fullmatch(seen[0].name)
    assert match and int(match["pid"]) == os.getpid()
    assert seen[0].parent == tmp_path


@pytest.fixture
def fake_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """pid 111 is gone, 222 belongs to another user, every other pid is alive."""

    def kill(pid: int, signal: int) -> None:
        assert signal == 0
        if pid == 111:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        if pid == 222:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)


@POSIX
def test_stale_parts_are_removed_and_nothing_else(tmp_path: Path, fake_processes: None,
                                                  capsys: pytest.CaptureFixture[str]):
    out = OutputDir(tmp_path)
    stale = [".a.png.111.abcd_123.part", ".b.wav.111.zzzzzzzz.part", ".old.txt.k3j_x9q2.part"]
    kept = [
        f".mine.txt.{os.getpid()}.abcdefgh.part",  # this process
        ".c.png.222.abcdefgh.part",  # alive, another user's
        ".d.png.333.abcdefgh.part",  # alive
        "visible.txt.111.abcdefgh.part",  # not hidden: not ours
        ".notes.part",  # no random part
        ".x.txt.111.ABCDEFGH.part",  # mkstemp never writes capitals
        ".y.txt.111.abcdefgh.partial",
        "result.png",
    ]
    for name in stale + kept:
        (tmp_path / name).write_text(name)
    (tmp_path / ".folder.111.abcdefgh.part").mkdir()
    os.mkfifo(tmp_path / ".fifo.111.abcdefgh.part")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".e.png.111.abcdefgh.part").write_text("deeper")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".link.txt.111.abcdefgh.part").symlink_to(victim)
    removed = out.clean_stale_parts()
    assert sorted(p.name for p in removed) == sorted([*stale, ".link.txt.111.abcdefgh.part"])
    assert all(p.parent == tmp_path for p in removed)
    left = {p.name for p in tmp_path.iterdir()}
    assert set(kept) <= left and {".folder.111.abcdefgh.part", ".fifo.111.abcdefgh.part"} <= left
    assert not left & set(stale) and ".link.txt.111.abcdefgh.part" not in left
    assert victim.read_text() == "precious"  # the link went, not what it pointed to
    assert (tmp_path / "sub" / ".e.png.111.abcdefgh.part").exists()
    assert out.clean_stale_parts() == []
    assert capsys.readouterr() == ("", "")


@POSIX
def test_output_dir_cleans_leftovers_of_a_finished_process_when_opened(tmp_path: Path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    leftover = tmp_path / f".a.png.{finished.pid}.abcdefgh.part"
    leftover.write_bytes(b"half a png")
    running = tmp_path / f".b.png.{os.getpid()}.abcdefgh.part"
    running.write_bytes(b"being written")
    out = OutputDir(tmp_path)
    assert out.removed_parts == [leftover]
    assert not leftover.exists() and running.exists()


# ---- streams: written in place, never renamed over -------------------------------------------------------
@pytest.fixture
def no_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """A regression must fail the test, not replace /dev/null (these tests may run as root)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stream must be written in place")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(os, "replace", refuse)


def read_fifo_in_background(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as handle:
            received.append(handle.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, received


@POSIX
def test_atomic_write_to_a_fifo_writes_into_it(tmp_path: Path, no_rename: None):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader, received = read_fifo_in_background(fifo)
    atomic_write_text(fifo, "through the pipe\n")
    reader.join(timeout=10)
    assert received == [b"through the pipe\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_atomic_write_to_dev_null_keeps_the_device(no_rename: None):
    atomic_write(Path("/dev/null"), lambda path: path.write_bytes(b"gone"))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux /dev/full")
def test_full_device_is_an_output_write_error(no_rename: None):
    with pytest.raises(OutputWriteError) as caught:
        atomic_write_text(Path("/dev/full"), "x" * 100_000)
    assert caught.value.errno == errno.ENOSPC and caught.value.hint == NO_SPACE_HINT
    assert caught.value.message == "cannot write /dev/full: No space left on device"


@POSIX
def test_socket_is_not_renamed_over(no_rename: None):
    # AF_UNIX paths are short: a folder of our own under the system temp folder.
    folder = Path(tempfile.mkdtemp())
    path = folder / "s"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        with pytest.raises(OutputWriteError) as caught:  # a socket cannot be opened as a file
            atomic_write_text(path, "x")
        assert caught.value.errno == errno.ENXIO
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        server.close()
        path.unlink()
        folder.rmdir()


@POSIX
def test_writes_in_place(tmp_path: Path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(fifo)
    assert writes_in_place(fifo) and writes_in_place(tmp_path / "link")
    assert not writes_in_place(tmp_path / "file") and not writes_in_place(tmp_path / "missing")
    assert not writes_in_place(tmp_path)  # a folder is refused by the rename, not written into
    if os.path.exists("/dev/null"):
        assert writes_in_place(Path("/dev/null"))
    if os.path.exists("/proc/self/fd"):
        assert writes_in_place(Path("/dev/stdout"))  # whatever descriptor 1 is
        assert writes_in_place(Path("/dev/fd/987654"))  # even a closed one: never a rename in /dev


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="Linux descriptor aliases")
def test_closed_descriptor_alias_is_an_error_not_a_rename(no_rename: None):
    with pytest.raises(OutputWriteError) as caught:
        atomic_write_text(Path("/dev/fd/987654"), "x")
    assert caught.value.errno == errno.ENOENT


# ---- write_single_file ------------------------------------------------------------------------------------------
def write_bytes(data: bytes):
    def write(handle: BinaryIO) -> None:
        handle.write(data)

    return write


def test_single_file_dash_is_stdout(capsysbinary: pytest.CaptureFixture[bytes]):
    print("text first")
    assert write_single_file("-", write_bytes(b"\x89PNG binary"), overwrite=False) == "-"
    assert capsysbinary.readouterr().out == b"text first\n\x89PNG binary"


def test_single_file_new_and_existing(tmp_path: Path):
    target = tmp_path / "sub" / "img.png"
    assert write_single_file(target, write_bytes(b"one"), overwrite=False) == str(target)
    assert target.read_bytes() == b"one"
    with pytest.raises(InputError) as caught:
        write_single_file(str(target), write_bytes(b"two"), overwrite=False)
    assert str(target) in caught.value.message and caught.value.hint == "pass --overwrite to replace it"
    assert caught.value.exit_code == 1
    assert target.read_bytes() == b"one"
    assert write_single_file(str(target), write_bytes(b"two"), overwrite=True) == str(target)
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["img.png"]


@POSIX
def test_single_file_to_a_fifo_and_dev_null_needs_no_overwrite(tmp_path: Path, no_rename: None):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader, received = read_fifo_in_background(fifo)
    assert write_single_file(fifo, write_bytes(b"bytes"), overwrite=False) == str(fifo)
    reader.join(timeout=10)
    assert received == [b"bytes"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if os.path.exists("/dev/null"):
        assert write_single_file("/dev/null", write_bytes(b"gone"), overwrite=False) == "/dev/null"


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="Linux descriptor aliases")
def test_single_file_dev_stdout_redirected_to_a_file_is_written_there(capfd: pytest.CaptureFixture[str],
                                                                      no_rename: None):
    # Under capfd, descriptor 1 is a regular file, as with `mio ... -o /dev/stdout > out.png`.
    assert stat.S_ISREG(os.fstat(1).st_mode)
    print("before", flush=True)
    assert write_single_file("/dev/stdout", write_bytes(b"after\n"), overwrite=False) == "/dev/stdout"
    assert capfd.readouterr().out == "before\nafter\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux /dev/full")
def test_single_file_full_device_hint_does_not_mention_resuming(no_rename: None):
    with pytest.raises(OutputWriteError) as caught:
        write_single_file("/dev/full", write_bytes(b"x" * 100_000), overwrite=False)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.hint and "free some space" in caught.value.hint and "--skip-existing" not in caught.value.hint


def test_single_file_full_disk_is_one_error(tmp_path: Path):
    def fail(handle: BinaryIO) -> None:
        handle.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputWriteError, match="No space left on device") as caught:
        write_single_file(tmp_path / "a.png", fail, overwrite=False)
    assert "--skip-existing" not in (caught.value.hint or "")
    assert list(tmp_path.iterdir()) == []


def test_single_file_stdout_errors_name_standard_output(monkeypatch: pytest.MonkeyPatch):
    class Broken(io.BytesIO):
        def flush(self) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    stdout = io.TextIOWrapper(Broken(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(OutputWriteError) as caught:
        write_single_file("-", write_bytes(b"x"), overwrite=False)
    assert caught.value.message == f"cannot write standard output: {os.strerror(errno.EIO)}"
    assert caught.value.path == "-"


# ---- write errors become one OutputWriteError ------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)])
def test_full_disk_in_the_write_callback(tmp_path: Path, code: int):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(OutputWriteError) as caught:
        atomic_write(target, write)
    error = caught.value
    assert isinstance(error, EnvironmentProblem) and error.exit_code == 3
    assert error.message == f"cannot write {target}: {os.strerror(code)}"
    assert error.hint == NO_SPACE_HINT and error.errno == code and error.path == target
    assert isinstance(error.__cause__, OSError)
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("step", ["mkstemp", "replace", "mkdir"])
def test_os_errors_of_every_step_are_output_write_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         step: str):
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "sub"))

    if step == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    elif step == "replace":
        monkeypatch.setattr(os, "replace", refuse)
    else:
        monkeypatch.setattr(Path, "mkdir", refuse)
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(OutputWriteError) as caught:
        atomic_write_text(target, "x")
    assert caught.value.errno == errno.EACCES and caught.value.hint is None
    assert caught.value.message.startswith(f"cannot write {target}: Permission denied")
    assert not target.exists() and not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))


def test_our_temporary_file_is_not_named_but_another_file_is(tmp_path: Path):
    def missing_helper(tmp: Path) -> None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "ffmpeg")

    with pytest.raises(OutputWriteError) as caught:
        atomic_write(tmp_path / "v.mp4", missing_helper)
    assert caught.value.message == f"cannot write {tmp_path / 'v.mp4'}: No such file or directory: ffmpeg"

    def io_error_on_temporary(tmp: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp))

    with pytest.raises(OutputWriteError) as caught:
        atomic_write(tmp_path / "v.mp4", io_error_on_temporary)
    assert caught.value.message == f"cannot write {tmp_path / 'v.mp4'}: {os.strerror(errno.EIO)}"


def test_pil_style_os_error_without_errno(tmp_path: Path):
    def save(tmp: Path) -> None:
        raise OSError("cannot write mode RGBA as JPEG")

    with pytest.raises(OutputWriteError) as caught:
        atomic_write(tmp_path / "a.jpg", save)
    assert caught.value.message == f"cannot write {tmp_path / 'a.jpg'}: cannot write mode RGBA as JPEG"
    assert caught.value.errno is None and caught.value.hint is None
    assert list(tmp_path.iterdir()) == []


def test_mio_errors_from_the_callback_pass_unchanged(tmp_path: Path):
    class InputOSError(InputError, OSError):
        pass

    for error in (InputError("bad audio", hint="fix it"), InputOSError("odd")):
        def write(tmp: Path, error: MioError = error) -> None:
            raise error

        with pytest.raises(MioError) as caught:
            atomic_write(tmp_path / "a.wav", write)
        assert caught.value is error
        assert list(tmp_path.iterdir()) == []


@POSIX
@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_while_writing_is_an_output_write_error(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputWriteError, match="Permission denied"):
            atomic_write_text(folder / "a.txt", "x")
    finally:
        folder.chmod(0o700)


# ---- odd names in JSON lines and messages ---------------------------------------------------------------------
NOT_UTF8 = os.fsdecode(b"caf\xe9.png")


def test_json_line_escapes_names_that_are_not_utf8():
    record = {"input": NOT_UTF8, "files": [NOT_UTF8], "text": "un café ☕\nline two"}
    line = json_line(record)
    assert "\n" not in line and "\\udce9" in line and "☕" in line
    line.encode("utf-8")  # would raise with a raw surrogate
    assert json.loads(line) == record


def test_manifest_and_print_record_take_names_that_are_not_utf8(tmp_path: Path,
                                                                capsysbinary: pytest.CaptureFixture[bytes]):
    record = {"input": NOT_UTF8, "files": ["caf.png"]}
    out = OutputDir(tmp_path)
    out.add_record(record)
    assert json.loads((tmp_path / MANIFEST).read_text(encoding="utf-8")) == record
    print_record(record)
    assert json.loads(capsysbinary.readouterr().out.decode("utf-8")) == record
    assert out.recorded_files() == {"caf.png": NOT_UTF8}


def test_print_record_on_a_stdout_that_is_not_utf8(monkeypatch: pytest.MonkeyPatch):
    buffer = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buffer, encoding="latin-1"))
    record = {"text": "un café ☕", "input": NOT_UTF8}
    print_record(record)
    assert json.loads(buffer.getvalue().decode("ascii")) == record


def test_display_name():
    assert display_name(NOT_UTF8) == "caf\\xe9.png"
    assert display_name("un café ☕.png") == "un café ☕.png"
    assert display_name("\ud83d") == "\\ud83d"
    for name in (NOT_UTF8, "\ud83d"):
        display_name(name).encode("utf-8")


def test_error_messages_show_names_that_are_not_utf8(tmp_path: Path):
    out = OutputDir(tmp_path)
    out.target(NOT_UTF8)
    with pytest.raises(InputError) as caught:
        out.target(NOT_UTF8)
    assert caught.value.message.endswith("caf\\xe9.png")
    caught.value.message.encode("utf-8")

    def fail(tmp: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(OutputWriteError) as written:
        atomic_write(tmp_path / NOT_UTF8, fail)
    written.value.message.encode("utf-8")
    assert written.value.path == tmp_path / NOT_UTF8


# ---- resume: what the manifest says was written ------------------------------------------------------------------
def test_recorded_files_without_a_manifest(tmp_path: Path):
    assert OutputDir(tmp_path).recorded_files() == {}


def test_recorded_files_skips_errors_and_lines_that_are_not_records(tmp_path: Path):
    lines = [
        json.dumps({"input": "a.jpg", "files": ["a.caption.txt"]}),
        json.dumps({"input": "b.jpg", "files": ["b.caption.txt"], "error": "out of memory"}),
        '{"input": "c.jpg", "files": ["c.capt',  # cut short by a crash
        json.dumps(["not", "an", "object"]),
        json.dumps("a string"),
        "42",
        "",
        "   ",
        json.dumps({"input": 7, "files": ["d.txt"]}),
        json.dumps({"input": "e.jpg", "files": "e.txt"}),
        json.dumps({"input": "f.jpg", "files": ["f-1.png", 3, None, "f-2.png"]}),
        json.dumps({"task": "demo", "files": ["g.txt"]}),
        json.dumps({"input": "a2.jpg", "files": ["a.caption.txt"]}),  # later records win
    ]
    data = "\n".join(lines).encode("utf-8") + b"\n\xff\xfe not utf-8 {\n"
    (tmp_path / MANIFEST).write_bytes(data)
    assert OutputDir(tmp_path).recorded_files() == {
        "a.caption.txt": "a2.jpg",
        "f-1.png": "f.jpg",
        "f-2.png": "f.jpg",
    }


def test_recorded_files_reads_once_and_follows_new_records(tmp_path: Path):
    out = OutputDir(tmp_path)
    out.add_record({"input": "a.jpg", "files": ["a.txt"]})
    assert out.recorded_files() == {"a.txt": "a.jpg"}
    with open(tmp_path / MANIFEST, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"input": "x.jpg", "files": ["x.txt"]}) + "\n")  # another writer: not re-read
    out.add_record({"input": "b.jpg", "files": ["b.txt"]})
    out.add_record({"input": "c.jpg", "files": ["c.txt"], "error": "failed"})
    assert out.recorded_files() == {"a.txt": "a.jpg", "b.txt": "b.jpg"}
    assert OutputDir(tmp_path).recorded_files() == {"a.txt": "a.jpg", "x.txt": "x.jpg", "b.txt": "b.jpg"}


def test_claim_reserves_a_name_without_looking_at_the_disk(tmp_path: Path):
    (tmp_path / "a.txt").write_text("kept from the last run")
    out = OutputDir(tmp_path)
    assert out.claim("a.txt", source="a.jpg") == tmp_path / "a.txt"  # exists, no --overwrite: still fine
    with pytest.raises(InputError, match="two inputs would both write") as caught:
        out.target("a.txt", source="a.png")
    assert caught.value.source == "a.png"
    with pytest.raises(InputError, match="two inputs would both write"):
        out.claim("a.txt", source="a.gif")
    assert out.target("b.txt") == tmp_path / "b.txt"
    with pytest.raises(InputError, match="two inputs would both write"):
        out.claim("b.txt")


def test_a_refused_target_is_not_claimed(tmp_path: Path):
    (tmp_path / "a.txt").write_text("x")
    out = OutputDir(tmp_path)
    with pytest.raises(InputError, match="already exists"):
        out.target("a.txt")
    assert out.claim("a.txt") == tmp_path / "a.txt"
