"""Weight-only 8-bit and 4-bit LLM on the CPU, loaded tensor by tensor.

Why not bitsandbytes through transformers on the CPU: measured at MIO-7B's size on a 2-core machine it
loads in 432 s and peaks at 16.0 GB for 4-bit (66 s and 18.2 GB for 8-bit), more than plain bf16 (6 s,
11.9 GB). transformers materialises bf16 weights and hands them to bitsandbytes' CPU quantizer, which is
slow element-wise Python-level work, and both copies live at once. torchao 0.18 has no packed 4-bit CPU
layout (its int4 formats need CUDA or an extra kernel package; int4 "unpacked" keeps a byte per weight).

Here the model is built without storage, and each weight of the decoder's linear layers is read from its
safetensors file with plain reads (no memory map, so the file does not count in the resident set),
quantized at once and dropped, while a thread reads the next; the output head becomes int8 whatever the bit
width, and the rest (embeddings, norms) is kept in bf16. Peak memory is the quantized model plus two tensors.
The 4-bit matrix products are mio's own kernel (cpu_kernel: int8 activations times the int4 levels in integer
dot products, AVX-512 VNNI where the CPU has it), built on first use; without a compiler they are torch's
`_weight_int4pack_mm_for_cpu` (groups of 128 along the input, scale and zero per group). 8-bit layers use torch's
`_weight_int8pack_mm` (one scale per output row). Those kernels serve the few rows of a generated token; their
cost grows with every row, so a long prompt instead dequantizes each layer's weight into one reused bf16 buffer
and runs a single bf16 matrix product.

Quantizing 5.5 B weights costs about a minute on 2 cores, so the first load keeps the quantized layers in
`$MIO_CACHE/quantized/` (about 3 GB for 4-bit, 5.6 GB for 8-bit at MIO-7B's size), keyed by the weight
files' names, sizes and times, the bit width and the torch version; later loads read them instead
(`MIO_QUANTIZED_CACHE=0` turns that off).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from miocli.errors import ModelError
from miocli.model import checkpoint, cpu_kernel

# The input widths the int4 kernel groups by; the largest that divides a layer's width is used.
INT4_GROUP_SIZES = (128, 64, 32)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
CACHE_DTYPES = {"U8": torch.uint8, "I8": torch.int8}
CACHE_VERSION = 3  # 2: the output head is int8 too; 3: int4 in mio's own layout where its kernel is built
CACHE_ENV = "MIO_QUANTIZED_CACHE"
# Below this many quantized weights, quantizing takes well under a second: not worth a file.
CACHE_FROM_WEIGHTS = 100_000_000
COMPUTE_DTYPE = torch.bfloat16
# Rows of a product (prompt tokens × beams × batch) from which dequantizing the layer's weight into a reused bf16
# buffer and one bf16 matrix product beats torch's weight-only kernels, which cost the same for every row they
# take: measured at MIO-7B's shapes on 2 cores (benchmarks/cpu_kernels.py, docs/performance.md).
INT8_DENSE_FROM_ROWS = 32
INT4_DENSE_FROM_ROWS = 192
# The same for mio's own int4 kernel (cpu_kernel), whose cost also grows with the rows but from a far lower start.
OWN_INT4_DENSE_FROM_ROWS = 40
# Elements quantized at a time: float32 scratch that stays in the core's cache.
QUANTIZE_CHUNK = 1 << 18
_scratch = threading.local()
# Tensors up to this size are read into reused buffers while loading (a decoder weight of MIO-7B is 90 MB);
# a larger one (the 625 MB output head) gets its own, so that two buffers never add more than 0.5 GB.
REUSED_READ_BYTES = 256 << 20


def dense_buffer(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) bf16 scratch matrix shared by the quantized layers of this thread: one buffer as big as the
    largest layer (90 MB at MIO-7B's size) instead of a new one per layer and call."""
    buffer: torch.Tensor | None = getattr(_scratch, "dense", None)
    if buffer is None or buffer.numel() < rows * cols:
        _scratch.dense = buffer = torch.empty(rows * cols, dtype=COMPUTE_DTYPE)
    return buffer[: rows * cols].view(rows, cols)


