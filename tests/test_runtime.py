"""Device, dtype and quantization choice, lazy loading, and 4-/8-bit loading of the tiny LLM on CPU."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from mio_testing import one_torch_thread, quantization_logits, run_mio  # noqa: F401  (one_torch_thread: autouse)
from miocli.core.api import GenerationOptions, Mio
from miocli.core.generation import GenerationOverrides
from miocli.core.pipeline import Engine
from miocli.core.prompts import Prompt
from miocli.core.tasks import TASKS
from miocli.errors import EnvironmentProblem, ModelError, UsageError
from miocli.model.devices import (
    RuntimeOptions,
    bitsandbytes_problem,
    quiet_bitsandbytes,
    resolve_device,
    resolve_dtype,
    resolve_quantize,
    validate_options,
)
from miocli.model.runtime import Runtime

CPU = torch.device("cpu")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallbacks")


# ---- option values -------------------------------------------------------------------------------
@needs_no_cuda
def test_auto_device_is_cpu_without_cuda():
    assert resolve_device("auto") == CPU
    assert resolve_device("AUTO") == CPU


def test_cpu_device():
    assert resolve_device("cpu") == CPU


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_an_environment_problem(spec: str):
    with pytest.raises(EnvironmentProblem, match="CUDA is not available") as caught:
        resolve_device(spec)
    assert "--device cpu" in (caught.value.hint or "")


@needs_no_cuda
def test_runtime_reports_missing_cuda_when_the_device_is_first_needed(tiny_model: Path):
    runtime = Runtime(RuntimeOptions(model=str(tiny_model), device="cuda"))  # accepted: a valid spelling
    with pytest.raises(EnvironmentProblem):
        _ = runtime.llm
    assert runtime.loaded() == []


def test_auto_dtype_on_cpu_is_float32():
    assert resolve_dtype("auto", CPU) == torch.float32


@pytest.mark.parametrize(("spec", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16)])
def test_explicit_dtypes(spec: str, dtype: torch.dtype):
    assert resolve_dtype(spec, CPU) == dtype


def test_auto_quantize_on_cpu_is_none():
    # Even a "model" far larger than memory: bitsandbytes' CPU path is for explicit requests only.
    assert resolve_quantize("auto", CPU, weight_bytes=10**15) == "none"
    assert resolve_quantize("none", CPU) == "none"


def test_bitsandbytes_is_usable_here():
    assert bitsandbytes_problem(CPU) is None
    assert resolve_quantize("4bit", CPU) == "4bit"
    assert resolve_quantize("8bit", CPU) == "8bit"


@pytest.mark.parametrize(
    ("options", "word"),
    [
        (RuntimeOptions(device="gpu"), "device"),
        (RuntimeOptions(device="cuda:x"), "device"),
        (RuntimeOptions(device="cuda:"), "device"),
        (RuntimeOptions(device="mps"), "device"),
        (RuntimeOptions(dtype="fp16"), "dtype"),
        (RuntimeOptions(dtype="float64"), "dtype"),
        (RuntimeOptions(quantize="2bit"), "quantize"),
        (RuntimeOptions(quantize="4-bit"), "quantize"),
        (RuntimeOptions(variant="chat"), "variant"),
    ],
)
def test_bad_option_values_are_usage_errors(options: RuntimeOptions, word: str):
    with pytest.raises(UsageError, match=word) as caught:
        validate_options(options)
    assert caught.value.hint
    # The Runtime checks at construction, before any model file is looked at.
    with pytest.raises(UsageError):
        Runtime(options)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "CPU"])
def test_good_device_spellings_pass_validation(device: str):
    validate_options(RuntimeOptions(device=device, variant="Base"))


# ---- lazy loading --------------------------------------------------------------------------------
def test_runtime_construction_touches_nothing():
    runtime = Runtime(RuntimeOptions(model="/no/such/mio/folder"))
    assert runtime.loaded() == [] and runtime.loads == []
    # The missing folder is only noticed when something needs it.
    with pytest.raises(ModelError, match="/no/such/mio/folder"):
        _ = runtime.tokenizer


def test_tokenizer_loads_without_the_llm(tiny_model: Path):
    runtime = Runtime(RuntimeOptions(model=str(tiny_model)))
    tokenizer = runtime.tokenizer
    assert tokenizer.token_to_id("<image>") > 0
    assert runtime.loaded() == ["tokenizer"]
    assert "llm" not in runtime._components
    # A second access reuses the loaded tokenizer.
    assert runtime.tokenizer is tokenizer
    assert runtime.loaded() == ["tokenizer"]


def test_variant_device_and_dtype_are_resolved_without_loading(tiny_model: Path):
    runtime = Runtime(RuntimeOptions(model=str(tiny_model), dtype="bfloat16"))
    assert runtime.variant == "instruct"
    assert runtime.device == CPU
    assert runtime.dtype == torch.bfloat16
    assert runtime.loaded() == []
    assert Runtime(RuntimeOptions(model=str(tiny_model), variant="base")).variant == "base"


def test_llm_load_is_recorded(tiny_model: Path, capsys: pytest.CaptureFixture[str]):
    runtime = Runtime(RuntimeOptions(model=str(tiny_model), verbose=True))
    _ = runtime.tokenizer
    llm = runtime.llm
    assert runtime.loaded() == ["tokenizer", "llm"]
    record = runtime.loads[-1]
    assert record.component == "llm"
    assert record.seconds > 0
    assert record.parameters == sum(p.numel() for p in llm.parameters())
    assert "quantize=none" in record.detail and "float32" in record.detail
    assert next(llm.parameters()).dtype == torch.float32
    assert not llm.training
    assert runtime.llm is llm and runtime.loaded() == ["tokenizer", "llm"]
    # --verbose reports each load on stderr, never on stdout (which carries results).
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "loaded llm" in captured.err and "loaded tokenizer" in captured.err


def test_quiet_runtime_prints_nothing(tiny_model: Path, capsys: pytest.CaptureFixture[str]):
    runtime = Runtime(RuntimeOptions(model=str(tiny_model)))
    _ = runtime.tokenizer
    assert capsys.readouterr().err == ""


def test_explicit_dtype_reaches_the_llm(tiny_model: Path):
    runtime = Runtime(RuntimeOptions(model=str(tiny_model), dtype="bfloat16"))
    assert next(runtime.llm.parameters()).dtype == torch.bfloat16


def test_llm_load_of_an_incomplete_folder_names_the_missing_file(tiny_model: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json"):
        shutil.copy(tiny_model / name, broken / name)
    runtime = Runtime(RuntimeOptions(model=str(broken)))
    with pytest.raises(ModelError, match="no LLM weights"):
        _ = runtime.llm
    assert runtime.loaded() == []


def test_truncated_weights_are_a_model_error_before_loading(tiny_model: Path, tmp_path: Path):
    # A half-downloaded file is non-empty; its safetensors header still shows it is cut short, so
    # the folder check names it (a clear message and exit code 3) before transformers reads it.
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_model, broken, ignore=shutil.ignore_patterns("seed-*", "SpeechTokenizer", "stable-*"))
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    runtime = Runtime(RuntimeOptions(model=str(broken)))
    with pytest.raises(ModelError, match="model.safetensors is truncated") as caught:
        _ = runtime.llm
    assert "mio download" in str(caught.value)
    assert runtime.loaded() == []


def test_weights_that_fail_to_load_are_still_a_model_error(tiny_model: Path, tmp_path: Path):
    # A whole-looking file whose tensors do not fit the config passes the header check; the load
    # itself must still end in a ModelError, not a traceback.
    from safetensors.torch import save_file

    broken = tmp_path / "mismatched"
    shutil.copytree(tiny_model, broken, ignore=shutil.ignore_patterns("seed-*", "SpeechTokenizer", "stable-*"))
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(broken / "model.safetensors"))
    with pytest.raises(ModelError, match="do not fit its config.json") as caught:
        _ = Runtime(RuntimeOptions(model=str(broken))).llm
    # The headers say exactly what is wrong, instead of the library's "look at the above report".
    message = caught.value.message
    config = json.loads((broken / "config.json").read_text())
    expected = (config["vocab_size"], config["hidden_size"])
    assert f"model.embed_tokens.weight is (3, 3) in model.safetensors, config.json implies {expected}" in message
    assert "missing tensors: model.layers.0." in message
    assert "mio doctor" in (caught.value.hint or "")


# ---- 4-bit and 8-bit on CPU ----------------------------------------------------------------------
# On the CPU mio quantizes with its own layers (tests/test_quantize.py); bitsandbytes is the CUDA path.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantizes on CUDA devices only")
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_llm_has_bitsandbytes_layers(tiny_model: Path, reference_logits: torch.Tensor, mode: str):
    import bitsandbytes as bnb

    runtime = Runtime(RuntimeOptions(model=str(tiny_model), quantize=mode, device="cuda"))
    llm = runtime.llm
    layer_type = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    decoder_linears = [m for name, m in llm.named_modules() if name.startswith("model.layers.")
                       and isinstance(m, torch.nn.Linear)]
    # 2 layers × (q, k, v, o, gate, up, down)
    assert len(decoder_linears) == 14
    assert all(isinstance(m, layer_type) for m in decoder_linears)
    proj = llm.model.layers[0].mlp.up_proj
    if mode == "4bit":
        # nf4 packs two weights per byte.
        assert proj.weight.dtype == torch.uint8
        assert proj.weight.numel() * 2 == proj.in_features * proj.out_features
    else:
        assert proj.weight.dtype == torch.int8
        assert proj.weight.shape == (proj.out_features, proj.in_features)
    # transformers keeps the output head unquantized: its precision matters most.
    assert not isinstance(llm.lm_head, layer_type)
    assert f"quantize={mode}" in runtime.loads[-1].detail
    # On CPU the unquantized parts and the compute dtype are bfloat16, and the load report says so.
    assert llm.lm_head.weight.dtype == torch.bfloat16
    assert "bfloat16" in runtime.loads[-1].detail and "float32" not in runtime.loads[-1].detail
    assert llm.get_memory_footprint() < reference_footprint(tiny_model)
    # Quantized weights must still compute (nearly) the same function.
    logits = quantization_logits(runtime)
    assert torch.isfinite(logits).all()
    similarity = torch.nn.functional.cosine_similarity(logits.flatten(), reference_logits.flatten(), dim=0)
    assert similarity > 0.95


def reference_footprint(tiny_model: Path) -> int:
    return Runtime(RuntimeOptions(model=str(tiny_model), quantize="none")).llm.get_memory_footprint()


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_llm_generates_through_the_engine(tiny_model: Path, mode: str, caplog: pytest.LogCaptureFixture):
    runtime = Runtime(RuntimeOptions(model=str(tiny_model), quantize=mode))
    prompt = Prompt("<|startoftext|><|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    with caplog.at_level(logging.WARNING):
        [result] = Engine(runtime).run(TASKS["chat"], [prompt],
                                       overrides=GenerationOverrides(max_new_tokens=6, num_beams=2), seed=0)
    assert 0 < len(result.token_ids) <= 6
    assert result.raw_text == runtime.tokenizer.decode(result.token_ids)
    # bitsandbytes' int8 path logs a cast notice on every matmul: mio drops exactly that one.
    assert "MatMul8bitLt" not in caplog.text


def test_8bit_on_cpu_through_the_cli_keeps_stderr_clean(tiny_model: Path):
    done = run_mio("chat", "What is the capital of France?", "--model", str(tiny_model), "--quantize", "8bit",
                   "--device", "cpu", "--max-new-tokens", "4", "--beams", "1", "--verbose")
    assert done.returncode == 0, done.stderr
    assert "MatMul8bitLt" not in done.stderr
    assert "kernels-community" not in done.stderr
    # --verbose reports the dtype the quantized model computes in, not the float32 CPU default.
    assert "loaded llm (cpu, bfloat16, quantize=8bit)" in done.stderr


def test_only_the_known_bitsandbytes_noise_is_silenced(caplog: pytest.LogCaptureFixture):
    import warnings

    quiet_bitsandbytes()
    quiet_bitsandbytes()  # idempotent: one filter per logger
    functions = logging.getLogger("bitsandbytes.autograd._functions")
    assert len(functions.filters) == 1
    with caplog.at_level(logging.WARNING):
        functions.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        functions.warning("something else went wrong")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another CPU backend message")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong", "another CPU backend message"]
    # Releases that warn through `warnings` instead: that message is dropped, others are not.
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16", UserWarning, stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]


def test_quantized_llm_generates_through_the_api(tiny_model: Path):
    mio = Mio(model=str(tiny_model), quantize="4bit")
    replies = mio.generate(["The quick brown fox", "In the morning the market"],
                           GenerationOptions(max_new_tokens=5, beams=1, batch_size=2, seed=0))
    assert len(replies) == 2
    for reply in replies:
        assert 0 < len(reply.token_ids) <= 5
    assert mio.runtime.loaded() == ["tokenizer", "llm"]
    assert "quantize=4bit" in mio.runtime.loads[-1].detail
