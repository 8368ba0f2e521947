"""Checkpoint layout of SEED-Tokenizer-2: dimensions read from tensor shapes, and key checks.

The reference builds the model from hard-coded sizes and loads its checkpoint non-strictly,
so a wrong or truncated file silently runs with random weights. Here every size is read
from the shapes of a few anchor tensors, the complete key -> shape table those sizes imply
is generated, and the file is compared with it key by key before anything is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Shape = tuple[int, ...]

VIT_PREFIX = "visual_encoder."
QF = "Qformer.bert."
QF_LAYER = QF + "encoder.layer."

# EVA-ViT-g as BLIP-2 builds it: 39 blocks even though EVA-CLIP-g has 40, so a standalone
# eva_vit_g.pth may hold one block more than the model uses.
EVA_G_WIDTH = 1408
EVA_G_DEPTH = 39


class LayoutError(Exception):
    """The tensors do not form a SEED-Tokenizer-2 checkpoint; the loader adds the file name."""

    def __init__(
        self,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        wrong_shapes: Iterable[tuple[str, Shape, Shape]] = (),
        detail: str | None = None,
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.wrong_shapes = sorted(wrong_shapes)
        self.detail = detail
        super().__init__(self.describe())

    def describe(self) -> str:
        parts: list[str] = []
        if self.detail:
            parts.append(self.detail)
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_clip(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_clip(self.unexpected)}")
        if self.wrong_shapes:
            shown = [f"{k} is {tuple(got)}, expected {tuple(want)}" for k, got, want in self.wrong_shapes]
            parts.append(f"wrong shapes ({len(shown)}): {_clip(shown)}")
        return "; ".join(parts)


def _clip(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


@dataclass(frozen=True)
class VitDims:
    width: int
    depth: int
    mlp_hidden: int
    patch_size: int
    num_patches: int
    num_heads: int

    @property
    def image_size(self) -> int:
        return math.isqrt(self.num_patches) * self.patch_size


@dataclass(frozen=True)
class QFormerDims:
    hidden: int
    depth: int
    ffn: int
    cross_attention_freq: int
    encoder_width: int
    num_heads: int
    num_queries: int

    @property
    def cross_layers(self) -> tuple[int, ...]:
        return tuple(range(0, self.depth, self.cross_attention_freq))


@dataclass(frozen=True)
class DecoderDims:
    """Embedding decoder (get_codebook_entry) and the two task heads around the codebook."""

    task_hidden: int  # encode_task_layer hidden width
    codebook_size: int
    codebook_dim: int
    decode_hidden: int  # decode_task_layer hidden width
    depth: int  # blocks_image
    mlp_hidden: int
    num_heads: int
    down: tuple[int, ...]  # image_down widths, input first
    out_dim: int
    recon_depth: int  # the unused reconstruction branch (`blocks`)
    recon_mlp_hidden: int


@dataclass(frozen=True)
class SeedDims:
    vit: VitDims | None  # None when the ViT weights are neither needed nor present
    qformer: QFormerDims
    decoder: DecoderDims

    @classmethod
    def real(cls) -> SeedDims:
        """The published SEED-Tokenizer-2 sizes (what MIO ships)."""
        return cls(
            vit=VitDims(width=1408, depth=39, mlp_hidden=6144, patch_size=14, num_patches=256, num_heads=16),
            qformer=QFormerDims(
                hidden=768, depth=12, ffn=3072, cross_attention_freq=2, encoder_width=1408,
                num_heads=12, num_queries=32,
            ),
            decoder=DecoderDims(
                task_hidden=768, codebook_size=8192, codebook_dim=32, decode_hidden=32, depth=4,
                mlp_hidden=3072, num_heads=12, down=(768, 256, 128, 32), out_dim=1024,
                recon_depth=4, recon_mlp_hidden=3072,
            ),
        )


@dataclass(frozen=True)
class HeadCounts:
    """What shapes cannot tell; comes from seed-tokenizer-2/config.json when present."""

    vit: int = 16
    qformer: int = 12
    decoder: int = 12
    vit_depth: int | None = None  # cap for a standalone eva_vit_g.pth holding extra blocks


# ---------------------------------------------------------------- key -> shape tables


def _ln(prefix: str, dim: int, names: tuple[str, str] = ("weight", "bias")) -> dict[str, Shape]:
    return {f"{prefix}.{names[0]}": (dim,), f"{prefix}.{names[1]}": (dim,)}


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> dict[str, Shape]:
    table: dict[str, Shape] = {f"{prefix}.weight": (out_dim, in_dim)}
    if bias:
        table[f"{prefix}.bias"] = (out_dim,)
    return table


def vit_shapes(v: VitDims, prefix: str = VIT_PREFIX) -> dict[str, Shape]:
    w = v.width
    table: dict[str, Shape] = {
        f"{prefix}cls_token": (1, 1, w),
        f"{prefix}pos_embed": (1, v.num_patches + 1, w),
        f"{prefix}patch_embed.proj.weight": (w, 3, v.patch_size, v.patch_size),
        f"{prefix}patch_embed.proj.bias": (w,),
    }
    for i in range(v.depth):
        b = f"{prefix}blocks.{i}."
        table |= _ln(b + "norm1", w)
        table[b + "attn.q_bias"] = (w,)
        table[b + "attn.v_bias"] = (w,)
        table |= _linear(b + "attn.qkv", 3 * w, w, bias=False)
        table |= _linear(b + "attn.proj", w, w)
        table |= _ln(b + "norm2", w)
        table |= _linear(b + "mlp.fc1", v.mlp_hidden, w)
        table |= _linear(b + "mlp.fc2", w, v.mlp_hidden)
    return table


def _block_shapes(prefix: str, depth: int, dim: int, mlp: int) -> dict[str, Shape]:
    table: dict[str, Shape] = {}
    for i in range(depth):
        b = f"{prefix}.{i}."
        table |= _ln(b + "norm1", dim)
        table |= _linear(b + "attn.qkv", 3 * dim, dim)
        table |= _linear(b + "attn.proj", dim, dim)
        table |= _ln(b + "norm2", dim)
        table |= _linear(b + "mlp.fc1", mlp, dim)
        table |= _linear(b + "mlp.fc2", dim, mlp)
    return table


def qformer_shapes(q: QFormerDims) -> dict[str, Shape]:
    h = q.hidden
    table = _ln(QF + "embeddings.LayerNorm", h)
    cross = set(q.cross_layers)
    for i in range(q.depth):
        b = f"{QF_LAYER}{i}."
        for kind in ("attention", "crossattention") if i in cross else ("attention",):
            kv_in = q.encoder_width if kind == "crossattention" else h
            table |= _linear(f"{b}{kind}.self.query", h, h)
            table |= _linear(f"{b}{kind}.self.key", h, kv_in)
            table |= _linear(f"{b}{kind}.self.value", h, kv_in)
            table |= _linear(f"{b}{kind}.output.dense", h, h)
            table |= _ln(f"{b}{kind}.output.LayerNorm", h)
        table |= _linear(b + "intermediate_query.dense", q.ffn, h)
        table |= _linear(b + "output_query.dense", h, q.ffn)
        table |= _ln(b + "output_query.LayerNorm", h)
    return table


def _encode_task_shapes(d: SeedDims) -> dict[str, Shape]:
    return _linear("encode_task_layer.0", d.decoder.task_hidden, d.qformer.hidden) | _linear(
        "encode_task_layer.2", d.decoder.codebook_dim, d.decoder.task_hidden
    )


def _decode_task_shapes(d: SeedDims) -> dict[str, Shape]:
    return _linear("decode_task_layer.0", d.decoder.decode_hidden, d.decoder.codebook_dim) | _linear(
        "decode_task_layer.2", d.qformer.hidden, d.decoder.decode_hidden
    )


def _decoder_tail_shapes(d: SeedDims) -> dict[str, Shape]:
    q, dec = d.qformer, d.decoder
    table = _block_shapes("blocks_image", dec.depth, q.hidden, dec.mlp_hidden)
    for n, (i, o) in enumerate(zip(dec.down[:-1], dec.down[1:], strict=True)):
        table |= _linear(f"image_down.{2 * n}", o, i, bias=False)
    return table | _linear("distill_image_proj", dec.out_dim, q.num_queries * dec.down[-1])


def encoder_head_shapes(d: SeedDims) -> dict[str, Shape]:
    """Everything of the encode path outside the ViT, ViT-side LayerNorm included."""
    q = d.qformer
    return (
        {"query_tokens": (1, q.num_queries, q.hidden)}
        | _ln("ln_vision", q.encoder_width)
        | qformer_shapes(q)
        | _encode_task_shapes(d)
    )


def codebook_shapes(d: SeedDims) -> dict[str, Shape]:
    return {"quantize.embedding.weight": (d.decoder.codebook_size, d.decoder.codebook_dim)}


def decoder_shapes(d: SeedDims) -> dict[str, Shape]:
    table: dict[str, Shape] = {"pos_embed_image": (1, d.qformer.num_queries, d.qformer.hidden)}
    return table | _decode_task_shapes(d) | _decoder_tail_shapes(d)


def recon_shapes(d: SeedDims) -> dict[str, Shape]:
    """The reconstruction branch: in the checkpoint, used by neither encode nor decode."""
    q, dec = d.qformer, d.decoder
    if dec.recon_depth == 0:
        return {}
    return {"pos_embed": (1, q.num_queries, q.hidden)} | _block_shapes(
        "blocks", dec.recon_depth, q.hidden, dec.recon_mlp_hidden
    )


POSITION_IDS = QF + "embeddings.position_ids"


def reference_shapes(d: SeedDims, max_positions: int = 512) -> dict[str, Shape]:
    """The reference module's whole state_dict, in its order (the real-size manifest)."""
    q, dec = d.qformer, d.decoder
    table: dict[str, Shape] = {"query_tokens": (1, q.num_queries, q.hidden)}
    if dec.recon_depth:
        table["pos_embed"] = (1, q.num_queries, q.hidden)
    table["pos_embed_image"] = (1, q.num_queries, q.hidden)
    if d.vit is not None:
        table |= vit_shapes(d.vit)
    table |= _ln("ln_vision", q.encoder_width)
    table[POSITION_IDS] = (1, max_positions)
    table |= qformer_shapes(q) | codebook_shapes(d) | _encode_task_shapes(d) | _decode_task_shapes(d)
    table |= _block_shapes("blocks", dec.recon_depth, q.hidden, dec.recon_mlp_hidden)
    return table | _decoder_tail_shapes(d)