def _row_chunks(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, QUANTIZE_CHUNK // cols)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class Int8Linear(nn.Module):
    """y = x Wᵀ (+ b) with W stored as int8, one bf16 scale per output row."""

    mio_quantized = True

    def __init__(self, in_features: int, out_features: int, bias: bool, dense_from_rows: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # None: always the int8 kernel (the output head, whose bf16 copy would take 625 MB of scratch)
        self.dense_from_rows = dense_from_rows
        self.register_buffer("weight", torch.empty(0, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(0, dtype=COMPUTE_DTYPE))
        self.bias = nn.Parameter(torch.empty(0), requires_grad=False) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        weight = weight.to(COMPUTE_DTYPE)
        # Symmetric per row: scale = max|w| / 127.
        scales = weight.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-8).div_(127)
        codes = torch.empty(weight.shape, dtype=torch.int8)
        for rows in _row_chunks(*weight.shape):
            codes[rows] = weight[rows].float().div_(scales[rows]).round_()
        self.weight = codes
        self.scales = scales.squeeze(1).to(COMPUTE_DTYPE)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        if self.dense_from_rows is not None and flat.shape[0] >= self.dense_from_rows:
            dense = dense_buffer(self.out_features, self.in_features)
            dense.copy_(self.weight).mul_(self.scales[:, None])
            y = functional.linear(flat, dense)
        else:
            y = torch._weight_int8pack_mm(flat, self.weight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def _pack_int4_blocks(levels: torch.Tensor) -> torch.Tensor:
    # torch's CPU layout (see Int4Linear.dense_transposed): (rows / 64, cols, 32) bytes
    rows, cols = levels.shape
    halves = levels.view(rows // 64, 2, 32, cols)
    return (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2).contiguous().view(rows, cols // 2)


@functools.cache
def torch_packs_int4_in_blocks() -> bool:
    """Whether this torch packs int4 for its CPU kernel in the layout mio packs and unpacks itself (see
    Int4Linear.dense_transposed), checked once per process on a small matrix; a torch that packs otherwise
    keeps its own conversion and its kernel for every input."""
    sample = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.equal(_pack_int4_blocks(sample), torch._convert_weight_to_int4pack_for_cpu(sample.int(), 8))


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """`levels` (rows, cols) of 0..15 in uint8, packed as `_weight_int4pack_mm_for_cpu` reads them: torch's own
    conversion takes int32 levels and twice the time, so whole blocks of 64 rows are packed here."""
    if levels.shape[0] % 64 == 0 and torch_packs_int4_in_blocks():
        return _pack_int4_blocks(levels)
    return torch._convert_weight_to_int4pack_for_cpu(levels.int(), 8)


class Int4Linear(nn.Module):
    """y = x Wᵀ (+ b) with W stored as packed int4 (two per byte), asymmetric, per group of inputs.

    Two layouts: mio's own (cpu_kernel, q4_cpu.cpp), used wherever that kernel is built, else torch's
    (`_weight_int4pack_mm_for_cpu`, with the dense path of dense_transposed)."""

    mio_quantized = True

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 own_kernel: bool | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # own_kernel=False: torch's layout and kernel even where mio's is built (None or True: mio's where built)
        self.own_kernel = own_kernel is not False and cpu_kernel.available()
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8))
        if self.own_kernel:
            # (out_features, in_features / group_size) each: weight = level * scale + min
            self.register_buffer("scales", torch.empty(0, dtype=COMPUTE_DTYPE))
            self.register_buffer("mins", torch.empty(0, dtype=COMPUTE_DTYPE))
        else:
            # (in_features / group_size, out_features, 2): the scale and the zero of each group
            self.register_buffer("scales_and_zeros", torch.empty(0, dtype=COMPUTE_DTYPE))
        self.bias = nn.Parameter(torch.empty(0), requires_grad=False) if bias else None

    def set_weight(self, weight: torch.Tensor) -> None:
        rows, cols = weight.shape
        groups = weight.to(COMPUTE_DTYPE).reshape(rows, cols // self.group_size, self.group_size)
        low = groups.amin(dim=-1, keepdim=True).float()
        scale = (groups.amax(dim=-1, keepdim=True).float() - low).div_(15).clamp_(min=1e-8)
        levels = torch.empty(rows, cols, dtype=torch.uint8)
        for part in _row_chunks(rows, cols):
            levels[part] = groups[part].float().sub_(low[part]).div_(scale[part]).round_().clamp_(0, 15).view(-1, cols)
        if self.own_kernel:
            # byte j of a group: input j in the low four bits, input j + group / 2 in the high four
            halves = levels.view(rows, cols // self.group_size, 2, self.group_size // 2)
            self.weight = (halves[:, :, 0] | (halves[:, :, 1] << 4)).view(rows, cols // 2)
            self.scales = scale.view(rows, -1).to(COMPUTE_DTYPE)
            self.mins = low.view(rows, -1).to(COMPUTE_DTYPE)
            return
        self.weight = pack_int4(levels)
        # The kernel computes (q - 8) * scale + zero, so zero = low + 8 * scale.
        zero = low.add_(scale, alpha=8)
        self.scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)

    def dense_transposed(self) -> torch.Tensor | None:
        """Wᵀ in bf16 (in_features, out_features), in the shared scratch, from torch's layout; None where torch's
        packing is not the one this reads (torch_packs_int4_in_blocks): (out / 64, in, 32) bytes, byte j of block
        b holding row 64b + j in its low four bits and row 64b + 32 + j in its high four."""
        rows, cols = self.out_features, self.in_features
        if (self.own_kernel or rows % 64 or self.weight.shape != (rows, cols // 2)
                or not torch_packs_int4_in_blocks()):
            return None
        blocks = self.weight.view(rows // 64, cols, 32)
        dense = dense_buffer(cols, rows)
        halves = dense.view(cols, rows // 64, 2, 32)
        halves[:, :, 0].copy_((blocks & 15).permute(1, 0, 2))
        halves[:, :, 1].copy_((blocks >> 4).permute(1, 0, 2))
        scale = self.scales_and_zeros[..., 0]
        offset = (self.scales_and_zeros[..., 1].float() - 8 * scale.float()).to(COMPUTE_DTYPE)
        for group in range(cols // self.group_size):
            # a group's rows of Wᵀ at a time: broadcasting along the leading axis is the fast case
            part = dense[group * self.group_size:(group + 1) * self.group_size]
            torch.addcmul(offset[group], part, scale[group], out=part)
        return dense

    def dequantized(self) -> torch.Tensor:
        """W in bf16 (out_features, in_features), in the shared scratch (own layout only)."""
        dense = dense_buffer(self.out_features, self.in_features)
        cpu_kernel.dequantize(self.weight, self.scales, self.mins, self.group_size, dense)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        if self.own_kernel:
            if flat.shape[0] >= OWN_INT4_DENSE_FROM_ROWS:
                y = functional.linear(flat, self.dequantized())
            else:
                y = cpu_kernel.linear(flat.contiguous(), self.weight, self.scales, self.mins, self.group_size)
        else:
            dense = self.dense_transposed() if flat.shape[0] >= INT4_DENSE_FROM_ROWS else None
            if dense is not None:
                y = flat @ dense
            else:
                y = torch._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def int4_group_size(in_features: int, out_features: int) -> int | None:
    """The int4 group size for a layer, or None when the kernel cannot take it (kept in bf16 then)."""
    if out_features % 16:  # torch packs int4 rows in sixteens
        return None
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def quantized_linear(linear: nn.Linear, bits: int) -> nn.Module | None:
    """An empty quantized stand-in for `linear`, or None when it stays in bf16."""
    bias = linear.bias is not None
    if bits == 8:
        return Int8Linear(linear.in_features, linear.out_features, bias, dense_from_rows=INT8_DENSE_FROM_ROWS)
    group = int4_group_size(linear.in_features, linear.out_features)
    return None if group is None else Int4Linear(linear.in_features, linear.out_features, bias, group)


def safetensors_files(model_dir: Path, reader: str, hint: str) -> list[Path]:
    """The LLM's safetensors files (the index's shards, or model.safetensors); a ModelError saying that `reader`
    needs them, with `hint`, when the folder has none."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"{reader} reads safetensors weights; {model_dir} has none", hint=hint)


def read_tensors(path: Path, skip: Callable[[str], bool] = lambda _name: False,
                 storage: Callable[[str, int], torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file (but those `skip` names), read with plain reads: nothing of the file
    stays mapped, so it never counts in the resident set. `storage(name, size)` may give the bytes to read a
    tensor into (a reused buffer), else each gets its own."""
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
            data = storage(name, end - begin) if storage is not None else torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            if handle.readinto(memoryview(data.numpy())) != end - begin:
                raise ModelError(f"{path.name} is truncated at tensor {name}", hint=checkpoint.REDOWNLOAD_HINT)
            yield name, data.view(dtype).reshape(entry["shape"])


def read_ahead(files: list[Path], skip: Callable[[str], bool],
               consumed: Callable[[str], bool] = lambda _name: False) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `files` in order, the next one read by a thread while the caller quantizes this one (reads
    and torch's kernels both let go of the GIL): at most two tensors are held at a time.

    Tensors the caller is done with once it asks for the next (`consumed`: those it quantizes) are read into two
    buffers used in turn: a fresh allocation per tensor cost as much time in page faults as the reading itself
    (12 GB at MIO-7B's size)."""
    buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
    turn = [0]

    def storage(name: str, size: int) -> torch.Tensor:
        if not consumed(name) or size > REUSED_READ_BYTES:
            return torch.empty(size, dtype=torch.uint8)
        turn[0] ^= 1
        if buffers[turn[0]].numel() < size:
            buffers[turn[0]] = torch.empty(size, dtype=torch.uint8)
        return buffers[turn[0]][:size]

    slots = threading.Semaphore(1)
    handoff: list[tuple[str, torch.Tensor] | BaseException | None] = []
    ready = threading.Condition()
    stopped = threading.Event()

    def reader() -> None:
        outcome: BaseException | None = None
        try:
            for path in files:
                for item in read_tensors(path, skip=skip, storage=storage):
                    with ready:
                        handoff.append(item)
                        ready.notify()
                    del item
                    slots.acquire()  # until the caller is done with the one before
                    if stopped.is_set():
                        return
        except BaseException as exc:  # handed to the caller, who raises it
            outcome = exc
        with ready:
            handoff.append(outcome)
            ready.notify()

    thread = threading.Thread(target=reader, name="mio-read-weights", daemon=True)
    thread.start()
    try:
        while True:
            with ready:
                ready.wait_for(lambda: bool(handoff))
                item = handoff.pop(0)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()
    finally:
        stopped.set()
        slots.release()


def _return_freed_memory() -> None:
    """Best effort, glibc only: allocations from 4 MB up get their own mappings, returned to the system when freed.

    glibc otherwise raises that threshold to the size of each block it frees (up to 32 MB), so the loader's
    20-90 MB temporaries come from the heap around the quantized weights kept there and stay resident: measured
    at MIO-7B's size, a 6.3 GB peak and 5.4 GB after the load instead of 5.2 GB and 4.2 GB."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and not getattr(config, "tie_word_embeddings", False):
        # The output head in int8 (always its row-wise kernel): at MIO-7B's size its bf16 weight is 625 MB read
        # on every generated token, a fifth of a 4-bit step (llama.cpp keeps it at 6 bits or more, too).
        name = next(n for n, m in model.named_modules() if m is head)
        parent_name, _, child = name.rpartition(".")
        replacement = Int8Linear(head.in_features, head.out_features, head.bias is not None)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        quantized[name + ".weight"] = replacement
    owners = dict(model.named_modules())
    _return_freed_memory()
    seen: set[str] = set()
    files = safetensors_files(model_dir, "--quantize on the CPU",
                              "convert the LLM weights to safetensors, or use --quantize none")
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
    for key, tensor in read_ahead(files, skip=from_cache.__contains__, consumed=quantized.__contains__):
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
    # torch's packed int4 layout may change between versions; mio's own is used only where its kernel is built
    layout = "mio" if bits == 4 and cpu_kernel.available() else "torch"
    key = json.dumps([CACHE_VERSION, bits, layout, torch.__version__, stats])
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

