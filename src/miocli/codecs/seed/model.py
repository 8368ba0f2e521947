"""SEED-Tokenizer-2: image -> 32 codebook ids, and ids -> unCLIP image embedding.

Loading never initialises weights and never holds two copies: modules are built on the
meta device, the checkpoint is memory-mapped, and each tensor is assigned in place (on a
CPU float32 load the parameters are the mapped file pages themselves).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError, ModelError
from ..weights import CHECK_HINT, format_keys, read_tensor_file
from . import layout
from .layout import HeadCounts, LayoutError, SeedDims, VitDims
from .qformer import QFormer
from .vit import Block, EvaViT

QUANTIZER_FILE = "seed_quantizer.pt"
VIT_FILE = "eva_vit_g.pth"
CONFIG_FILE = "config.json"
PARTS = frozenset({"encoder", "decoder"})

_GET_WEIGHTS_HINT = (
    "put the MIO checkpoint's seed-tokenizer-2 folder there (it comes with m-a-p/MIO-7B-Instruct "
    "and m-a-p/MIO-7B-Base)"
)


class _Codebook(nn.Module):
    # not nn.Embedding: its init calls normal_, which on the meta device costs a one-off
    # ~1.5 s import inside torch
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class _Quantize(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = _Codebook(size, dim)


class SeedModel(nn.Module):
    """The parts of Blip2QformerQuantizer that tokenization and embedding use.

    Attribute names equal the reference state-dict names; the reconstruction branch
    (`blocks`, `pos_embed`) and BERT's text side are never built.
    """

    def __init__(self, dims: SeedDims, parts: frozenset[str] = PARTS) -> None:
        super().__init__()
        q, dec = dims.qformer, dims.decoder
        self.dims = dims
        self.parts = parts
        self.quantize = _Quantize(dec.codebook_size, dec.codebook_dim)
        if "encoder" in parts:
            if dims.vit is None:
                raise ValueError("the encoder needs ViT dimensions")
            self.visual_encoder = EvaViT(dims.vit)
            self.ln_vision = nn.LayerNorm(q.encoder_width, eps=1e-5)
            self.query_tokens = nn.Parameter(torch.empty(1, q.num_queries, q.hidden))
            self.Qformer = QFormer(q)
            self.encode_task_layer = nn.Sequential(
                nn.Linear(q.hidden, dec.task_hidden), nn.Tanh(), nn.Linear(dec.task_hidden, dec.codebook_dim)
            )
        if "decoder" in parts:
            self.decode_task_layer = nn.Sequential(
                nn.Linear(dec.codebook_dim, dec.decode_hidden),
                nn.Tanh(),
                nn.Linear(dec.decode_hidden, q.hidden),
            )
            self.pos_embed_image = nn.Parameter(torch.empty(1, q.num_queries, q.hidden))
            self.blocks_image = nn.ModuleList(
                Block(q.hidden, dec.num_heads, dec.mlp_hidden, eva=False) for _ in range(dec.depth)
            )
            down: list[nn.Module] = []
            for i, o in zip(dec.down[:-1], dec.down[1:], strict=True):
                down += [nn.Linear(i, o, bias=False), nn.ReLU()]
            self.image_down = nn.Sequential(*down[:-1])
            self.distill_image_proj = nn.Linear(q.num_queries * dec.down[-1], dec.out_dim)

    # -- encode path, split so that intermediates can be compared with the reference

    def vit_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_vision(self.visual_encoder(pixels))

    def qformer_out(self, image: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        return self.Qformer(queries, image)

    def nearest_ids(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row by squared L2, computed in float32."""
        flat = z.reshape(-1, z.shape[-1]).float()
        codebook = self.quantize.embedding.weight.float()
        dist = (
            flat.pow(2).sum(1, keepdim=True)
            + codebook.pow(2).sum(1)
            - 2.0 * flat @ codebook.t()
        )
        return dist.argmin(dim=1).view(z.shape[:-1])

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.decode_task_layer(self.quantize.embedding(ids)) + self.pos_embed_image
        for block in self.blocks_image:
            x = block(x)
        return self.distill_image_proj(self.image_down(x).flatten(1))


@dataclass(frozen=True)
class SeedTrace:
    """Intermediates of one encode, for comparison with the reference."""

    vit_ln: torch.Tensor  # (b, 257, vit width): ln_vision(visual_encoder(x))
    qformer_out: torch.Tensor  # (b, 32, hidden)
    encode_task_out: torch.Tensor  # (b, 32, codebook dim): the vectors that are quantized
    ids: torch.Tensor  # (b, 32) int64


