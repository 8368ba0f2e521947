"""How much memory each component will take, how much there is, and what to release to make room.

Before a component loads, the Runtime estimates its resident size for the chosen device, dtype and
quantization (from the files' headers and config: nothing is read in full) and compares it with what is
free: RAM for the CPU (MemAvailable, and the cgroup's limit when there is one), free VRAM of the device
for CUDA. When it does not fit, components the current step does not need are released first; when it
still does not fit, the run stops with exit 3 and one line naming the estimate, what is free, and the
choices that would fit. A choice of ours is never what gets a process killed by the kernel.

`MIO_MEMORY_LIMIT` (for example `12G` or `800M`) caps what mio plans to use, below what the machine
has free: for a shared machine, and for tests.

Everything here is plain arithmetic over given figures, so it is unit-tested with made-up ones.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1_000_000_000
LIMIT_ENV = "MIO_MEMORY_LIMIT"
BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}
# A one-shot command releases what it no longer needs once a load would leave less than this share of
# the machine free (or 1 GiB), so its peak is its largest phase, not the sum of its components. With 30 %,
# `mio caption` on a 24 GB machine releases the SEED encoder (5 GB) before the bf16 LLM (13 GB) loads; on
# 32 GB and more it keeps it for the next batch.
ONE_SHOT_RESERVE = 0.30
# Activations, the allocator's slack and library state, on top of the weights.
CODEC_SLACK = 0.10
CODEC_FIXED = 300_000_000
LLM_SLACK = 0.05
UNCLIP_FIXED = 1_500_000_000  # the UNet's activations at 768 px (two guidance rows) and the VAE decode


def format_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


def parse_size(text: str) -> int:
    """'12G', '800M', '1.5GB', '123456' -> bytes (decimal units, as `free -h` shows them... near enough)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not match:
        raise ValueError(f"{LIMIT_ENV}={text!r} is not a size (use e.g. 12G or 800M)")
    factor = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[match[2].lower()]
    return int(float(match[1]) * factor)