# ---------------------------------------------------------------- reading sizes from shapes


def _indices(shapes: Mapping[str, Shape], prefix: str) -> list[int]:
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _get(shapes: Mapping[str, Shape], key: str, rank: int) -> Shape:
    if key not in shapes:
        raise LayoutError(missing=[key])
    shape = tuple(shapes[key])
    if len(shape) != rank:
        raise LayoutError(detail=f"{key} has shape {shape}, expected a {rank}-d tensor")
    return shape


def infer_vit(shapes: Mapping[str, Shape], heads: HeadCounts, prefix: str, from_eva_file: bool) -> VitDims:
    _, _, width = _get(shapes, prefix + "cls_token", 3)
    _, _, patch, patch_w = _get(shapes, prefix + "patch_embed.proj.weight", 4)
    if patch != patch_w:
        raise LayoutError(detail=f"{prefix}patch_embed.proj.weight has non-square patches {patch}x{patch_w}")
    _, tokens, _ = _get(shapes, prefix + "pos_embed", 3)
    blocks = _indices(shapes, prefix + "blocks.")
    if not blocks:
        raise LayoutError(missing=[prefix + "blocks.0.attn.qkv.weight"])
    depth = blocks[-1] + 1
    if heads.vit_depth is not None:
        depth = heads.vit_depth
    elif from_eva_file and width == EVA_G_WIDTH:
        depth = min(depth, EVA_G_DEPTH)
    mlp_hidden, _ = _get(shapes, prefix + "blocks.0.mlp.fc1.weight", 2)
    num_patches = tokens - 1
    if math.isqrt(num_patches) ** 2 != num_patches:
        raise LayoutError(detail=f"{prefix}pos_embed holds {tokens} positions, not a square grid plus CLS")
    return VitDims(width, depth, mlp_hidden, patch, num_patches, heads.vit)