class SeedCodec:
    """Image tokenizer of MIO: pixels -> 32 ids, and ids -> 1024-d unCLIP image embedding."""

    def __init__(self, model: SeedModel, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        dims = model.dims
        self.num_tokens: int = dims.qformer.num_queries
        self.codebook_size: int = dims.decoder.codebook_size
        self.embed_dim: int = dims.decoder.out_dim
        self.image_size: int = dims.vit.image_size if dims.vit is not None else 224

    @property
    def dims(self) -> SeedDims:
        return self.model.dims

    @property
    def parts(self) -> frozenset[str]:
        return self.model.parts

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        parts: frozenset[str] = PARTS,
        heads: HeadCounts | None = None,
    ) -> SeedCodec:
        """Load `<model dir>/seed-tokenizer-2`. `heads` overrides config.json (tests, tools)."""
        parts = frozenset(parts)
        if not parts or not parts <= PARTS:
            raise ValueError(f"parts must be a non-empty subset of {sorted(PARTS)}, got {sorted(parts)}")
        folder = Path(folder)
        device = torch.device(device)
        model = _build(folder, parts, heads if heads is not None else read_heads(folder), device, dtype)
        return cls(model, device, dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _need(self, part: str) -> None:
        if part not in self.model.parts:
            raise RuntimeError(f"this SeedCodec was loaded without the {part} (parts={sorted(self.parts)})")

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = torch.as_tensor(pixels)
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be (batch, 3, {size}, {size}), got {tuple(pixels.shape)}")
        return pixels.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def trace(self, pixels: torch.Tensor) -> SeedTrace:
        self._need("encoder")
        m = self.model
        vit_ln = m.vit_features(self._pixels(pixels))
        qformer_out = m.qformer_out(vit_ln)
        z = m.encode_task_layer(qformer_out)
        return SeedTrace(vit_ln, qformer_out, z, m.nearest_ids(z).cpu())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, 3, 224, 224) normalised pixels -> (b, 32) int64 ids on the CPU."""
        return self.trace(pixels).ids

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, 32) ids -> (b, 1024) float32 image embedding on the codec's device."""
        self._need("decoder")
        ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise InputError(
                f"an image needs exactly {self.num_tokens} image tokens, got {ids.shape[-1]}",
                hint="the model output an incomplete <image> segment; try generating again",
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.codebook_size)
        if bad.any():
            raise InputError(
                f"image token id {int(ids[bad][0])} is outside the codebook (0..{self.codebook_size - 1})",
                hint="the image segment is malformed",
            )
        return self.model.decode(ids.to(device=self.device, dtype=torch.long)).float()


# ---------------------------------------------------------------- loading


