"""A tiny random SpeechTokenizer with the real file layout and token scheme.

Same sample rate, strides (320 samples per frame), codebook size and number of layers as the
published model, so every code path (strict loading, weight-norm folding, token offsets,
frame counts) is exercised; only the widths are small. The sound it makes is noise.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from miocli.codecs.speech.checkpoint import Entry, checkpoint_layout
from miocli.codecs.speech.config import REAL_CONFIG, SpeechConfig
from miocli.codecs.speech.model import CONFIG_NAME, WEIGHTS_NAME, SpeechCodec

TINY_WIDTHS = {"n_filters": 4, "dimension": 32, "semantic_dimension": 16}


def tiny_config() -> SpeechConfig:
    return SpeechConfig.from_dict({**REAL_CONFIG, **TINY_WIDTHS})


def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound


def random_weights(
    entries: list[Entry],
    gen: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """PyTorch-default-like random weights for every non-codebook entry of `entries`.

    Codebooks are left empty (zeros, `inited` = 1): callers fill them from data so that
    the nearest-code search spreads over many codes instead of collapsing onto one.
    """
    shapes = {e.key: e.shape for e in entries}
    out: dict[str, torch.Tensor] = {}
    # weight_g needs its weight_v, which comes after it in the file: draw it in a second pass.
    for e in entries:
        key, shape = e.key, e.shape
        if key.endswith("weight_g"):
            continue
        if key.endswith("weight_v"):
            fan_in = math.prod(shape[1:])
            out[key] = _uniform(shape, 1 / math.sqrt(fan_in), gen).to(dtype)
        elif ".lstm." in key:
            hidden = shapes[key.replace("bias_", "weight_").replace("weight_ih", "weight_hh")][1]
            out[key] = _uniform(shape, 1 / math.sqrt(hidden), gen).to(dtype)
        elif key.endswith(".bias"):
            stem = key[: -len("bias")]
            weight_shape = shapes.get(stem + "weight_v") or shapes[stem + "weight"]
            fan_in = math.prod(weight_shape[1:])
            out[key] = (0.1 * _uniform(shape, 1 / math.sqrt(fan_in), gen)).to(dtype)
        elif key.endswith("._codebook.inited"):
            out[key] = torch.ones(shape, dtype=dtype)
        elif "._codebook." in key:
            out[key] = torch.zeros(shape, dtype=dtype)
        else:  # transform.weight: a training-only Linear
            out[key] = _uniform(shape, 1 / math.sqrt(shape[-1]), gen).to(dtype)
    for e in entries:
        if e.key.endswith("weight_g"):
            v = out[e.key[:-1] + "v"].double()
            norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.ndim)), keepdim=True)
            # g != ||v|| on purpose, so a loader that ignores weight_g is caught by the numbers;
            # the sqrt(3) gain keeps the signal from shrinking through the ELU stack.
            scale = math.sqrt(3) * (0.75 + 0.5 * torch.rand(e.shape, generator=gen, dtype=torch.float64))
            out[e.key] = (norm * scale).to(dtype)
    return {e.key: out[e.key] for e in entries}


def _probe_signal(seconds: float, sample_rate: int, gen: torch.Generator) -> torch.Tensor:
    """Tones, chirps and noise with changing loudness: varied enough to spread the codes."""
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    sig = torch.zeros_like(t)
    scale = torch.tensor([3000.0, 3000.0, 0.2], dtype=torch.float64)
    for _ in range(6):
        f0, f1, amp = (torch.rand(3, generator=gen, dtype=torch.float64) * scale).tolist()
        sig += amp * torch.sin(2 * math.pi * (f0 * t + 0.5 * (f1 - f0) / seconds * t * t))
    sig += 0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 1.3 * t) ** 2
    return (sig * envelope).clamp(-1, 1)


def fill_codebooks(
    state: dict[str, torch.Tensor], config: SpeechConfig, gen: torch.Generator, seconds: float = 4.0
) -> None:
    """Set each VQ layer's codebook from the residuals the encoder really produces.

    Rows are frames of that layer's residual on a probe signal plus noise of the residual's
    own per-dimension spread, so codes are used densely and every layer refines the last.
    """
    probe = _probe_signal(seconds, config.sample_rate, gen)
    codec = SpeechCodec.from_state_dict(config, state, dtype=torch.float64, parts=frozenset({"encoder"}))
    residual = codec.encoder_output(probe.to(torch.float64)).double()[0].T  # (frames, dim)
    for i, book in enumerate(codec.net.quantizer.codebooks()):
        frames = residual.shape[0]
        pick = torch.randint(frames, (config.codebook_size,), generator=gen)
        spread = residual.std(dim=0, keepdim=True)
        embed = residual[pick] + 0.5 * spread * torch.randn(
            (config.codebook_size, residual.shape[1]), generator=gen, dtype=torch.float64
        )
        prefix = f"quantizer.vq.layers.{i}._codebook."
        state[prefix + "embed"] = embed.clone()
        state[prefix + "embed_avg"] = embed.clone()
        state[prefix + "cluster_size"] = torch.ones(config.codebook_size, dtype=torch.float64)
        book.embed = embed
        residual = residual - embed[book.nearest(residual)]


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_tiny(model_dir: Path, seed: int = 0) -> None:
    """Write `model_dir/SpeechTokenizer/{config.json, SpeechTokenizer.pt}`, deterministic from seed.

    Everything is computed in float64 and rounded once to float32, so the bytes do not
    depend on the thread count. Files are replaced atomically: a codec that memory-mapped
    the previous file keeps working.
    """
    config = tiny_config()
    gen = torch.Generator().manual_seed(seed)
    entries = checkpoint_layout(config)
    state = random_weights(entries, gen)
    fill_codebooks(state, config, gen)
    folder = Path(model_dir) / "SpeechTokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    ordered = {e.key: state[e.key].to(torch.float32).contiguous() for e in entries}
    config_text = json.dumps(config.to_json_dict(), indent=2) + "\n"
    _write_atomic(folder / CONFIG_NAME, lambda p: p.write_text(config_text, encoding="utf-8"))
    _write_atomic(folder / WEIGHTS_NAME, lambda p: torch.save(ordered, p))