def infer_dims(shapes: Mapping[str, Shape], vit: VitDims | None, heads: HeadCounts) -> SeedDims:
    """Sizes of everything but the ViT, from `seed_quantizer.pt` shapes."""
    _, num_queries, hidden = _get(shapes, "query_tokens", 3)
    layers = _indices(shapes, QF_LAYER)
    if not layers:
        raise LayoutError(missing=[QF_LAYER + "0.attention.self.query.weight"])
    depth = layers[-1] + 1
    ffn, _ = _get(shapes, QF_LAYER + "0.intermediate_query.dense.weight", 2)
    cross = [i for i in layers if any(k.startswith(f"{QF_LAYER}{i}.crossattention.") for k in shapes)]
    if not cross:
        raise LayoutError(missing=[QF_LAYER + "0.crossattention.self.key.weight"])
    freq = cross[1] - cross[0] if len(cross) > 1 else depth
    if cross[0] != 0 or cross != list(range(0, depth, freq)):
        raise LayoutError(
            detail=f"cross-attention sits in Q-Former layers {cross}, not in every n-th layer from 0"
        )
    _, encoder_width = _get(shapes, f"{QF_LAYER}0.crossattention.self.key.weight", 2)
    qformer = QFormerDims(hidden, depth, ffn, freq, encoder_width, heads.qformer, num_queries)

    codebook_size, codebook_dim = _get(shapes, "quantize.embedding.weight", 2)
    task_hidden, _ = _get(shapes, "encode_task_layer.0.weight", 2)
    decode_hidden, _ = _get(shapes, "decode_task_layer.0.weight", 2)
    image_blocks = _indices(shapes, "blocks_image.")
    if not image_blocks:
        raise LayoutError(missing=["blocks_image.0.attn.qkv.weight"])
    mlp_hidden, _ = _get(shapes, "blocks_image.0.mlp.fc1.weight", 2)
    down_idx = _indices(shapes, "image_down.")
    if not down_idx:
        raise LayoutError(missing=["image_down.0.weight"])
    down = [hidden]
    for n in range(down_idx[-1] // 2 + 1):
        out_dim, _ = _get(shapes, f"image_down.{2 * n}.weight", 2)
        down.append(out_dim)
    out_dim, _ = _get(shapes, "distill_image_proj.weight", 2)
    recon_blocks = _indices(shapes, "blocks.")
    recon_mlp = _get(shapes, "blocks.0.mlp.fc1.weight", 2)[0] if recon_blocks else 0
    decoder = DecoderDims(
        task_hidden, codebook_size, codebook_dim, decode_hidden, image_blocks[-1] + 1, mlp_hidden,
        heads.decoder, tuple(down), out_dim, recon_blocks[-1] + 1 if recon_blocks else 0, recon_mlp,
    )
    return SeedDims(vit=vit, qformer=qformer, decoder=decoder)


def check_heads(d: SeedDims) -> None:
    pairs = [("qformer_num_heads", d.qformer.hidden, d.qformer.num_heads),
             ("decoder_num_heads", d.qformer.hidden, d.decoder.num_heads)]
    if d.vit is not None:
        pairs.append(("vit_num_heads", d.vit.width, d.vit.num_heads))
    for name, width, heads in pairs:
        if heads <= 0 or width % heads:
            raise LayoutError(detail=f"{name}={heads} does not divide the width {width} found in the weights")


# ---------------------------------------------------------------- comparing a file with the table


# Keys the reference state dict may carry for the text side of BERT, which image
# tokenization never runs: accepted when their shapes fit, never loaded.
_TEXT_SIDE = re.compile(
    re.escape(QF)
    + r"(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight"
    + r"|encoder\.layer\.\d+\.(intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias))$"
)


def _text_side_ok(key: str, shape: Shape, q: QFormerDims) -> bool:
    if key.endswith("_embeddings.weight"):
        return len(shape) == 2 and shape[1] == q.hidden
    if ".intermediate.dense." in key:
        return shape in {(q.ffn, q.hidden), (q.ffn,)}
    if ".output.dense." in key:
        return shape in {(q.hidden, q.ffn), (q.hidden,)}
    return shape == (q.hidden,)


def check_quantizer(shapes: Mapping[str, Shape], d: SeedDims, vit_inside: bool) -> None:
    """Compare seed_quantizer.pt with the table its own shapes imply.

    Required: everything encode or decode runs (the ViT only when the file carries it).
    The reconstruction branch and position_ids are used by neither: accepted when absent,
    but a partial branch or a wrong shape is still an error.
    """
    required = encoder_head_shapes(d) | codebook_shapes(d) | decoder_shapes(d)
    if vit_inside:
        assert d.vit is not None
        if d.vit.width != d.qformer.encoder_width:
            raise LayoutError(detail=f"the ViT is {d.vit.width} wide but the Q-Former cross-attends "
                              f"to {d.qformer.encoder_width}-wide features")
        required |= vit_shapes(d.vit)
    recon = recon_shapes(d)
    optional: dict[str, Shape] = {POSITION_IDS: (1, shapes.get(POSITION_IDS, (1, 0))[-1])}
    if any(k in shapes for k in recon):
        required |= recon
    missing = [k for k in required if k not in shapes]
    unexpected, wrong = [], []
    for key, shape in shapes.items():
        shape = tuple(shape)
        want = required.get(key) or optional.get(key)
        if want is None:
            if _TEXT_SIDE.match(key) and _text_side_ok(key, shape, d.qformer):
                continue
            unexpected.append(key)
        elif shape != want:
            wrong.append((key, shape, want))
    if missing or unexpected or wrong:
        raise LayoutError(missing, unexpected, wrong)


_EVA_EXTRAS = re.compile(r"^(norm|fc_norm|head|lm_head|rel_pos_bias)\.")


def check_vit_file(shapes: Mapping[str, Shape], v: VitDims) -> list[str]:
    """Compare a standalone eva_vit_g.pth (no prefix) with the ViT; returns the keys to load.

    EVA releases carry heads, final norms and (for ViT-g) a 40th block that BLIP-2 drops;
    those are tolerated because the reference loads this file non-strictly too.
    """
    required = vit_shapes(v, prefix="")
    missing = [k for k in required if k not in shapes]
    unexpected, wrong = [], []
    for key, shape in shapes.items():
        want = required.get(key)
        if want is None:
            m = re.match(r"^blocks\.(\d+)\.", key)
            if (m and int(m.group(1)) >= v.depth) or _EVA_EXTRAS.match(key):
                continue
            unexpected.append(key)
        elif tuple(shape) != want:
            wrong.append((key, tuple(shape), want))
    if missing or unexpected or wrong:
        raise LayoutError(missing, unexpected, wrong)
    return list(required)
