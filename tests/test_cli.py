"""The real `mio` entry point on the tiny checkpoint: results, exit codes and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mio_testing import run_mio
from miocli import protocol
from miocli.cli.app import app
from miocli.model.tokenizer import MioTokenizer

runner = CliRunner()


def invoke(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin)


# ---- help stays light ---------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["chat", "--help"], ["generate", "--help"]])
def test_help_does_not_import_heavy_libraries(args):
    code = (
        "import sys\nfrom miocli.cli.app import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'cv2') if m in sys.modules]\n"
        "print('HEAVY:', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY: []" in done.stderr
    assert "Usage:" in done.stdout


def test_help_lists_commands_and_options():
    done = run_mio("--help")
    assert done.returncode == 0
    commands = done.stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    for command in ("chat", "generate", "doctor", "download", "demo", "caption", "ask", "imagine", "edit",
                    "tokenize", "detokenize", "asr", "tts", "speak", "speech2speech", "keyframes", "video-caption",
                    "video-gen", "interleave", "cot-visual"):
        assert command in listed, command
    chat_help = run_mio("chat", "--help").stdout
    for option in ("--mode", "--system", "--messages", "--no-generation-prompt", "--interactive", "--model",
                   "--device", "--dtype", "--quantize", "--beams", "--sample", "--greedy", "--temperature",
                   "--top-p", "--repetition-penalty", "--max-new-tokens", "--seed", "--print-prompt", "--json"):
        assert option in chat_help, option


# ---- end to end ------------------------------------------------------------------------------------
def test_chat_end_to_end(tiny_model):
    done = run_mio("chat", "What is the capital of France?", "--model", str(tiny_model), "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "Traceback" not in done.stderr


def test_generate_json_end_to_end_base(tiny_model):
    done = run_mio("generate", "Question: 1+1=? Answer:", "--model", str(tiny_model), "--variant", "base",
                   "--max-new-tokens", "6", "--json", "--greedy", "--beams", "1")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[0])
    assert record["task"] == "generate" and record["input"] == "Question: 1+1=? Answer:"
    assert isinstance(record["text"], str) and record["problems"] == []
    assert done.stderr == ""  # a library's deprecation warning would land in every user's terminal


def test_generate_batch_writes_outputs_and_manifest(tiny_model, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "first prompt", "second prompt", "third", "--model", str(tiny_model), "--variant", "base",
            "--max-new-tokens", "4", "--batch-size", "2", "-o", str(out)]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    files = sorted(p.name for p in out.glob("*.txt"))
    assert files == ["001-first-prompt.txt", "002-second-prompt.txt", "003-third.txt"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["input"] for r in records] == ["first prompt", "second prompt", "third"]
    # Existing outputs are never replaced silently: each input fails (exit 1) and says what to do.
    again = invoke(*args)
    assert again.exit_code == 1
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    skipped = invoke(*args, "--skip-existing")
    assert skipped.exit_code == 0 and skipped.stderr.count("skipping") == 3
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0


def test_batched_generation_matches_one_by_one(tiny_model):
    common = ["--model", str(tiny_model), "--variant", "base", "--max-new-tokens", "5", "--json", "--beams", "1"]
    prompts = ["a short one", "a much longer prompt with many more words in it"]
    batched = invoke("generate", *prompts, "--batch-size", "2", *common)
    single = [invoke("generate", p, *common) for p in prompts]
    assert batched.exit_code == 0
    texts = [json.loads(line)["text"] for line in batched.stdout.splitlines()]
    assert texts == [json.loads(s.stdout)["text"] for s in single]


def test_chat_messages_file_stdin_and_system(tiny_model, tmp_path):
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "1+1=?"},
                    {"role": "assistant", "content": "2"}, {"role": "user", "content": "12 times 12?"}]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conversation))
    from_file = invoke("chat", "--messages", str(path), "--mode", "custom", "--model", str(tiny_model),
                       "--print-prompt")
    from_stdin = invoke("chat", "--messages", "-", "--mode", "custom", "--model", str(tiny_model), "--print-prompt",
                        stdin=json.dumps(conversation))
    expected = protocol.apply_chat_template([conversation], "custom")[0]
    assert from_file.stdout == expected and from_stdin.stdout == expected
    with_system = invoke("chat", "hi", "--mode", "custom", "--system", "Be terse.", "--model", str(tiny_model),
                         "--print-prompt", "--no-generation-prompt")
    assert with_system.stdout == protocol.apply_chat_template(
        [[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]], "custom",
        add_generation_prompt=False)[0] + "\n"


def test_print_prompt_json_matches_tokenizer_and_loads_no_llm(tiny_model):
    from miocli.core.api import Mio

    done = invoke("chat", "What is MIO?", "--mode", "voice", "--model", str(tiny_model), "--print-prompt", "--json")
    record = json.loads(done.stdout)
    assert record["prompt"] == protocol.apply_chat_template([[{"role": "user", "content": "What is MIO?"}]],
                                                            "voice")[0]
    assert record["input_ids"] == MioTokenizer.from_dir(tiny_model).encode(record["prompt"])
    mio = Mio(str(tiny_model))
    mio.prompt_ids(__import__("miocli.core.prompts", fromlist=["Prompt"]).Prompt(record["prompt"]))
    assert "llm" not in mio.runtime.loaded()


def test_piped_text_is_the_question(tiny_model):
    piped = run_mio("chat", "--model", str(tiny_model), "--max-new-tokens", "3", "--beams", "1", stdin="hello\n")
    assert piped.returncode == 0 and piped.stdout.strip(), piped.stderr


def test_interactive_keeps_history(tiny_model):
    done = invoke("chat", "-i", "--model", str(tiny_model), "--max-new-tokens", "3", "--beams", "1",
                  stdin="hello\nand again\n\n")
    assert done.exit_code == 0, done.output
    assert len([line for line in done.stdout.splitlines()]) >= 2
    assert "you> \n" not in done.stderr  # what the user types follows the prompt on its line


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_demo_runs_and_names_its_folder(tiny_cache, tmp_path):
    done = run_mio("demo", cwd=tmp_path, env={"MIO_CACHE": str(tiny_cache)})
    assert done.returncode == 0, done.stderr
    assert "noise" in done.stderr
    folder = tmp_path / "mio-demo"
    assert str(folder.resolve()) in done.stderr
    assert (folder / "chat.txt").is_file() and (folder / "manifest.jsonl").is_file()
    # stdout labels each file it names; a second run reuses the folder.
    labelled = [line.split(": ", 1) for line in done.stdout.splitlines()]
    assert labelled and all(len(pair) == 2 and (tmp_path / pair[1]).is_file() for pair in labelled), done.stdout
    assert {"chat", "caption", "imagine", "keyframes", "interleave"} <= {task for task, _ in labelled}
    second = run_mio("demo", cwd=tmp_path, env={"MIO_CACHE": str(tiny_cache)})
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mio-demo"]


# ---- bad input: one clear line, the documented exit code, no traceback --------------------------------
def _assert_clean_error(done, code: int, *needles: str) -> None:
    stderr = done.stderr
    assert done.returncode == code if hasattr(done, "returncode") else done.exit_code == code, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("mio: error:"), stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


def test_missing_model_folder(tmp_path):
    _assert_clean_error(run_mio("chat", "hi", "--model", str(tmp_path / "nope")), 3, "no model folder")


def test_hub_id_not_in_cache(tmp_path):
    done = run_mio("chat", "hi", env={"HF_HUB_CACHE": str(tmp_path)})
    _assert_clean_error(done, 3, "m-a-p/MIO-7B-Instruct", "mio download")


def _copy_model(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("seed-tokenizer-2", "SpeechTokenizer",
                                                             "stable-diffusion-2-1-unclip"))
    return dest


def test_half_downloaded_model(tiny_model, tmp_path):
    model = _copy_model(tiny_model, tmp_path / "m")
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _assert_clean_error(run_mio("chat", "hi", "--model", str(model)), 3, "model-00002-of-00002.safetensors",
                        "half-downloaded")


def test_corrupt_config(tiny_model, tmp_path):
    model = _copy_model(tiny_model, tmp_path / "m")
    (model / "config.json").write_text("{ not json")
    _assert_clean_error(run_mio("chat", "hi", "--model", str(model)), 3, "config.json is corrupt")


def test_wrong_variant_for_task(tiny_model):
    done = invoke("chat", "hi", "--model", str(tiny_model), "--variant", "base")
    assert done.exit_code == 3 and "needs the Instruct model" in done.stderr


def test_unwritable_output_folder(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = invoke("generate", "hi", "--model", str(tiny_model), "-o", str(blocker / "sub"))
    assert done.exit_code == 3 and "output folder" in done.stderr


@pytest.mark.parametrize("args, needle", [
    (["chat", ""], "empty"),
    (["chat", "   "], "empty"),
    (["chat"], "nothing to ask"),
    (["generate", ""], "empty"),
    (["chat", "hi", "--device", "tpu"], "unknown device"),
    (["chat", "hi", "--quantize", "3bit"], "unknown quantize"),
    (["chat", "hi", "--dtype", "float8"], "unknown dtype"),
    (["chat", "hi", "--mode", "poetry"], "unknown --mode"),
    (["chat", "hi", "--system", "x"], "--system needs --mode custom"),
    (["chat", "hi", "--beams", "0"], "--beams"),
    (["generate", "hi", "--batch-size", "0"], "--batch-size"),
    (["chat", "--messages", "/nonexistent.json"], "cannot read"),
])
def test_usage_errors_exit_2(tiny_model, args, needle):
    done = invoke(*args, "--model", str(tiny_model))
    assert done.exit_code == 2, done.output
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_cuda_without_cuda(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = invoke("chat", "hi", "--model", str(tiny_model), "--device", "cuda")
    assert done.exit_code == 3 and "CUDA is not available" in done.stderr


def test_debug_shows_traceback(tmp_path):
    done = run_mio("chat", "hi", "--model", str(tmp_path / "nope"), "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr
