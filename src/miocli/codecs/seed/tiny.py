"""A tiny random SEED-Tokenizer-2 in the real checkpoint layout, for tests and demos.

Same key names as the published file, ViT included, with small widths (the golden
fixture's sizes); the query count, codebook and output size stay real so that everything
downstream (32 tokens, ids up to 8191, 1024-d embeddings) is exercised unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .layout import DecoderDims, QFormerDims, SeedDims, VitDims, reference_shapes
from .model import CONFIG_FILE, QUANTIZER_FILE

TINY_DIMS = SeedDims(
    vit=VitDims(width=64, depth=2, mlp_hidden=279, patch_size=14, num_patches=256, num_heads=4),
    qformer=QFormerDims(hidden=96, depth=2, ffn=192, cross_attention_freq=2, encoder_width=64,
                        num_heads=12, num_queries=32),
    decoder=DecoderDims(task_hidden=96, codebook_size=8192, codebook_dim=32, decode_hidden=32, depth=4,
                        mlp_hidden=384, num_heads=12, down=(96, 256, 128, 32), out_dim=1024,
                        recon_depth=4, recon_mlp_hidden=384),
)

# encode_task_out of such a random model spreads with a std of about 0.6 per dimension
# (tanh output through a fan-in scaled Linear); a codebook of the same spread puts many
# rows near every query vector, so different images land on different ids.
_CODEBOOK_STD = 0.6


def _is_norm(key: str) -> bool:
    return "norm" in key.lower() or key.startswith("ln_vision.")


def random_state(
    dims: SeedDims, seed: int = 0, dtype: torch.dtype = torch.float32, uniform: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of the reference state dict, drawn with scales that keep activations sane.

    `uniform` draws from a uniform law of the same standard deviation, about twice as fast
    as a normal one: what a real-size benchmark wants for its billion random weights.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, std: float) -> None:
        if uniform:
            half_width = std * math.sqrt(3.0)
            t.uniform_(-half_width, half_width, generator=gen)
        else:
            t.normal_(0.0, std, generator=gen)

    state: dict[str, torch.Tensor] = {}
    for key, shape in reference_shapes(dims).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1], dtype=torch.int64).view(shape)
            continue
        t = torch.empty(shape, dtype=dtype)
        name = key.rsplit(".", 1)[-1]
        if _is_norm(key):
            draw(t, 0.1)
            if name == "weight":
                t += 1.0
        elif key == "quantize.embedding.weight":
            draw(t, _CODEBOOK_STD)
        elif key == "query_tokens":
            draw(t, 1.0)
        elif name in {"pos_embed", "pos_embed_image", "cls_token"}:
            draw(t, 0.5)
        elif t.ndim >= 2:
            draw(t, 1.0 / math.sqrt(math.prod(shape[1:])))
        else:  # biases, q_bias / v_bias
            draw(t, 0.05)
        state[key] = t
    return state


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], dims: SeedDims) -> None:
    """seed_quantizer.pt plus the config.json holding what shapes cannot tell (head counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / QUANTIZER_FILE)
    config = {"qformer_num_heads": dims.qformer.num_heads, "decoder_num_heads": dims.decoder.num_heads}
    if dims.vit is not None:
        config["vit_num_heads"] = dims.vit.num_heads
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def build_tiny(model_dir: Path, seed: int = 0) -> None:
    """Write `model_dir/seed-tokenizer-2/{seed_quantizer.pt,config.json}` (about 10 MB, deterministic)."""
    write_checkpoint(Path(model_dir) / "seed-tokenizer-2", random_state(TINY_DIMS, seed), TINY_DIMS)
