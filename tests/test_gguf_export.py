"""`mio export-gguf` and `miocli.model.gguf_export`: what the GGUF file holds, read back with the gguf package.

Needs only `gguf` (in the test extra); loading the file into llama.cpp is tests/test_llamacpp.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mio_testing import one_torch_thread, run_mio  # noqa: F401  (autouse)
from miocli import protocol
from miocli.errors import UsageError
from miocli.model import gguf_export
from miocli.model.tokenizer import MioTokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exports(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {t: gguf_export.export_gguf(tiny_model, folder / f"tiny-{t}.gguf", t) for t in gguf_export.GGUF_TYPES}


@pytest.fixture(scope="module")
def weights(tiny_model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model / "model.safetensors"))


def _tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _field(reader, key: str):
    return reader.fields[key].contents()


def _values(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in the safetensors (rows, columns) layout."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])


def test_llama_tensor_names_and_types(exports: dict[str, Path], tiny_model: Path):
    config = json.loads((tiny_model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(layers) for name in per_layer}
    if not config.get("tie_word_embeddings"):
        expected.add("output.weight")
    types = gguf.GGMLQuantizationType
    for kind, path in exports.items():
        tensors = _tensors(path)
        assert set(tensors) == expected, kind
        assert tensors["blk.0.attn_norm.weight"].tensor_type == types.F32
        matrix = {"f32": types.F32, "f16": types.F16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[kind]
        assert tensors["blk.1.ffn_down.weight"].tensor_type == matrix, kind
        assert tensors["token_embd.weight"].tensor_type == matrix, kind
    # llama-quantize keeps the output head finer than Q4_0 (Q6_K); the gguf package writes Q8_0 there.
    assert _tensors(exports["q4_0"])["output.weight"].tensor_type == types.Q8_0


def test_weights_round_trip_and_q_k_rows_follow_llama_cpp_rope(exports: dict[str, Path], weights, tiny_model: Path):
    config = json.loads((tiny_model / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    tensors = _tensors(exports["f32"])
    assert np.array_equal(_values(tensors["token_embd.weight"]), weights["model.embed_tokens.weight"].float().numpy())
    assert np.array_equal(_values(tensors["blk.1.ffn_down.weight"]),
                          weights["model.layers.1.mlp.down_proj.weight"].float().numpy())
    # HF rotates halves (row j pairs with j + head_dim/2); llama.cpp rotates neighbours (2i with 2i+1).
    order = [h * head_dim + r for h in range(kv_heads) for i in range(head_dim // 2) for r in (i, i + head_dim // 2)]
    key = weights["model.layers.0.self_attn.k_proj.weight"].float().numpy()
    assert np.array_equal(_values(tensors["blk.0.attn_k.weight"]), key[order])
    order = [h * head_dim + r for h in range(heads) for i in range(head_dim // 2) for r in (i, i + head_dim // 2)]
    query = weights["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    assert np.array_equal(_values(tensors["blk.0.attn_q.weight"]), query[order])


@pytest.mark.parametrize(("kind", "tolerance"), [("f16", 1e-3), ("q8_0", 0.01), ("q4_0", 0.1)])
def test_quantized_weights_stay_close(exports: dict[str, Path], weights, kind: str, tolerance: float):
    original = weights["model.layers.1.mlp.up_proj.weight"].float().numpy()
    stored = _values(_tensors(exports[kind])["blk.1.ffn_up.weight"])
    assert np.abs(stored - original).max() <= tolerance * np.abs(original).max()
    assert not np.array_equal(stored, original) or kind == "f16"


def test_metadata_tokenizer_and_chat_template(exports: dict[str, Path], tiny_model: Path):
    import jinja2

    config = json.loads((tiny_model / "config.json").read_text())
    tokenizer = MioTokenizer.from_dir(tiny_model)
    reader = gguf.GGUFReader(str(exports["q8_0"]))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert _field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.get("rope_theta")
                                                                   or config["rope_parameters"]["rope_theta"])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == config["vocab_size"] == len(types)
    for text in ("<img0>", "<img8191>", "<spch4095>", protocol.IMAGE_BEGIN, protocol.SPEECH_END):
        token_id = tokenizer.token_to_id(text)
        assert tokens[token_id] == text and types[token_id] == gguf_export.USER_DEFINED
    im_end = tokenizer.token_to_id(protocol.IM_END)
    assert tokens[im_end] == protocol.IM_END and types[im_end] == gguf_export.CONTROL
    assert _field(reader, "tokenizer.ggml.eot_token_id") == im_end
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.token_to_id(protocol.BOS)
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    template = jinja2.Environment().from_string(_field(reader, "tokenizer.chat_template"))
    talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What's new?"}]
    for messages, mode in ((talk, "std"), ([{"role": "system", "content": "Be 'brief'."}, *talk], "custom")):
        for generation in (True, False):
            expected = protocol.apply_chat_template([messages], mode, add_generation_prompt=generation,
                                                    add_bos=False)[0]
            assert template.render(messages=messages, add_generation_prompt=generation) == expected


def test_an_existing_file_is_kept_without_force(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(UsageError, match="--force"):
        gguf_export.export_gguf(tiny_model, out, "f16")
    assert out.read_bytes() == b"mine"
    gguf_export.export_gguf(tiny_model, out, "f16", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left


def test_the_engine_exports_once_into_the_cache(tiny_model: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIO_GGUF", raising=False)
    first = gguf_export.cached_gguf(tiny_model, "q8_0")
    assert first.parent == tmp_path / "cache" / "quantized" and first.name.endswith("-q8_0.gguf")
    stamp = first.stat().st_mtime_ns
    assert gguf_export.cached_gguf(tiny_model, "q8_0") == first and first.stat().st_mtime_ns == stamp
    assert gguf_export.cached_gguf(tiny_model, "f16") != first
    monkeypatch.setenv("MIO_GGUF", str(tmp_path / "absent.gguf"))
    with pytest.raises(UsageError, match="MIO_GGUF"):
        gguf_export.cached_gguf(tiny_model, "q8_0")


def test_cli_export_gguf(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "tiny.gguf"
    done = run_mio("export-gguf", str(tiny_model), str(out), "--type", "q8_0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and out.read_bytes()[:4] == b"GGUF"
    again = run_mio("export-gguf", str(tiny_model), str(out))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith(f"mio: error: {out} exists") and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    bad = run_mio("export-gguf", str(tiny_model), str(tmp_path / "x.gguf"), "--type", "q3")
    assert bad.returncode == 2 and "q4_0, q8_0, f16, f32" in bad.stderr


def test_export_help_stays_light():
    import subprocess
    import sys

    code = ("import sys\nfrom miocli.cli.app import main\ntry:\n    main(['export-gguf', '--help'])\n"
            "except SystemExit:\n    pass\nprint('HEAVY:', [m for m in ('torch', 'transformers', 'gguf', 'numpy') "
            "if m in sys.modules], file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY: []" in done.stderr and "--type q4_0|q8_0|f16|f32" in done.stdout