def read_heads(folder: Path) -> HeadCounts:
    """Head counts (not visible in shapes) from the optional config.json; real values otherwise."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return HeadCounts()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}", hint="fix or delete the file") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path} must hold a JSON object", hint="fix or delete the file")
    names = {"vit_num_heads": "vit", "qformer_num_heads": "qformer", "decoder_num_heads": "decoder",
             "vit_depth": "vit_depth"}
    values: dict[str, int] = {}
    for key, field in names.items():
        if key in raw:
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(f"{path}: {key} must be a positive integer, got {value!r}",
                                 hint="fix or delete the file")
            values[field] = value
    return replace(HeadCounts(), **values)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    return read_tensor_file(path, hint=f"{path.name} is corrupt or incomplete: download it again "
                            f"(`mio download`); {CHECK_HINT}")


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def check_folder(folder: Path, heads: HeadCounts | None = None) -> tuple[SeedDims, frozenset[str]]:
    """Check `<model dir>/seed-tokenizer-2` as a load would, without building the model.

    Both files are read with weights_only (memory-mapped, so the tensor data is not read) and
    every key, shape and dtype is checked against the modules the codec builds. Returns the
    dimensions and the parts the files can serve: the encoder needs the EVA-ViT weights, inside
    seed_quantizer.pt or in eva_vit_g.pth. Raises ModelError naming the file.
    """
    folder = Path(folder)
    state, dims, parts = _checked_state(folder, None, heads if heads is not None else read_heads(folder))
    with torch.device("meta"):
        model = SeedModel(dims, parts)
    _check_tensors(state, model, folder / QUANTIZER_FILE)
    return dims, parts


def _check_tensors(state: Mapping[str, torch.Tensor], model: SeedModel, path: Path) -> None:
    """Every tensor the built model takes from `state` is there, of its shape, a float where it is one."""
    missing: list[str] = []
    wrong: list[str] = []
    for key, meta in model.state_dict(keep_vars=True).items():
        tensor = state.get(key)
        if tensor is None:
            missing.append(key)
        elif tuple(tensor.shape) != tuple(meta.shape):
            wrong.append(f"{key} {tuple(tensor.shape)} (expected {tuple(meta.shape)})")
        elif meta.is_floating_point() and not tensor.is_floating_point():
            wrong.append(f"{key} is {tensor.dtype}, not a float tensor")
    if missing or wrong:
        found = [f"missing keys: {format_keys(missing)}"] if missing else []
        found += [f"wrong tensors: {format_keys(wrong)}"] if wrong else []
        raise ModelError(f"{path} is not a SEED-Tokenizer-2 checkpoint: {'; '.join(found)}",
                         hint=f"download seed-tokenizer-2/seed_quantizer.pt again; {CHECK_HINT}")


def _checked_state(
    folder: Path, parts: frozenset[str] | None, heads: HeadCounts
) -> tuple[dict[str, torch.Tensor], SeedDims, frozenset[str]]:
    """The checked tensors (ViT included when the encoder is asked for), the dimensions they imply and
    the parts checked; `parts` None: every part the files hold."""
    quantizer_path = folder / QUANTIZER_FILE
    if not quantizer_path.is_file():
        raise ModelError(f"SEED image tokenizer weights not found: {quantizer_path}", hint=_GET_WEIGHTS_HINT)
    state = _read_state(quantizer_path)
    shapes = _shapes(state)
    vit_inside = any(k.startswith(layout.VIT_PREFIX) for k in state)
    if parts is None:
        parts = PARTS if vit_inside or (folder / VIT_FILE).is_file() else frozenset({"decoder"})

    vit_state: Mapping[str, torch.Tensor] | None = None
    vit_path = quantizer_path
    vit_dims: VitDims | None = None
    try:
        if vit_inside:
            vit_dims = layout.infer_vit(shapes, heads, layout.VIT_PREFIX, from_eva_file=False)
        elif "encoder" in parts:
            vit_path = folder / VIT_FILE
            if not vit_path.is_file():
                raise ModelError(
                    f"the EVA-ViT-g image encoder weights are missing: {quantizer_path} holds no "
                    f"visual_encoder.* tensors and {vit_path} does not exist",
                    hint=f"put BLIP-2's eva_vit_g.pth at {vit_path} (mio never downloads it on its own)",
                )
            vit_state = _read_state(vit_path)
            vit_dims = layout.infer_vit(_shapes(vit_state), heads, "", from_eva_file=True)
        dims = layout.infer_dims(shapes, vit_dims, heads)
        layout.check_heads(dims)
        layout.check_quantizer(shapes, dims, vit_inside)
    except LayoutError as exc:
        raise ModelError(f"{quantizer_path} is not a SEED-Tokenizer-2 checkpoint: {exc.describe()}",
                         hint=f"download seed-tokenizer-2/seed_quantizer.pt again; {CHECK_HINT}") from exc

    if vit_state is not None:
        assert vit_dims is not None
        if vit_dims.width != dims.qformer.encoder_width:
            raise ModelError(
                f"{vit_path} holds a ViT of width {vit_dims.width} but the Q-Former in "
                f"{quantizer_path} expects {dims.qformer.encoder_width}",
                hint="use the eva_vit_g.pth that belongs to this checkpoint",
            )
        try:
            vit_keys = layout.check_vit_file(_shapes(vit_state), vit_dims)
        except LayoutError as exc:
            raise ModelError(f"{vit_path} is not an EVA-ViT-g checkpoint: {exc.describe()}",
                             hint=f"download BLIP-2's eva_vit_g.pth again; {CHECK_HINT}") from exc
        state = {**state, **{layout.VIT_PREFIX + k: vit_state[k] for k in vit_keys}}
    return state, dims, parts


def _build(folder: Path, parts: frozenset[str], heads: HeadCounts, device: torch.device,
           dtype: torch.dtype) -> SeedModel:
    state, dims, _ = _checked_state(folder, parts, heads)
    with torch.device("meta"):
        model = SeedModel(dims, parts)
    _check_tensors(state, model, folder / QUANTIZER_FILE)
    wanted = model.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, meta in wanted.items():
        tensor = state[key]
        target = dtype if tensor.is_floating_point() else meta.dtype
        # a no-op for a CPU load in the file's own dtype: the parameter stays the mapped page
        tensors[key] = tensor.to(device=device, dtype=target)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()
