"""A model folder is never trusted: no custom code, no prompt, and a broken component is one error (exit 3).

Each case breaks a private copy of the tiny checkpoint the way a bad download or a hostile folder
would, then runs the real `mio` entry point (and `mio doctor`) on it.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mio_testing import one_torch_thread, run_mio  # noqa: F401  (one_torch_thread: autouse)
from miocli.cli import doctor
from miocli.core.mediatokens import DECODER, ENCODER
from miocli.errors import ModelError
from miocli.model import checkpoint
from miocli.model.devices import RuntimeOptions
from miocli.model.llm import load_llm
from miocli.model.runtime import Runtime
from miocli.model.stdio import library_stdio

FAST = ["--device", "cpu", "--max-new-tokens", "4", "--beams", "1"]


@pytest.fixture
def model(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint to break."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of five small pictures."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for n in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"photo{n}.png")
    return folder


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_one_error(done, *needles: str) -> str:
    """Exit 3, nothing on stdout, and stderr exactly one `mio: error:` line and its hint."""
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("mio: error: ") and lines[1].startswith("  hint: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def doctor_problems(model_dir: Path) -> dict[str, list[str]]:
    """`mio doctor --json` on the folder: exit 3, and the problems of each broken component."""
    done = run_mio("doctor", "--model", str(model_dir), "--device", "cpu", "--json")
    assert done.returncode == 3, done.stderr
    return broken(json.loads(done.stdout)["checkpoint"]["components"])


def checked_problems(model_dir: Path) -> dict[str, list[str]]:
    """The same check as `mio doctor`, in this process (for the cases beyond the CLI's exit code)."""
    return broken(doctor.check_model(model_dir))


def broken(components: list[dict]) -> dict[str, list[str]]:
    for component in components:
        assert component["ok"] is (not component["problems"])
    return {c["name"]: c["problems"] for c in components if not c["ok"]}


# ---- custom code -----------------------------------------------------------------------------------
def plant_custom_code(model_dir: Path, marker: Path, config_name: str = "config.json") -> None:
    """What a hostile folder looks like: an auto_map naming a module of its own that acts on import."""
    (model_dir / "custom_llm.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('the folder ran its code')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'mio_custom'\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    auto_map = {"AutoConfig": "custom_llm.CustomConfig", "AutoModelForCausalLM": "custom_llm.CustomModel"}
    if config_name == "config.json":
        # An unknown model_type leaves transformers only the folder's code: that is when it asks.
        edit_json(model_dir / "config.json", model_type="mio_custom", auto_map=auto_map)
    else:
        edit_json(model_dir / config_name, auto_map={"AutoTokenizer": ["custom_llm.CustomTokenizer", None]})


@pytest.mark.parametrize("config_name", ["config.json", "tokenizer_config.json"])
def test_a_folder_with_custom_code_is_refused_without_a_prompt(model: Path, images: Path, tmp_path: Path,
                                                               config_name: str):
    marker = tmp_path / "custom-code-ran"
    plant_custom_code(model, marker, config_name)
    # A "y" waiting on stdin is what would have answered transformers' "run the custom code? [y/N]".
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf")}
    done = run_mio("caption", str(images / "photo0.png"), "--model", str(model), "--json", *FAST,
                   stdin="y\n", env=env)
    line = assert_one_error(done, f"{config_name} asks to run custom code", "custom_llm.py")
    assert "Do you wish" not in done.stderr + done.stdout
    assert not marker.exists()
    assert "mio never runs Python shipped with a model" in done.stderr
    assert "refused" in line

    problems = doctor_problems(model) if config_name == "config.json" else checked_problems(model)
    assert list(problems) == ["llm"]
    assert any("auto_map" in p for p in problems["llm"])
    assert not marker.exists()


def test_a_stray_python_file_is_refused(model: Path):
    (model / "modeling_mio.py").write_text("raise SystemExit('never imported')\n")
    with pytest.raises(ModelError, match="custom code in the model folder: modeling_mio.py") as caught:
        _ = Runtime(RuntimeOptions(model=str(model))).tokenizer
    assert "mio never runs Python" in (caught.value.hint or "")


def test_the_llm_loader_itself_never_runs_folder_code_nor_reads_stdin(model: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]):
    # Past the folder check (called directly): trust_remote_code=False and an unreadable stdin still hold.
    marker = tmp_path / "custom-code-ran"
    plant_custom_code(model, marker)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    answers = io.StringIO("y\ny\n")
    monkeypatch.setattr(sys, "stdin", answers)
    with pytest.raises(ModelError, match="custom code"):
        load_llm(model, torch.device("cpu"), torch.float32, "none")
    assert answers.tell() == 0
    assert sys.stdin is answers
    assert not marker.exists()
    assert capsys.readouterr().out == ""


def test_library_stdio_refuses_reads_and_sends_prints_to_stderr(capsys: pytest.CaptureFixture[str]):
    stdin = sys.stdin
    with library_stdio():
        with pytest.raises(OSError):
            input("Do you wish to run the custom code? [y/N] ")
        print("a library notice")
    assert sys.stdin is stdin
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "a library notice" in captured.err and "Do you wish" in captured.err


def test_unclip_folder_with_a_custom_component_is_refused(model: Path, tmp_path: Path):
    folder = model / checkpoint.UNCLIP_FOLDER
    edit_json(folder / "model_index.json", image_normalizer=["my_normalizer", "MyNormalizer"])
    marker = tmp_path / "custom-code-ran"
    (folder / "image_normalizer" / "my_normalizer.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(ModelError, match="refused") as caught:
        _ = Runtime(RuntimeOptions(model=str(model), device="cpu")).unclip
    message = caught.value.message
    assert "loads image_normalizer from custom code ('my_normalizer')" in message
    assert "image_normalizer/my_normalizer.py" in message
    assert not marker.exists()
    assert list(checked_problems(model)) == ["unclip"]


def test_unclip_custom_pipeline_class_is_refused(model: Path):
    edit_json(model / checkpoint.UNCLIP_FOLDER / "model_index.json", _class_name=["pipeline", "MyPipeline"])
    [report] = checkpoint.check_components(model, [checkpoint.UNCLIP])
    assert report.custom_code and "custom pipeline" in report.problems[0]


# ---- broken components: one error, exit 3 ------------------------------------------------------------
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_seed_checkpoint_that_is_a_list_is_one_error_for_a_folder(model: Path, images: Path, writer: str):
    path = model / "seed-tokenizer-2" / "seed_quantizer.pt"
    if writer == "torch.save":
        torch.save([torch.zeros(2), 3], path)
    else:
        with open(path, "wb") as handle:
            pickle.dump([1, 2, 3], handle)
    done = run_mio("caption", str(images), "--model", str(model), *FAST)
    assert_one_error(done, str(path))
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    [problem] = (doctor_problems if writer == "torch.save" else checked_problems)(model)["seed"]
    assert "seed_quantizer.pt" in problem


def test_a_pickle_with_code_is_refused_and_never_run(model: Path, tmp_path: Path):
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    with open(model / "SpeechTokenizer" / "SpeechTokenizer.pt", "wb") as handle:
        pickle.dump({"encoder.weight": Payload()}, handle, protocol=2)
    [problem] = checked_problems(model)["speech"]
    assert "SpeechTokenizer.pt cannot be read as a plain tensor checkpoint" in problem and "weights_only" in problem
    assert not marker.exists()


def test_a_speech_checkpoint_of_other_tensors_is_named_by_doctor(model: Path):
    torch.save({"encoder.weight": torch.zeros(3)}, model / "SpeechTokenizer" / "SpeechTokenizer.pt")
    [problem] = checked_problems(model)["speech"]
    assert "SpeechTokenizer.pt does not match its config.json" in problem and "missing keys" in problem


def test_a_corrupt_tokenizer_model_is_one_model_error(model: Path, images: Path):
    path = model / "tokenizer.model"
    path.write_bytes(path.read_bytes()[:100])
    done = run_mio("caption", str(images), "--model", str(model), *FAST)
    assert_one_error(done, str(path), "not a sentencepiece model")
    [problem] = doctor_problems(model)["llm"]
    assert "tokenizer.model" in problem


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_before_any_input(model: Path, images: Path):
    edit_json(model / "config.json", vocab_size=600)
    done = run_mio("caption", str(images), "--model", str(model), "--json", *FAST)
    assert_one_error(done, "vocab_size 600")
    [problem] = doctor_problems(model)["llm"]
    assert "vocab_size 600" in problem


def test_an_llm_built_for_a_smaller_vocabulary_is_refused(model: Path):
    # Config and weights agree with each other, not with the tokenizer: media ids would index past the
    # embedding in the middle of a run.
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(model)
    llm.resize_token_embeddings(500)
    llm.save_pretrained(model)
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 500
    with pytest.raises(ModelError, match="vocab_size 500"):
        _ = Runtime(RuntimeOptions(model=str(model), device="cpu")).llm
    assert list(checked_problems(model)) == ["llm"]


def test_load_llm_checks_the_vocabulary_against_the_tokenizer(tiny_model: Path):
    vocab_size = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    with pytest.raises(ModelError, match=f"vocabulary of {vocab_size}") as caught:
        load_llm(tiny_model, torch.device("cpu"), torch.float32, "none", tokenizer_vocab=vocab_size + 1)
    assert "mio doctor" in (caught.value.hint or "")


def test_a_tokenizer_without_mio_tokens_is_a_model_error(model: Path):
    added = json.loads((model / "added_tokens.json").read_text())
    gone = added.pop("<img7>")
    (model / "added_tokens.json").write_text(json.dumps(added))
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"][str(gone)]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="lacks MIO's tokens <img7>"):
        _ = Runtime(RuntimeOptions(model=str(model))).tokenizer
    [problem] = checked_problems(model)["llm"]
    assert "<img7>" in problem


def test_a_failed_load_is_remembered_not_retried(model: Path, tiny_model: Path):
    path = model / "seed-tokenizer-2" / "seed_quantizer.pt"
    torch.save([1, 2], path)
    runtime = Runtime(RuntimeOptions(model=str(model), device="cpu"))
    with pytest.raises(ModelError) as first:
        runtime.seed_codec(ENCODER)
    # Repaired behind its back, the runtime still does not read the files again: the same error, at once.
    shutil.copy(tiny_model / "seed-tokenizer-2" / "seed_quantizer.pt", path)
    with pytest.raises(ModelError) as second:
        runtime.seed_codec(ENCODER)
    assert second.value is first.value
    # Asking for more parts than failed still fails; unload() forgets failures along with components.
    with pytest.raises(ModelError):
        runtime.seed_codec(ENCODER | DECODER)
    runtime.unload()
    assert runtime.seed_codec(ENCODER) is not None


def test_require_checks_every_component_at_once(model: Path):
    (model / "SpeechTokenizer" / "config.json").unlink()
    runtime = Runtime(RuntimeOptions(model=str(model)))
    runtime.require([checkpoint.LLM, checkpoint.SEED])
    with pytest.raises(ModelError, match="speech: SpeechTokenizer/config.json is missing") as caught:
        runtime.require([checkpoint.LLM, checkpoint.SPEECH])
    with pytest.raises(ModelError) as again:
        runtime.require([checkpoint.SPEECH, checkpoint.LLM])
    assert again.value is caught.value
    assert runtime.loaded() == []


# ---- doctor ------------------------------------------------------------------------------------------
def test_doctor_passes_the_good_tiny_checkpoint_through_the_cli(tiny_model: Path):
    done = run_mio("doctor", "--model", str(tiny_model), "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    components = json.loads(done.stdout)["checkpoint"]["components"]
    assert [(c["name"], c["ok"], c["problems"]) for c in components] == [
        ("llm", True, []), ("seed", True, []), ("speech", True, []), ("unclip", True, [])]


def test_doctor_reads_the_llm_headers_against_its_config(model: Path):
    edit_json(model / "config.json", hidden_size=128, head_dim=32)
    [problem] = checked_problems(model)["llm"]
    assert "do not fit its config.json" in problem and "model.embed_tokens.weight" in problem


def test_doctor_names_a_truncated_unclip_weights_file(model: Path):
    weights = model / checkpoint.UNCLIP_FOLDER / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    [problem] = checked_problems(model)["unclip"]
    assert problem.startswith(
        f"{checkpoint.UNCLIP_FOLDER}/vae/diffusion_pytorch_model.safetensors is truncated")