# ---- what is free ----------------------------------------------------------------------------------
def _meminfo() -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    found[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return found


def _cgroup_free() -> int | None:
    """What the cgroup (v2) still allows this process tree, when it has a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def ram() -> tuple[int, int]:
    """(free, total) bytes of RAM this process may still take."""
    info = _meminfo()
    total = info.get("MemTotal", 0)
    free = info.get("MemAvailable", info.get("MemFree", 0))
    cgroup = _cgroup_free()
    if cgroup is not None:
        free = min(free, cgroup)
    if not total:  # not Linux: ask psutil when it is there, else claim nothing (no check)
        try:
            import psutil

            memory = psutil.virtual_memory()
            return int(memory.available), int(memory.total)
        except ImportError:
            return 0, 0
    return free, total


def free_memory(device: Any) -> tuple[int, int]:
    """(free, total) bytes where `device` keeps its weights: RAM, or the CUDA device's VRAM."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return ram()


def limit() -> int | None:
    from miocli.errors import UsageError

    text = os.environ.get(LIMIT_ENV)
    try:
        return parse_size(text) if text else None
    except ValueError as exc:
        raise UsageError(str(exc), hint=f"unset {LIMIT_ENV} or give a size such as 12G") from None


# ---- what a component takes --------------------------------------------------------------------------
@dataclass(frozen=True)
class LlmSize:
    """Element counts of the LLM from its config.json: the decoder's linear weights and the rest."""

    linear: int
    other: int
    kv_bytes_per_token: int  # at 2 bytes per value
    context: int

    @property
    def parameters(self) -> int:
        return self.linear + self.other


def llm_size(config: Mapping[str, Any]) -> LlmSize:
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = kv_heads * head_dim
    per_layer_linear = hidden * heads * head_dim * 2 + 2 * kv * hidden + 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return LlmSize(
        linear=layers * per_layer_linear,
        other=embeddings + (2 * layers + 1) * hidden,
        kv_bytes_per_token=2 * layers * kv * 2,
        context=int(config.get("max_position_embeddings") or 4096),
    )


def llm_config(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / "config.json").read_text())
        llm_size(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the load itself reports a broken config
    return data


def llm_bytes(size: LlmSize, dtype: str, quantize: str, batch: int = 1) -> int:
    """Resident bytes of the LLM: weights as stored, plus a full-context KV cache per row, plus slack."""
    other_bytes = 2 if quantize in ("8bit", "4bit") else BYTES_PER_ELEMENT[dtype]
    if quantize == "8bit":
        linear = size.linear  # int8 (bitsandbytes' LLM.int8 or mio's CPU int8), scales negligible
    elif quantize == "4bit":
        linear = size.linear // 2 + size.linear // 32  # two per byte, plus a scale (and zero) per group
    else:
        linear = size.linear * BYTES_PER_ELEMENT[dtype]
    weights = linear + size.other * other_bytes
    kv = size.kv_bytes_per_token * min(size.context, 4096) * max(1, batch) * (2 if dtype == "float32" else 1)
    return int(weights * (1 + LLM_SLACK) + kv)


def _pickle_elements(path: Path) -> dict[str, int]:
    """name -> element count of a torch pickle, mapped (nothing is read but the index)."""
    import torch

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return {k: v.numel() for k, v in state.items() if hasattr(v, "numel")}


SEED_ENCODER_PREFIXES = ("visual_encoder.", "Qformer.", "ln_vision.", "query_tokens", "encode_task_layer.", "quantize.")
SEED_DECODER_PREFIXES = ("quantize.", "decode_task_layer.", "blocks_image.", "image_down.", "distill_image_proj.",
                         "pos_embed_image")


def seed_elements(folder: Path, parts: Iterable[str]) -> int:
    elements = _pickle_elements(folder / "seed_quantizer.pt")
    prefixes: tuple[str, ...] = ()
    parts = set(parts)
    if "encoder" in parts:
        prefixes += SEED_ENCODER_PREFIXES
    if "decoder" in parts:
        prefixes += SEED_DECODER_PREFIXES
    total = sum(n for k, n in elements.items() if k.startswith(prefixes))
    vit = folder / "eva_vit_g.pth"
    if "encoder" in parts and vit.is_file() and not any(k.startswith("visual_encoder.") for k in elements):
        total += sum(_pickle_elements(vit).values())
    return total


def speech_elements(folder: Path, parts: Iterable[str]) -> int:
    elements = _pickle_elements(folder / "SpeechTokenizer.pt")
    parts = set(parts)
    wanted = tuple(f"{p}." for p in ("encoder", "decoder") if p in parts) + ("quantizer.",)
    return sum(n for k, n in elements.items() if k.startswith(wanted) or not k.startswith(("encoder.", "decoder.")))


def safetensors_elements(folder: Path) -> int:
    from miocli.model.checkpoint import safetensors_tensors

    total = 0
    for path in folder.glob("*.safetensors"):
        total += sum(math.prod(shape) for _, shape in safetensors_tensors(path).values())
    return total


UNCLIP_PARTS = ("unet", "vae", "text_encoder", "image_normalizer")  # image_encoder is never loaded


def unclip_elements(folder: Path) -> int:
    return sum(safetensors_elements(folder / part) for part in UNCLIP_PARTS if (folder / part).is_dir())


def codec_bytes(elements: int, dtype: str, fixed: int = CODEC_FIXED) -> int:
    return int(elements * BYTES_PER_ELEMENT[dtype] * (1 + CODEC_SLACK) + fixed)


# ---- deciding ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    free: int
    total: int
    where: str  # "RAM", "cuda:0 VRAM"


def reserve_for(total: int, long_lived: bool) -> int:
    """What a load should leave free before the run releases what it no longer needs."""
    return 0 if long_lived else max(int(total * ONE_SHOT_RESERVE), 2**30)


def to_release(need: int, free: int, held: Mapping[str, int], needed_now: Iterable[str], reserve: int) -> list[str]:
    """Components to release, largest first, so that loading `need` bytes leaves `reserve` free.

    `held`: estimated bytes of each loaded component; those in `needed_now` are kept. Releasing stops as
    soon as the load fits with the reserve; a load that fits only without the reserve releases all it can.
    """
    keep = set(needed_now)
    release: list[str] = []
    for name, size in sorted(held.items(), key=lambda item: -item[1]):
        if free - need >= reserve:
            break
        if name not in keep:
            release.append(name)
            free += size
    return release


@dataclass(frozen=True)
class Choice:
    flags: str  # "--dtype bfloat16", "--quantize 4bit"
    bytes: int


def llm_choices(size: LlmSize, device_type: str, bf16_ok: bool = True) -> list[Choice]:
    """The LLM's alternatives, largest first."""
    choices = [Choice("--dtype float32", llm_bytes(size, "float32", "none"))]
    if device_type == "cuda" or bf16_ok:
        choices.append(Choice("--dtype bfloat16", llm_bytes(size, "bfloat16", "none")))
    choices += [Choice("--quantize 8bit", llm_bytes(size, "bfloat16", "8bit")),
                Choice("--quantize 4bit", llm_bytes(size, "bfloat16", "4bit"))]
    return choices


def refusal(what: str, need: int, budget: Budget, choices: Iterable[Choice] = (),
            released: Iterable[str] = ()) -> tuple[str, str]:
    """(message, hint) of the error for a component that does not fit."""
    freed = list(released)
    after = f" after releasing {', '.join(freed)}" if freed else ""
    message = (f"{what} needs about {format_bytes(need)} but {format_bytes(budget.free)} of {budget.where} "
               f"is free{after}")
    fitting = [f"{c.flags} (about {format_bytes(c.bytes)})" for c in choices if c.bytes <= budget.free]
    if fitting:
        hint = "options that fit: " + ", ".join(fitting)
    else:
        hint = "nothing fits: free some memory, or use a machine (or GPU) with more"
    if limit() is not None:
        hint += f"; {LIMIT_ENV}={os.environ.get(LIMIT_ENV)} caps what mio plans to use"
    return message, hint


# ---- work whose size the input decides ---------------------------------------------------------------
# The speech decoder's activations per frame of a window: about five copies of its widest layer (n_filters
# channels at full rate), measured on the real decoder (benchmarks/speech_decode.py), plus its fixed part.
SPEECH_ACTIVATION_COPIES = 6
SPEECH_WINDOW_FIXED = 200_000_000
# Decoding a speech segment held in memory: the text, its parse (Python ints and strings) and the samples
# (float32, clipped copy, 16-bit file bytes): 112 bytes per byte of token text measured (3.9 MB on stdin).
SPEECH_BYTES_PER_TEXT_BYTE = 120


def speech_window_bytes(n_filters: int, hop: int, window: int) -> int:
    return SPEECH_ACTIVATION_COPIES * 4 * n_filters * hop * window + SPEECH_WINDOW_FIXED
