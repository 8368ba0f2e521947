"""--quantize 8bit / 4bit on the CPU: mio's weight-only layers, loaded tensor by tensor (miocli.model.quantize).

Correctness on the tiny checkpoint: the layers compute what their dequantized weights compute, the model
stays close to the unquantized one, it holds less memory, and `mio chat --quantize 4bit` answers without
bitsandbytes (which the CPU path does not use).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mio_testing import one_torch_thread, quantization_logits, run_mio  # noqa: F401  (autouse fixture)
from miocli.model import cpu_kernel, quantize
from miocli.model.devices import RuntimeOptions
from miocli.model.quantize import Int4Linear, Int8Linear, int4_group_size, read_ahead, read_tensors
from miocli.model.runtime import Runtime


def dequantize_int4(layer: Int4Linear, levels: torch.Tensor) -> torch.Tensor:
    scale, zero = layer.scales_and_zeros.float().unbind(-1)  # (groups, out)
    groups = levels.reshape(layer.out_features, -1, layer.group_size).float()
    return ((groups - 8) * scale.T[:, :, None] + zero.T[:, :, None]).reshape(layer.out_features, -1)


def test_int8_layer_computes_its_dequantized_weight():
    torch.manual_seed(0)
    weight = torch.randn(96, 256) * 0.02
    layer = Int8Linear(256, 96, bias=False)
    layer.set_weight(weight)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (96, 256)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    expected = x.float() @ layer.dequantized().T
    assert torch.allclose(layer(x).float(), expected, rtol=0.02, atol=0.02)
    # and stays close to the original weight: one step of 1/127 of each row's largest value
    assert (layer.dequantized() - weight).abs().max() <= weight.abs().amax(1).max() / 127


def test_int4_layer_packs_two_weights_a_byte_and_computes_its_dequantized_weight():
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    layer = Int4Linear(256, 64, bias=True, group_size=128, own_kernel=False)
    layer.bias = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16), requires_grad=False)
    layer.set_weight(weight)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == 64 * 256
    groups = weight.to(torch.bfloat16).float().reshape(64, 2, 128)
    low = groups.amin(-1, keepdim=True)
    scale = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-8)
    levels = ((groups - low) / scale).round().clamp(0, 15).reshape(64, 256)
    dequantized = dequantize_int4(layer, levels)
    assert (dequantized - weight).abs().max() <= scale.max() * 0.51 + 1e-3
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    expected = x.float() @ dequantized.T + layer.bias.float()
    assert torch.allclose(layer(x).float(), expected, rtol=0.02, atol=0.02)


def _rows_one_by_one(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([layer(row[None]) for row in x])  # one row: always the weight-only kernel


def test_int4_long_inputs_go_through_the_dequantized_weight_and_give_the_kernels_answer():
    torch.manual_seed(0)
    weight = torch.randn(192, 256) * 0.02  # 3 blocks of 64 output rows, 2 groups of 128 inputs
    layer = Int4Linear(256, 192, bias=True, group_size=128, own_kernel=False)
    layer.bias = torch.nn.Parameter(torch.randn(192, dtype=torch.bfloat16), requires_grad=False)
    layer.set_weight(weight)
    # the unpacking reads torch's packed layout: it must give the kernel's weight, element by element
    eye = torch.eye(256, dtype=torch.bfloat16)
    kernel_weight_t = torch._weight_int4pack_mm_for_cpu(eye, layer.weight, 128, layer.scales_and_zeros).float()
    dense = layer.dense_transposed()
    assert dense is not None and dense.shape == (256, 192)
    # within bf16 rounding of each weight (a misread layout is off by the weights' own size)
    assert (dense.float() - kernel_weight_t).abs().max() <= kernel_weight_t.abs().max() / 64
    x = torch.randn(quantize.INT4_DENSE_FROM_ROWS + 8, 256, dtype=torch.bfloat16)
    long = layer(x).float()
    assert torch.allclose(long, _rows_one_by_one(layer, x).float(), rtol=0.02, atol=0.02)
    # a layer whose outputs are not whole blocks of 64 keeps the kernel for every input
    odd = Int4Linear(256, 80, bias=False, group_size=128, own_kernel=False)
    odd.set_weight(torch.randn(80, 256) * 0.02)
    assert odd.dense_transposed() is None
    assert odd(x).shape == (x.shape[0], 80)


needs_own_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"mio's CPU kernel: {cpu_kernel.why_not()}")


def _levels(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = weight.to(torch.bfloat16).float().reshape(weight.shape[0], -1, group)
    low = groups.amin(-1, keepdim=True)
    scale = ((groups.amax(-1, keepdim=True) - low) / 15).clamp(min=1e-8)
    return ((groups - low) / scale).round().clamp(0, 15), scale, low


@needs_own_kernel
@pytest.mark.parametrize(("group", "inputs"), [(128, 512), (128, 128 * 19), (64, 320), (32, 96)])
def test_own_int4_kernel_computes_its_dequantized_weight_for_any_rows(group: int, inputs: int):
    torch.manual_seed(0)
    weight = torch.randn(48, inputs) * 0.02
    layer = Int4Linear(inputs, 48, bias=True, group_size=group, own_kernel=True)
    layer.bias = torch.nn.Parameter(torch.randn(48, dtype=torch.bfloat16), requires_grad=False)
    layer.set_weight(weight)
    assert layer.weight.shape == (48, inputs // 2) and layer.scales.shape == (48, inputs // group)
    # byte j of a group holds input j (low four bits) and input j + group / 2 (high four)
    levels, scale, low = _levels(weight, group)
    half = group // 2
    packed = layer.weight.view(48, -1, half)
    assert torch.equal(packed & 15, levels[..., :half].to(torch.uint8))
    assert torch.equal(packed >> 4, levels[..., half:].to(torch.uint8))
    expected_weight = (levels * layer.scales.float()[..., None] + layer.mins.float()[..., None]).reshape(48, -1)
    assert (layer.dequantized().float() - expected_weight).abs().max() <= expected_weight.abs().max() / 128
    assert (expected_weight - weight).abs().max() <= scale.max() * 0.51 + 1e-3
    # 1 row, a pass of 8 and a part of one, and the dense path from OWN_INT4_DENSE_FROM_ROWS rows
    for rows in (1, 3, 8, 11, quantize.OWN_INT4_DENSE_FROM_ROWS + 2):
        x = torch.randn(rows, inputs, dtype=torch.bfloat16)
        expected = x.float() @ expected_weight.T + layer.bias.float()
        error = (layer(x).float() - expected).norm() / expected.norm()
        assert error < 0.02, (rows, error)  # int8 activations: measured 0.6 %; a misread layout is ~100 %


def test_int8_long_inputs_go_through_the_dequantized_weight_and_give_the_kernels_answer():
    torch.manual_seed(0)
    layer = Int8Linear(256, 96, bias=False, dense_from_rows=quantize.INT8_DENSE_FROM_ROWS)
    layer.set_weight(torch.randn(96, 256) * 0.02)
    x = torch.randn(2, quantize.INT8_DENSE_FROM_ROWS, 256, dtype=torch.bfloat16)
    assert torch.allclose(layer(x).float(), x.float() @ layer.dequantized().T,
                          rtol=0.02, atol=0.02)
    assert torch.allclose(layer(x).reshape(-1, 96).float(), _rows_one_by_one(layer, x.reshape(-1, 256)).float(),
                          rtol=0.02, atol=0.02)


def test_the_dense_scratch_is_one_buffer_grown_to_the_largest_layer():
    first = quantize.dense_buffer(64, 128)
    smaller = quantize.dense_buffer(32, 16)
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (32, 16)


def test_weights_are_read_ahead_in_order_and_a_bad_file_is_raised(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, str(tmp_path / "1.safetensors"))
    save_file({"c": torch.full((4,), 2.0)}, str(tmp_path / "2.safetensors"))
    files = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    read = [(name, t.tolist()) for name, t in read_ahead(files, skip=lambda name: name == "b")]
    assert read == [("a", [1.0] * 3), ("c", [2.0] * 4)]
    (tmp_path / "3.safetensors").write_bytes((100).to_bytes(8, "little") + b"{")
    with pytest.raises(ValueError):  # its header is cut short
        list(read_ahead([*files, tmp_path / "3.safetensors"], skip=lambda name: False))
    # a caller that stops early leaves no reader waiting
    reader = read_ahead(files, skip=lambda name: False)
    next(reader)
    reader.close()


def test_int4_packing_is_torchs_for_whole_blocks_and_other_sizes():
    generator = torch.Generator().manual_seed(1)
    for rows in (192, 80):  # three blocks of 64; a size that only torch's conversion packs
        levels = torch.randint(0, 16, (rows, 256), dtype=torch.uint8, generator=generator)
        assert torch.equal(quantize.pack_int4(levels), torch._convert_weight_to_int4pack_for_cpu(levels.int(), 8))
    assert quantize.torch_packs_int4_in_blocks()


def test_int4_group_size_fits_the_layer():
    assert int4_group_size(4096, 11008) == 128
    assert int4_group_size(64, 32) == 64
    assert int4_group_size(48, 32) is None  # no kernel group divides 48: the layer stays bf16
    assert int4_group_size(128, 12) is None
    assert int4_group_size(128, 72) is None  # torch packs int4 rows in sixteens


def test_tensors_are_read_without_mapping_the_file(tmp_path: Path):
    from safetensors.torch import save_file

    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    read = dict(read_tensors(tmp_path / "w.safetensors"))
    assert read.keys() == tensors.keys()
    assert all(torch.equal(read[k], tensors[k]) and read[k].dtype == tensors[k].dtype for k in tensors)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MIO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("mode", ["4bit", "4bit-torch-kernel", "8bit"])
def test_quantized_llm_on_cpu(tiny_model: Path, reference_logits: torch.Tensor, mode: str,
                              monkeypatch: pytest.MonkeyPatch):
    if mode == "4bit-torch-kernel":  # where mio's kernel cannot be built
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
        mode = "4bit"
    runtime = Runtime(RuntimeOptions(model=str(tiny_model), quantize=mode))
    llm = runtime.llm
    layer_type = Int4Linear if mode == "4bit" else Int8Linear
    decoder = [m for name, m in llm.named_modules() if name.startswith("model.layers.")
               and isinstance(m, torch.nn.Linear | Int4Linear | Int8Linear)]
    assert len(decoder) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    assert all(isinstance(m, layer_type) for m in decoder)
    assert all(m.own_kernel == cpu_kernel.available() for m in decoder if isinstance(m, Int4Linear))
    # the output head is int8 (the embeddings stay bf16): the biggest single read of every generated token
    assert isinstance(llm.lm_head, Int8Linear) and llm.lm_head.dense_from_rows is None
    assert llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(p.device.type == "meta" for p in llm.parameters())
    assert f"quantize={mode}" in runtime.loads[-1].detail and "bfloat16" in runtime.loads[-1].detail
    dense = sum(m.in_features * m.out_features for m in decoder)
    stored = sum(b.numel() * b.element_size() for m in decoder for b in m.buffers())
    assert stored < dense * (0.6 if mode == "4bit" else 1.1)
    logits = quantization_logits(runtime)
    assert torch.isfinite(logits).all()
    similarity = torch.nn.functional.cosine_similarity(logits.flatten(), reference_logits.flatten(), dim=0)
    assert similarity > 0.98


def test_the_first_load_keeps_the_quantized_layers_for_the_next(tiny_model: Path, tmp_path: Path, own_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    # a model this small is not worth a cache file, unless the threshold says otherwise
    assert Runtime(RuntimeOptions(model=str(tiny_model), quantize="4bit")).llm is not None
    assert not (own_cache / "quantized").exists()
    monkeypatch.setattr("miocli.model.quantize.CACHE_FROM_WEIGHTS", 0)
    first = Runtime(RuntimeOptions(model=str(tiny_model), quantize="4bit"))
    expected = quantization_logits(first)
    [kept] = (own_cache / "quantized").glob("*-int4.safetensors")
    # the next load reads the packed layers back: same model, the original weights of those layers unread
    kept_bytes = kept.read_bytes()
    again = Runtime(RuntimeOptions(model=str(tiny_model), quantize="4bit"))
    assert torch.equal(quantization_logits(again), expected)
    assert kept.read_bytes() == kept_bytes
    # other weight files (here: a copy, so another path) get their own entry
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy, ignore=shutil.ignore_patterns("seed-*", "SpeechTokenizer", "stable-*"))
    assert torch.equal(quantization_logits(Runtime(RuntimeOptions(model=str(copy), quantize="4bit"))), expected)
    assert len(list((own_cache / "quantized").glob("*-int4.safetensors"))) == 2


def test_chat_quantized_on_cpu_needs_no_bitsandbytes(tiny_model: Path, tmp_path: Path):
    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    import os

    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    done = run_mio("chat", "hi", "--model", str(tiny_model), "--quantize", "4bit", "--beams", "1",
                   "--max-new-tokens", "3", "--verbose", env={"PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    assert "quantize=4bit" in done.stderr and done.stdout.strip()


def test_cuda_quantize_without_usable_bitsandbytes_is_an_environment_problem(tmp_path: Path):
    # bitsandbytes stays the CUDA path: when it cannot load, --quantize there is one clear error.
    import os
    import subprocess
    import sys

    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libbitsandbytes_cuda.so: cannot open shared object file')\n")
    code = ("import torch\nfrom miocli.model.devices import resolve_quantize\n"
            "from miocli.errors import EnvironmentProblem\n"
            "try:\n    resolve_quantize('4bit', torch.device('cuda'))\nexcept EnvironmentProblem as e:\n"
            "    print(e.exit_code, e)\n")
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120)
    assert done.stdout.startswith("3 --quantize 4bit needs bitsandbytes"), done.stdout + done.stderr
    assert "--quantize none" in done.stdout
