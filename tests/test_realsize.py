"""The real-size checkpoint builder, at a few layers' size: the layout, the vocabulary and that mio loads it.

The full build (19 GB) is what benchmarks/realsize.py and benchmarks/gpu.sh use; here the same code runs with
narrow layers, keeping the real vocabulary (76,288 ids, media tokens last).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from mio_testing import one_torch_thread  # noqa: F401  (autouse fixture)
from miocli import protocol
from miocli.model import realsize
from miocli.model.devices import RuntimeOptions
from miocli.model.runtime import Runtime

SMALL = dict(realsize.LLM_SHAPE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def test_the_real_shapes_add_up_to_mio_7b():
    assert realsize.llm_parameters() == 6_161_698_816  # 6.16 B
    shapes = dict(realsize.llm_tensor_shapes())
    assert shapes["model.embed_tokens.weight"] == (76_288, 4096)
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (512, 4096)  # 4 KV heads of 128
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 11008)


def test_llm_is_written_in_shards_with_the_real_vocabulary(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(realsize, "SHARD_BYTES", 20_000_000)
    realsize.build_llm(tmp_path, shape=SMALL)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / name).is_file() for name in shards)
    assert set(index["weight_map"]) == {name for name, _ in realsize.llm_tensor_shapes(SMALL)}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 76_288 and config["torch_dtype"] == "bfloat16"
    runtime = Runtime(RuntimeOptions(model=str(tmp_path)))
    tokenizer = runtime.tokenizer
    assert tokenizer.vocab_size == 76_288
    assert tokenizer.token_to_id("<img0>") == 76_288 - realsize.MEDIA_TOKENS
    assert tokenizer.token_to_id(protocol.SPEECH_END) == 76_288 - 1
    ids = tokenizer.encode("<|startoftext|>Hello there")
    with torch.inference_mode():
        logits = runtime.llm(torch.tensor([ids])).logits
    assert logits.shape[-1] == 76_288 and torch.isfinite(logits).all()


def test_unknown_parts_are_a_usage_error(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "miocli.model.realsize", str(tmp_path / "x"), "--parts", "llm,vae"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown part(s) vae" in done.stderr
    assert not (tmp_path / "x").exists()
