"""Memory estimates, the check before each load, and the release of what a step no longer needs.

The decisions are arithmetic over figures, tested here with made-up ones; the Runtime tests run the tiny
checkpoint under a `MIO_MEMORY_LIMIT` chosen from the same estimates, so the outcome is exact whatever the
machine has free.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mio_testing import one_torch_thread, run_mio  # noqa: F401  (autouse fixture)
from miocli.core.api import Mio
from miocli.errors import EnvironmentProblem
from miocli.model import memory, realsize
from miocli.model.devices import RuntimeOptions, cpu_auto_dtype
from miocli.model.runtime import Runtime

GB = memory.GB
REAL = memory.llm_size(realsize.llm_config_dict())


def test_sizes_parse():
    assert memory.parse_size("12G") == 12 * GB
    assert memory.parse_size("800M") == 800_000_000
    assert memory.parse_size("1.5GB") == 1_500_000_000
    assert memory.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="MIO_MEMORY_LIMIT"):
        memory.parse_size("lots")


def test_a_bad_limit_is_a_usage_error(tiny_model: Path):
    done = run_mio("chat", "hi", "--model", str(tiny_model), env={memory.LIMIT_ENV: "lots"})
    assert done.returncode == 2 and "MIO_MEMORY_LIMIT='lots' is not a size" in done.stderr
    assert "Traceback" not in done.stderr


def test_real_size_llm_estimates():
    # The same count as the real-size builder's tensors: 6.16 B parameters.
    assert REAL.parameters == realsize.llm_parameters()
    assert 6.15e9 < REAL.parameters < 6.17e9
    fp32, bf16 = memory.llm_bytes(REAL, "float32", "none"), memory.llm_bytes(REAL, "bfloat16", "none")
    q8, q4 = memory.llm_bytes(REAL, "bfloat16", "8bit"), memory.llm_bytes(REAL, "bfloat16", "4bit")
    # measured on this machine kind: float32 was killed at 23.5 GB, bf16 peaked at 11.9 GB
    assert fp32 > 23.5 * GB and 11.9 * GB < bf16 < 14 * GB
    assert bf16 > q8 > q4 and q8 < 9 * GB and q4 < 6 * GB


def test_caption_releases_seed_when_memory_is_tight():
    # SEED encoder (5 GB) loaded, LLM (13 GB) next, 16 GB free on a 24 GB machine: the one-shot command
    # releases SEED first, so its peak is the LLM alone.
    held = {"seed": 5 * GB}
    reserve = memory.reserve_for(24 * GB, long_lived=False)
    assert memory.to_release(13 * GB, 16 * GB, held, (), reserve) == ["seed"]
    # with room to spare, or in a server that keeps what fits, nothing is released
    assert memory.to_release(13 * GB, 40 * GB, held, (), reserve) == []
    assert memory.to_release(13 * GB, 16 * GB, held, (), memory.reserve_for(24 * GB, long_lived=True)) == []


def test_what_a_step_uses_is_never_released():
    # an interleaved story decodes its images while the LLM still writes it
    held = {"llm": 13 * GB, "seed": 1 * GB}
    assert memory.to_release(7 * GB, 5 * GB, held, {"llm"}, 0) == ["seed"]
    assert memory.to_release(7 * GB, 5 * GB, held, {"llm", "seed"}, 0) == []


def test_release_goes_largest_first_and_stops_when_it_fits():
    held = {"speech": 1 * GB, "unclip": 7 * GB, "seed": 5 * GB}
    assert memory.to_release(13 * GB, 10 * GB, held, (), 0) == ["unclip"]
    assert memory.to_release(13 * GB, GB // 2, held, (), 0) == ["unclip", "seed", "speech"]


def test_refusal_names_estimate_free_and_what_fits(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    budget = memory.Budget(free=16 * GB, total=24 * GB, where="RAM")
    need = memory.llm_bytes(REAL, "float32", "none")
    message, hint = memory.refusal("the LLM (6.16 B parameters, float32, cpu)", need, budget,
                                   memory.llm_choices(REAL, "cpu"))
    assert message.startswith("the LLM (6.16 B parameters, float32, cpu) needs about 2")
    assert "16.0 GB of RAM is free" in message
    assert hint.startswith("options that fit: --dtype bfloat16 (about 1")
    assert "--quantize 8bit" in hint and "--quantize 4bit" in hint and "float32" not in hint
    small = memory.Budget(free=5 * GB, total=8 * GB, where="cuda:0 VRAM")
    _, hint = memory.refusal("x", need, small, memory.llm_choices(REAL, "cuda"))
    assert hint.startswith("options that fit: --quantize 4bit") and "8bit" not in hint
    _, hint = memory.refusal("x", need, memory.Budget(1 * GB, 8 * GB, "RAM"), memory.llm_choices(REAL, "cpu"))
    assert hint.startswith("nothing fits")


def test_cpu_auto_dtype_follows_model_size_cpu_and_memory(monkeypatch: pytest.MonkeyPatch):
    tiny = memory.llm_size({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 128, "vocab_size": 13000})
    assert cpu_auto_dtype(tiny, 100 * GB) == torch.float32  # small: exact and cheap
    assert cpu_auto_dtype(None, None) == torch.float32
    monkeypatch.setattr("miocli.model.devices.cpu_has_bf16", lambda: True)
    assert cpu_auto_dtype(REAL, 100 * GB) == torch.bfloat16
    monkeypatch.setattr("miocli.model.devices.cpu_has_bf16", lambda: False)
    assert cpu_auto_dtype(REAL, 100 * GB) == torch.float32  # room for float32 and no native bf16
    assert cpu_auto_dtype(REAL, 16 * GB) == torch.bfloat16  # float32 would not fit, bf16 does


# ---- the Runtime on the tiny checkpoint ------------------------------------------------------------
def tiny_llm_bytes(tiny_model: Path, dtype: str) -> int:
    size = memory.llm_size(json.loads((tiny_model / "config.json").read_text()))
    return memory.llm_bytes(size, dtype, "none")


def test_an_llm_that_does_not_fit_is_refused_with_what_fits(tiny_model: Path):
    fp32, bf16 = tiny_llm_bytes(tiny_model, "float32"), tiny_llm_bytes(tiny_model, "bfloat16")
    limit = (fp32 + bf16) // 2
    done = run_mio("chat", "hi", "--model", str(tiny_model), "--dtype", "float32", "--max-new-tokens", "2",
                   env={memory.LIMIT_ENV: str(limit)})
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("mio: error: the LLM (") and "float32, cpu) needs about" in lines[0]
    assert f"{memory.format_bytes(limit)} of RAM is free" in lines[0]
    assert "options that fit: --dtype bfloat16" in lines[1] and "--quantize 4bit" in lines[1]
    assert "Traceback" not in done.stderr
    # auto picks what fits
    done = run_mio("chat", "hi", "--model", str(tiny_model), "--max-new-tokens", "2", "--beams", "1",
                   env={memory.LIMIT_ENV: str(limit)})
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pictures") / "kite.png"
    Image.new("RGB", (96, 64), (40, 120, 40)).save(path)
    return path


def caption_limit(tiny_model: Path) -> int:
    """Exactly the SEED encoder plus the LLM: both fit, but not with a one-shot command's reserve."""
    runtime = Runtime(RuntimeOptions(model=str(tiny_model)))
    seed = runtime._codec_bytes("seed", frozenset({"encoder"}))
    return seed + tiny_llm_bytes(tiny_model, "float32")


