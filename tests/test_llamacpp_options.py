"""`--engine llamacpp`'s choices and refusals, checked without llama.cpp (default suite).

Generation on llama.cpp itself is tests/test_llamacpp.py (`-m llamacpp`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mio_testing import run_mio
from miocli.core.generation import PRESETS
from miocli.core.pipeline import Engine
from miocli.engines import llamacpp
from miocli.errors import EnvironmentProblem, UsageError
from miocli.model.devices import RuntimeOptions
from miocli.model.runtime import Runtime


@pytest.mark.parametrize(("quantize", "dtype", "expected"), [
    ("4bit", "bfloat16", "q4_0"), ("8bit", "float32", "q8_0"), ("none", "float32", "f32"),
    ("none", "bfloat16", "f16"), ("none", "float16", "f16"),
])
def test_gguf_type_follows_quantize_then_dtype(quantize: str, dtype: str, expected: str):
    assert llamacpp.gguf_type_for(quantize, dtype) == expected


def test_a_preset_s_beams_become_one_beam_with_a_note():
    settings, note = llamacpp.llamacpp_settings(PRESETS["text"], asked_beams=None)
    assert settings.num_beams == 1 and settings.repetition_penalty == PRESETS["text"].repetition_penalty
    assert "no beam search" in note and "--engine transformers" in note
    assert llamacpp.llamacpp_settings(PRESETS["tts"], asked_beams=None) == (PRESETS["tts"], None)


def test_beams_asked_for_are_refused_with_the_way_out():
    with pytest.raises(UsageError, match="no beam search") as raised:
        llamacpp.llamacpp_settings(PRESETS["text"], asked_beams=3)
    assert "--beams 1" in raised.value.hint and "--engine transformers" in raised.value.hint


def test_engine_url_with_llamacpp_is_a_usage_error(tiny_model: Path):
    with pytest.raises(UsageError, match="--engine-url"):
        Engine(Runtime(RuntimeOptions(model=str(tiny_model), engine="llamacpp", engine_url="http://127.0.0.1:9")))


def test_missing_llama_cpp_is_an_environment_problem_before_anything_loads(tiny_model: Path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(EnvironmentProblem, match="llama-cpp-python is not installed") as raised:
        Engine(Runtime(RuntimeOptions(model=str(tiny_model), engine="llamacpp")))
    assert "miocli[llamacpp]" in raised.value.hint


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed here")
def test_cli_without_llama_cpp_exits_3(tiny_model: Path):
    run = run_mio("chat", "--model", str(tiny_model), "--engine", "llamacpp", "hi")
    assert run.returncode == 3 and "miocli[llamacpp]" in run.stderr


def test_doctor_says_whether_llama_cpp_is_here(tiny_model: Path):
    from miocli.cli import doctor

    entry = doctor.collect(str(tiny_model), None, "cpu")["engines"]["llamacpp"]
    assert entry["usable"] is (llamacpp.llamacpp_problem() is None)
    assert (entry["problem"] is None) is entry["usable"]


def test_the_engine_picks_its_gguf_type(tiny_model: Path, tmp_path: Path):
    import json

    def picked(model: Path, **options: str) -> str:
        return llamacpp.LlamaCpp(Runtime(RuntimeOptions(model=str(model), device="cpu", **options))).gguf_type()

    assert picked(tiny_model) == "f32"  # small: exact
    assert picked(tiny_model, quantize="4bit") == "q4_0"
    assert picked(tiny_model, dtype="bfloat16") == "f16"
    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=76288)
    (big / "config.json").write_text(json.dumps(config))
    assert picked(big) == "f16"
    assert picked(big, dtype="float32") == "f32"
    assert picked(big, quantize="8bit") == "q8_0"
