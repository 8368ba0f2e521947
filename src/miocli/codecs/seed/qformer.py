"""The SEED Q-Former: a BERT encoder run on 32 learned queries only.

Only the query path exists here (no text embeddings, no text feed-forward): image
tokenization never feeds text. Attribute names mirror the checkpoint keys
(`attention.self.query`, `crossattention.output.LayerNorm`, `intermediate_query.dense`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import QFormerDims

# BERT's masking constant; the reference adds it rather than -inf, and that is what the
# golden numbers were made with (exp(-1e4) underflows to 0 in every float format anyway).
MASKED = -10000.0
LN_EPS = 1e-12


class _Projections(nn.Module):
    def __init__(self, hidden: int, kv_width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class _Output(nn.Module):
    """dense -> add residual -> LayerNorm (BERT post-norm)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, kv_width: int, num_heads: int) -> None:
        super().__init__()
        # "self" is the checkpoint's name for the projections; setattr keeps it legible.
        setattr(self, "self", _Projections(hidden, kv_width, num_heads))  # noqa: B010
        self.output = _Output(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        projections: _Projections = getattr(self, "self")  # noqa: B009
        return self.output(projections(x, context, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, dims: QFormerDims, cross: bool) -> None:
        super().__init__()
        h = dims.hidden
        self.attention = _Attention(h, h, dims.num_heads)
        self.crossattention = _Attention(h, dims.encoder_width, dims.num_heads) if cross else None
        self.intermediate_query = _Intermediate(h, dims.ffn)
        self.output_query = _Output(dims.ffn, h)

    def forward(self, x: torch.Tensor, image: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, causal)
        if self.crossattention is not None:
            # every image token is visible (the reference's all-ones image mask)
            x = self.crossattention(x, image, None)
        return self.output_query(self.intermediate_query(x), x)


class _Embeddings(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)


class _Encoder(nn.Module):
    def __init__(self, dims: QFormerDims) -> None:
        super().__init__()
        cross = set(dims.cross_layers)
        self.layer = nn.ModuleList(QFormerLayer(dims, i in cross) for i in range(dims.depth))


class _Bert(nn.Module):
    def __init__(self, dims: QFormerDims) -> None:
        super().__init__()
        self.embeddings = _Embeddings(dims.hidden)
        self.encoder = _Encoder(dims)


class QFormer(nn.Module):
    def __init__(self, dims: QFormerDims) -> None:
        super().__init__()
        self.dims = dims
        self.bert = _Bert(dims)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """queries (b, q, hidden), image features (b, n, encoder_width) -> (b, q, hidden)."""
        n = queries.shape[1]
        # The reference switches to causal masking when it is given exactly the query
        # embeddings and no text, so query i only sees queries 0..i.
        causal = torch.full((n, n), MASKED, dtype=queries.dtype, device=queries.device).triu(1)
        x = self.bert.embeddings.LayerNorm(queries)
        for layer in self.bert.encoder.layer:
            x = layer(x, image, causal)
        return x
