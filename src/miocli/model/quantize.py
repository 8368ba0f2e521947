"""Weight-only 8-bit and 4-bit LLM on the CPU, loaded tensor by tensor.

Why not bitsandbytes through transformers on the CPU: measured at MIO-7B's size on a 2-core machine it
loads in 432 s and peaks at 16.0 GB for 4-bit (66 s and 18.2 GB for 8-bit), more than plain bf16 (6 s,
11.9 GB). transformers materialises bf16 weights and hands them to bitsandbytes' CPU quantizer, which is
slow element-wise Python-level work, and both copies live at once. torchao 0.18 has no packed 4-bit CPU
layout (its int4 formats need CUDA or an extra kernel package; int4 "unpacked" keeps a byte per weight).

Here the model is built without storage, and each weight of the decoder's linear layers is read from its
safetensors file with plain reads (no memory map, so the file does not count in the resident set),
quantized at once and dropped; the rest (embeddings, norms, output head) is kept in bf16 like
bitsandbytes does. Peak memory is the quantized model plus one tensor. The matrix products are torch's
own CPU kernels: `_weight_int8pack_mm` (int8, one scale per output row) and `_weight_int4pack_mm_for_cpu`
(int4 in groups of 128 along the input, scale and zero per group; AVX-512/AMX where present).

Quantizing 5.5 B weights costs about a minute on 2 cores, so the first load keeps the quantized layers in
`$MIO_CACHE/quantized/` (about 3 GB for 4-bit, 5.6 GB for 8-bit at MIO-7B's size), keyed by the weight
files' names, sizes and times, the bit width and the torch version; later loads read them instead
(`MIO_QUANTIZED_CACHE=0` turns that off).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miocli.errors import ModelError
from miocli.model import checkpoint

# The input widths the int4 kernel groups by; the largest that divides a layer's width is used.
INT4_GROUP_SIZES = (128, 64, 32)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
CACHE_DTYPES = {"U8": torch.uint8, "I8": torch.int8}
CACHE_VERSION = 1
CACHE_ENV = "MIO_QUANTIZED_CACHE"
# Below this many quantized weights, quantizing takes well under a second: not worth a file.
CACHE_FROM_WEIGHTS = 100_000_000
COMPUTE_DTYPE = torch.bfloat16


class Int8Linear(nn.Module):
    """y = x Wᵀ (+ b) with W stored as int8, one bf16 scale per output row."""

    mio_quantized = True

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(0, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(0, dtype=COMPUTE_DTYPE))
        self.bias = nn.Parameter(torch.empty(0), requires_grad=False) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        weight = weight.to(COMPUTE_DTYPE)
        # Symmetric per row: scale = max|w| / 127.
        scales = weight.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-8).div_(127)
        self.weight = weight.float().div_(scales).round_().to(torch.int8)
        self.scales = scales.squeeze(1).to(COMPUTE_DTYPE)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE), self.weight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    """y = x Wᵀ (+ b) with W stored as packed int4 (two per byte), asymmetric, per group of inputs."""

    mio_quantized = True

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8))
        # (in_features / group_size, out_features, 2): the scale and the zero of each group
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=COMPUTE_DTYPE))
        self.bias = nn.Parameter(torch.empty(0), requires_grad=False) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        rows, cols = weight.shape
        groups = weight.to(COMPUTE_DTYPE).reshape(rows, cols // self.group_size, self.group_size)
        low = groups.amin(dim=-1, keepdim=True).float()
        scale = (groups.amax(dim=-1, keepdim=True).float() - low).div_(15).clamp_(min=1e-8)
        levels = groups.float().sub_(low).div_(scale).round_().clamp_(0, 15).to(torch.int32).reshape(rows, cols)
        self.weight = torch._convert_weight_to_int4pack_for_cpu(levels, 8)
        # The kernel computes (q - 8) * scale + zero, so zero = low + 8 * scale.
        zero = low.add_(scale, alpha=8)
        self.scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE), self.weight,
                                              self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def int4_group_size(in_features: int, out_features: int) -> int | None:
    """The int4 group size for a layer, or None when the kernel cannot take it (kept in bf16 then)."""
    if out_features % 8:
        return None
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def quantized_linear(linear: nn.Linear, bits: int) -> nn.Module | None:
    """An empty quantized stand-in for `linear`, or None when it stays in bf16."""
    bias = linear.bias is not None
    if bits == 8:
        return Int8Linear(linear.in_features, linear.out_features, bias)
    group = int4_group_size(linear.in_features, linear.out_features)
    return None if group is None else Int4Linear(linear.in_features, linear.out_features, bias, group)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"--quantize on the CPU reads safetensors weights; {model_dir} has none",
                     hint="convert the LLM weights to safetensors, or use --quantize none")


def read_tensors(path: Path, skip: Callable[[str], bool] = lambda _name: False) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file (but those `skip` names), read with plain reads: nothing of the file
    stays mapped, so it never counts in the resident set."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
        start = 8 + header_size
        for name, entry in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                  key=lambda item: item[1]["data_offsets"][0]):
            if skip(name):
                continue
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) or CACHE_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ModelError(f"{path.name}: tensor {name} is {entry['dtype']}, not a float type --quantize reads",
                                 hint="use --quantize none")
            begin, end = entry["data_offsets"]
            data = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            if handle.readinto(memoryview(data.numpy())) != end - begin:
                raise ModelError(f"{path.name} is truncated at tensor {name}", hint=checkpoint.REDOWNLOAD_HINT)
            yield name, data.view(dtype).reshape(entry["shape"])


def load_quantized_llm(model_dir: Path, config: Any, bits: int) -> Any:
    """The LLM of `model_dir` with its decoder's linear weights in `bits` (8 or 4), for the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameters without storage; buffers (the rotary frequencies) real, as they are never in the files.
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=COMPUTE_DTYPE)
    quantized: dict[str, nn.Module] = {}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(m is module for m in decoder.modules()):
            replacement = quantized_linear(module, bits)
            if replacement is not None:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, replacement)
                quantized[name + ".weight"] = replacement
    owners = dict(model.named_modules())
    seen: set[str] = set()
    files = _weight_files(model_dir)
    weights = sum(m.in_features * m.out_features for m in quantized.values())
    cache = cache_file(files, bits) if weights >= CACHE_FROM_WEIGHTS else None
    if cache is not None and cache.is_file():
        try:
            for key, tensor in read_tensors(cache):
                module_name, _, buffer = key.rpartition(".")
                setattr(model.get_submodule(module_name), buffer, tensor)
                seen.add(module_name + ".weight")
        except Exception:  # a damaged cache is rebuilt from the weights
            seen.clear()
    from_cache = set(seen)
    for path in files:
        for key, tensor in read_tensors(path, skip=from_cache.__contains__):
            if key in quantized:
                quantized[key].set_weight(tensor)  # type: ignore[operator]
            else:
                parent_name, _, attribute = key.rpartition(".")
                owner = owners.get(parent_name)
                if owner is None or not hasattr(owner, attribute):
                    continue  # a tensor the model has no place for (the reference loads non-strictly too)
                value = tensor.to(COMPUTE_DTYPE)
                if isinstance(getattr(owner, attribute), nn.Parameter) or attribute in owner._parameters:
                    # requires_grad as from_pretrained leaves it: without it, a bf16 linear on a strided input
                    # (the last position's hidden state) takes a path that copies the whole weight, 625 MB for
                    # the output head, per row (measured +3 GB peak with 5 beams)
                    setattr(owner, attribute, nn.Parameter(value))
                else:
                    setattr(owner, attribute, value)
            seen.add(key)
            del tensor
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [k for k in quantized if k not in seen]
    if missing:
        from miocli.codecs.weights import format_keys

        raise ModelError(f"the LLM weights in {model_dir} lack tensors: {format_keys(missing)}",
                         hint=checkpoint.REDOWNLOAD_HINT)
    if cache is not None and not from_cache:
        write_cache(cache, {k: v for k, m in quantized.items() for k, v in _buffers(k, m)})
    model.eval()
    return model


def _buffers(weight_key: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = weight_key.rpartition(".")[0]
    for name, buffer in module.named_buffers(recurse=False):
        yield f"{prefix}.{name}", buffer


def cache_file(files: list[Path], bits: int) -> Path | None:
    """Where the quantized layers of these weight files are kept, or None when caching is off."""
    if os.environ.get(CACHE_ENV, "1").lower() in ("0", "off", "no", "false"):
        return None
    from miocli.model.tiny import default_cache_dir

    stats = []
    for path in files:
        info = path.stat()
        stats.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    # the packed int4 layout is torch's own and may change between versions
    key = json.dumps([CACHE_VERSION, bits, torch.__version__, stats])
    return default_cache_dir() / "quantized" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}-int{bits}.safetensors"


def write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Best effort: a full disk or a read-only cache only costs the next load its quantization."""
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(temporary))
        os.replace(temporary, path)
    except OSError:
        pass
    finally:
        temporary.unlink(missing_ok=True)

