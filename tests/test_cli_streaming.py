"""Results as they come, through the real `mio` entry point: kills, resume, seeds, and outputs that never hurt."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mio_testing import MIO_COMMAND, run_mio
from miocli.cli.app import app

FAST = ["--max-new-tokens", "8", "--beams", "1"]
PIXELS = ["--steps", "2", "--size", "64"]
runner = CliRunner()


def invoke(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for n in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"p{n:02d}.png")
    return folder


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.jsonl"}


def mio_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MIO_MODEL"}


# ---- a kill loses at most the batch in flight; --skip-existing finishes the set ------------------
@pytest.mark.ci  # slow (a process per step); .ci/run runs the ci mark
def test_a_killed_run_keeps_finished_batches_and_a_resume_completes_the_set(tiny_model, pictures, tmp_path):
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = ["caption", str(pictures), "--model", str(tiny_model), *FAST, "-b", "2", "--json"]
    process = subprocess.Popen([*MIO_COMMAND, *args, "-o", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=mio_env())
    assert process.stdout is not None
    printed = [json.loads(process.stdout.readline()) for _ in range(6)]  # three batches of two
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    inputs = sorted(str(p) for p in pictures.glob("*.png"))
    assert [r["input"] for r in printed] == inputs[:6]
    records = {r["input"]: r for r in manifest(out)}
    files = {p.name for p in out.glob("*.caption.txt")}
    # The three printed batches are on disk, each file with its manifest line and the same text.
    for record in printed:
        assert records[record["input"]]["text"] == record["text"]
        assert (out / record["files"][0]).read_text() == record["text"] + "\n"
    # Anything more is at most the batch that was in flight, and never a half-written file.
    assert len(files) <= 8 and {f"{Path(i).stem}.caption.txt" for i in inputs[:6]} <= files
    assert {f for r in records.values() for f in r["files"]} <= files

    resumed = run_mio(*args, "-o", str(out), "--skip-existing")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("skipping") == len(files)
    assert not list(out.glob(".*.part"))
    complete = run_mio(*args, "-o", str(whole))
    assert complete.returncode == 0, complete.stderr
    assert outputs(out) == outputs(whole)
    texts = {r["input"]: r.get("text") for r in manifest(out)}
    assert texts == {r["input"]: r["text"] for r in manifest(whole)} and len(texts) == 12


def test_each_result_is_on_disk_before_the_next_batch_runs(tiny_model, pictures, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([*MIO_COMMAND, "caption", str(pictures), "--model", str(tiny_model), *FAST, "-b", "3",
                                "-o", str(out), "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=mio_env())
    assert process.stdout is not None
    seen_on_disk = []
    for line in process.stdout:
        record = json.loads(line)
        # When a record is printed its file and manifest line are already there.
        seen_on_disk.append((out / record["files"][0]).is_file()
                            and record["input"] in {r["input"] for r in manifest(out)})
    assert process.wait(timeout=120) == 0
    assert seen_on_disk == [True] * 12


# ---- seeds that mean something -------------------------------------------------------------------
def test_seeded_samples_are_the_same_whatever_the_batch_size(tiny_model, pictures, tmp_path):
    texts = ["hello", "a longer sentence to say", "hi there", "four words said here", "five"]
    speech, captions = {}, {}
    for size in ("1", "3", "8"):
        out = tmp_path / f"tts-{size}"
        done = invoke("tts", *texts, "--model", str(tiny_model), "--max-new-tokens", "40", "--seed", "3", "-b", size,
                      "-o", str(out))
        assert done.exit_code == 0, done.stderr
        speech[size] = outputs(out)
        done = invoke("caption", str(pictures), "--model", str(tiny_model), "--max-new-tokens", "8", "--beams", "1",
                      "--sample", "--seed", "3", "-b", size, "--json")
        assert done.exit_code == 0, done.stderr
        captions[size] = [json.loads(line)["text"] for line in done.stdout.splitlines()]
    assert len(speech["1"]) == 5 and speech["1"] == speech["3"] == speech["8"]
    assert captions["1"] == captions["3"] == captions["8"]
    # One failed item re-run alone gives the answer it had in its batch.
    again = invoke("tts", texts[1], "--model", str(tiny_model), "--max-new-tokens", "40", "--seed", "3",
                   "-o", str(tmp_path / "again"))
    assert again.exit_code == 0
    [(_, alone)] = outputs(tmp_path / "again").items()
    assert alone == speech["3"]["002-a-longer-sentence-to-say.tts.wav"]


def test_identical_image_segments_decoded_in_one_command_give_identical_pixels(tiny_model, tmp_path):
    done = invoke("imagine", "a kite", "a kite", "--model", str(tiny_model), "--max-new-tokens", "40", "--greedy",
                  "--beams", "1", *PIXELS, "-b", "2", "-o", str(tmp_path / "kites"))
    assert done.exit_code == 0, done.stderr
    first, second = (tmp_path / "kites" / f"00{n}-a-kite.imagine.png" for n in (1, 2))
    assert first.read_bytes() == second.read_bytes()
    tokens = invoke("tokenize", str(first), "--model", str(tiny_model)).stdout.strip()
    back = tmp_path / "back.png"
    done = invoke("detokenize", tokens + tokens + tokens, "-o", str(back), "--model", str(tiny_model), *PIXELS)
    assert done.exit_code == 0, done.stderr
    assert back.read_bytes() == (tmp_path / "back-2.png").read_bytes() == (tmp_path / "back-3.png").read_bytes()


# ---- outputs that never hurt ---------------------------------------------------------------------
def test_a_planted_manifest_link_is_refused_and_its_target_untouched(tiny_model, pictures, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to("../victim")
    done = run_mio("caption", str(pictures / "p00.png"), "--model", str(tiny_model), *FAST, "-o", str(out))
    assert done.returncode == 3 and "manifest.jsonl" in done.stderr and "Traceback" not in done.stderr
    assert victim.read_text() == "precious\n" and (out / "manifest.jsonl").is_symlink()
    assert not list(out.glob("*.txt"))


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_single_file_outputs_go_to_stdout_or_into_devices_never_over_them(tiny_model, pictures, tmp_path):
    tokens = invoke("tokenize", str(pictures / "p00.png"), "--model", str(tiny_model)).stdout.strip()
    common = ["--model", str(tiny_model), *PIXELS, "--seed", "0"]
    to_stdout = subprocess.run([*MIO_COMMAND, "detokenize", tokens, "-o", "-", *common], capture_output=True,
                               env=mio_env(), timeout=300)
    assert to_stdout.returncode == 0 and to_stdout.stdout.startswith(b"\x89PNG")
    through_device = subprocess.run([*MIO_COMMAND, "detokenize", tokens, "-o", "/dev/stdout", "--overwrite", *common],
                                    capture_output=True, env=mio_env(), timeout=300)
    assert through_device.returncode == 0, through_device.stderr
    assert through_device.stdout == to_stdout.stdout and os.path.islink("/dev/stdout")
    link = tmp_path / "sink"
    link.symlink_to(os.devnull)
    assert run_mio("detokenize", tokens, "-o", str(link), "--overwrite", *common).returncode == 0
    assert link.is_symlink() and os.readlink(link) == os.devnull
    # The file type follows the name: an image is not written under a .txt name.
    wrong = run_mio("detokenize", tokens, "-o", str(tmp_path / "out.txt"), *common)
    assert wrong.returncode == 2 and ".txt" in wrong.stderr and not (tmp_path / "out.txt").exists()
    many = run_mio("detokenize", tokens + tokens, "-o", "-", *common)
    assert many.returncode == 2 and "2 segments" in many.stderr


def test_many_image_segments_are_decoded_and_written_in_bounded_batches(tiny_model, pictures, tmp_path, monkeypatch):
    from miocli.core import mediatokens, stream
    from miocli.core.api import Mio

    mio = Mio(str(tiny_model), device="cpu")
    tokens = mio.tokenize(pictures / "p01.png").text
    sizes: list[int] = []
    decode = mediatokens.images_from_ids

    def spy(runtime, ids, options, progress=None):
        sizes.append(len(ids))
        return decode(runtime, ids, options, progress)

    monkeypatch.setattr(mediatokens, "images_from_ids", spy)
    from miocli.output.detokenize import run_detokenize

    count = 2 * stream.DECODE_BATCH + 3
    written = run_detokenize(mio, tokens * count, str(tmp_path / "img.png"), embeddings_only=False, overwrite=False,
                             seed=0, steps=2, guidance=10.0, size=64)
    assert len(written) == count
    # One picture per unCLIP call (bit-exact whatever the batch), handed over DECODE_BATCH at a time.
    assert sizes == [1] * count
    assert len(list(tmp_path.glob("img*.png"))) == count


def test_a_full_disk_is_one_error_naming_what_was_written_and_lost(tiny_model, pictures, tmp_path):
    unshare = shutil.which("unshare")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mio = " ".join(MIO_COMMAND)
    # A 24 KiB tmpfs in a private mount namespace: room for a few captions and not for twelve.
    script = (f"mount -t tmpfs -o size=24k tmpfs {mount_point} && {mio} caption {pictures} --model {tiny_model} "
              f"--max-new-tokens 400 --beams 1 -b 2 -o {mount_point}/out; echo \"exit=$?\"; "
              f"ls {mount_point}/out | grep -c caption.txt; wc -l < {mount_point}/out/manifest.jsonl")
    if unshare is None:
        pytest.skip("unshare is not available")
    probe = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this machine cannot make a private mount namespace")
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, env=mio_env(), timeout=600)
    lines = done.stdout.split()
    assert "exit=3" in lines, done.stdout + done.stderr
    files, records = int(lines[-2]), int(lines[-1])
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr
    assert f"{records} result(s) were written" in done.stderr or (records == 0 and "no result" in done.stderr)
    assert "was lost" in done.stderr and "--skip-existing" in done.stderr and "nothing from" in done.stderr
    assert 0 <= records <= files <= records + 1 < 12


def test_names_that_are_not_utf8_are_written_and_reported(tiny_model, pictures, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    odd = os.fsencode(folder) + b"/caf\xe9.png"
    shutil.copy(pictures / "p00.png", odd)
    shutil.copy(pictures / "p01.png", folder / "plain.png")
    out = tmp_path / "out"
    done = subprocess.run([*MIO_COMMAND, "caption", str(folder), "--model", str(tiny_model), *FAST, "-o", str(out),
                           "--json"], capture_output=True, env=mio_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    printed = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert len(printed) == 2 and printed[0]["input"].endswith("caf\udce9.png")
    assert len(manifest(out)) == 2
    assert os.path.exists(os.fsencode(out) + b"/caf\xe9.caption.txt")


def test_resume_is_per_input_when_two_inputs_share_a_stem(tiny_model, pictures, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(pictures / "p00.png", tmp_path / folder / "x.png")
    args = ["caption", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "--model", str(tiny_model),
            *FAST, "-o", str(tmp_path / "out")]
    first = run_mio(*args)
    assert first.returncode == 1 and "two inputs would both write" in first.stderr
    resumed = run_mio(*args, "--skip-existing")
    assert resumed.returncode == 1, resumed.stderr
    assert f"skipping {tmp_path / 'a' / 'x.png'}" in resumed.stderr
    assert f"{tmp_path / 'b' / 'x.png'}: two inputs would both write" in resumed.stderr


def test_closed_pipes_and_closed_streams(tiny_model, pictures):
    mio = " ".join(MIO_COMMAND)
    model = f"--model {tiny_model} --max-new-tokens 8 --beams 1"
    pipeline = f"{mio} caption {pictures} {model} | head -1; echo \"status=${{PIPESTATUS[0]}}\""
    piped = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, env=mio_env(), timeout=300)
    assert piped.stdout.splitlines()[-1] == "status=141", piped.stdout + piped.stderr
    assert len(piped.stdout.splitlines()) == 2 and "error" not in piped.stderr
    closed_out = subprocess.run(["bash", "-c", f"{mio} caption {pictures / 'p00.png'} {model} >&-"],
                                capture_output=True, text=True, env=mio_env(), timeout=300)
    assert closed_out.returncode == 3 and "stdout is closed" in closed_out.stderr
    closed_in = subprocess.run(["bash", "-c", f"{mio} caption - {model} <&-"], capture_output=True, text=True,
                               env=mio_env(), timeout=300)
    assert closed_in.returncode == 2 and "stdin is closed" in closed_in.stderr
    assert "Traceback" not in closed_out.stderr + closed_in.stderr


def test_answers_with_line_breaks_stay_one_line_per_input(capsys):
    from miocli.core.inputs import Item
    from miocli.core.results import Result
    from miocli.output.writer import TEXT, ResultWriter, Target

    writer = ResultWriter("caption", TEXT, None, show_names=True)
    for name, text in [("a.png", "two\nlines"), ("b.png", "back\\slash\r\nand more")]:
        writer.write(Target(Item(name), name), Result("caption", name, text=text))
    assert capsys.readouterr().out.splitlines() == ["a.png: two\\nlines", "b.png: back\\\\slash\\r\\nand more"]
    single = ResultWriter("caption", TEXT, None, show_names=False)
    single.write(Target(Item("c.png"), "c"), Result("caption", "c.png", text="a poem\nin two lines"))
    assert capsys.readouterr().out == "a poem\nin two lines\n"


def test_parts_left_by_a_killed_run_are_cleaned(tiny_model, pictures, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftovers = [out / f".p00.caption.txt.{gone.pid}.abcd1234.part", out / ".p01.caption.txt.k2j4h5g6.part"]
    for path in leftovers:
        path.write_text("half")
    keep = out / "notes.part"
    keep.write_text("mine")
    done = run_mio("caption", str(pictures / "p00.png"), "--model", str(tiny_model), *FAST, "-o", str(out),
                   "--skip-existing")
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in leftovers) and keep.read_text() == "mine"


def test_tokenize_and_detokenize_take_many_inputs(tiny_model, pictures, tmp_path):
    done = run_mio("tokenize", str(pictures / "p00.png"), str(pictures / "p01.png"), str(tmp_path / "gone.png"),
                   "--model", str(tiny_model), "--json")
    assert done.returncode == 1 and "gone.png" in done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [("tokens" in r, "error" in r) for r in records] == [(True, False), (True, False), (False, True)]
    files = []
    for number, record in enumerate(records[:2]):
        path = tmp_path / f"t{number}.txt"
        path.write_text(record["tokens"])
        files.append(str(path))
    out = tmp_path / "decoded"
    back = run_mio("detokenize", *files, records[0]["tokens"], "-o", str(out), "--model", str(tiny_model), *PIXELS,
                   "--seed", "0", "--json")
    assert back.returncode == 0, back.stderr
    assert [json.loads(line)["files"] for line in back.stdout.splitlines()] == [
        [str(out / "t0.png")], [str(out / "t1.png")], [str(out / "003.png")]]
    assert (out / "t0.png").read_bytes() == (out / "003.png").read_bytes()
    assert run_mio("detokenize", *files, "-o", str(tmp_path / "x.png"), "--model", str(tiny_model)).returncode == 2
