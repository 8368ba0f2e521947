"""Result files: safe names, atomic writes, no silent overwrite, and the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from miocli.errors import EnvironmentProblem, InputError
from miocli.outputs import MANIFEST, OutputDir, atomic_write, atomic_write_text, relative_to, slug


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
    with pytest.raises(PermissionError):
        atomic_write_text(target, "never")
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


def test_output_path_that_is_a_file_is_an_environment_problem(tmp_path: Path):
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(EnvironmentProblem) as caught:
        OutputDir(tmp_path / "results")
    assert str(tmp_path / "results") in caught.value.message


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