def test_caption_releases_the_seed_encoder_before_the_llm_loads(tiny_model: Path, picture: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv(memory.LIMIT_ENV, str(caption_limit(tiny_model)))
    mio = Mio(str(tiny_model), device="cpu", verbose=True)
    [result] = mio.stream("caption", [picture], beams=1, max_new_tokens=4)
    assert result.ok, result.error
    assert mio.runtime.released == ["seed"]
    assert mio.runtime.loaded() == ["tokenizer", "llm"]
    log = capsys.readouterr().err
    order = [log.index(line) for line in ("mio: loaded seed", "mio: released seed to make room for llm",
                                          "mio: loaded llm")]
    assert order == sorted(order), log


def test_a_job_of_many_batches_releases_once_and_never_reloads_each_batch(tiny_model: Path, picture: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(memory.LIMIT_ENV, str(caption_limit(tiny_model)))
    mio = Mio(str(tiny_model), device="cpu")
    results = list(mio.stream("caption", [picture] * 4, beams=1, max_new_tokens=4, batch_size=1))
    assert all(r.ok for r in results)
    # The encoder made room for the LLM once; when it came back both fit, and both stayed.
    assert mio.runtime.released == ["seed"]
    assert set(mio.runtime.loaded()) == {"tokenizer", "seed", "llm"}


def test_caption_keeps_both_when_there_is_room_or_when_long_lived(tiny_model: Path, picture: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(memory.LIMIT_ENV, str(caption_limit(tiny_model) * 10))
    mio = Mio(str(tiny_model), device="cpu")
    list(mio.stream("caption", [picture], beams=1, max_new_tokens=4))
    assert mio.runtime.released == [] and set(mio.runtime.loaded()) == {"tokenizer", "seed", "llm"}
    # a server keeps what fits, even when it fits only just
    monkeypatch.setenv(memory.LIMIT_ENV, str(caption_limit(tiny_model)))
    served = Mio(str(tiny_model), device="cpu")
    served.runtime.long_lived = True
    list(served.stream("caption", [picture], beams=1, max_new_tokens=4))
    assert served.runtime.released == [] and set(served.runtime.loaded()) == {"tokenizer", "seed", "llm"}


def test_a_codec_that_cannot_fit_is_refused(tiny_model: Path, picture: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "1000")
    mio = Mio(str(tiny_model), device="cpu")
    with pytest.raises(EnvironmentProblem, match=r"the SEED image tokenizer \(encoder, cpu\) needs about") as caught:
        list(mio.stream("caption", [picture], beams=1, max_new_tokens=4))
    assert caught.value.exit_code == 3
    assert "nothing fits" in (caught.value.hint or "") and memory.LIMIT_ENV in (caught.value.hint or "")
