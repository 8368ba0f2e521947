"""EVA-ViT-g image encoder and the plain ViT blocks of the embedding decoder.

Attribute names mirror the checkpoint keys so that a state dict loads without renaming.
Modules are meant to be built on the meta device and filled with `assign=True`, so no
constructor here initialises anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import VitDims


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exact (erf) GELU: both EVA and timm use nn.GELU's default
        return self.fc2(F.gelu(self.fc1(x)))


def _attend(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, n, 3c) packed projections -> (b, n, c) attention output before the out-projection."""
    b, n, three_c = qkv.shape
    c = three_c // 3
    q, k, v = qkv.view(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, c)


class EvaAttention(nn.Module):
    """EVA attention: the qkv projection has no bias of its own; q and v get learned biases
    and k none (a key bias would shift every logit of a row equally, so it is left out)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.empty(dim))
        self.v_bias = nn.Parameter(torch.empty(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return self.proj(_attend(F.linear(x, self.qkv.weight, bias), self.num_heads))


class Attention(nn.Module):
    """timm-style attention with a biased packed qkv projection (the decoder's blocks)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_attend(self.qkv(x), self.num_heads))


class Block(nn.Module):
    """Pre-norm transformer block; LayerNorm eps 1e-6 in both EVA and the decoder."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eva: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn: nn.Module = EvaAttention(dim, num_heads) if eva else Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class EvaViT(nn.Module):
    """EVA-ViT-g as BLIP-2 uses it: absolute position embedding, no final norm, no head."""

    def __init__(self, dims: VitDims) -> None:
        super().__init__()
        self.dims = dims
        self.cls_token = nn.Parameter(torch.empty(1, 1, dims.width))
        self.pos_embed = nn.Parameter(torch.empty(1, dims.num_patches + 1, dims.width))
        self.patch_embed = PatchEmbed(dims.width, dims.patch_size)
        self.blocks = nn.ModuleList(
            Block(dims.width, dims.num_heads, dims.mlp_hidden, eva=True) for _ in range(dims.depth)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x
