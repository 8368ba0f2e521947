"""Attention for the LLM on the CPU: torch's fused kernel for prompts, two plain matrix products for a generated token,
over a key/value cache that grows in place.

Why the attention: for one query, torch's CPU scaled_dot_product_attention (its flash kernel) reads the cached
keys and values at about 5 GB/s. Measured at MIO-7B's shapes (32 query heads of 128) on 2 cores, one layer over 576
cached positions takes 2.1 ms in it and 0.34 ms as q·Kᵀ, a float32 softmax and ·V, the way transformers' eager
attention computes it. Over 32 layers that is 56 ms of a 4-bit step of about 200 ms. Prompts (more than one query)
keep the fused kernel, which is the faster one there.

Why the cache (GrowingCache): transformers' DynamicCache concatenates every step, which copies the whole cache,
and the concatenation keeps the layout of the projections, positions outermost, in which q·Kᵀ copies the keys
again (measured: 67 ms of copies a step at 512 positions). GrowingCache keeps each layer in (batch, heads,
capacity, dim) storage, grown by a quarter when full, and hands out views of the filled part.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

NAME = "mio_cpu"


def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (batch, heads, queries, dim), key and value (batch, kv heads,
    positions, dim); the output is (batch, queries, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or query.device.type != "cpu" or dropout or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Grouped-query attention without repeating the keys (a copy of the whole cache per layer and step): the
    # query heads that share a key head are the rows of one product.
    batch, heads, _, dim = query.shape
    shared = key.shape[1]
    grouped = query.reshape(batch, shared, heads // shared, dim)
    scale = scaling if scaling is not None else dim ** -0.5
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).reshape(batch, heads, 1, dim)
    return output.transpose(1, 2).contiguous(), None


def use_on_cpu(model: Any) -> None:
    """Give `model` (a transformers LLM on the CPU that uses sdpa) this attention; other models are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the same masks as sdpa
    model.set_attn_implementation(NAME)


class GrowingLayer(DynamicLayer):
    """One layer of GrowingCache: `keys` and `values` are views of the first positions of larger storage."""

    # Positions added beyond need when the storage grows: a quarter more, at least this many.
    SPARE_POSITIONS = 256

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.stored: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        stored = self.stored
        # storage to (re)make: none yet, too small, or `keys` replaced (beam reordering, batch selection)
        if (stored is None or stored[0].shape[-2] < end or stored[0].shape[:-2] != key_states.shape[:-2]
                or (length and self.keys.data_ptr() != stored[0].data_ptr())):
            capacity = end + max(self.SPARE_POSITIONS, end // 4)
            stored = tuple(torch.empty((*states.shape[:-2], capacity, states.shape[-1]), dtype=states.dtype,
                                       device=states.device) for states in (key_states, value_states))
            if length:
                stored[0][..., :length, :].copy_(self.keys)
                stored[1][..., :length, :].copy_(self.values)
            self.stored = stored
        stored[0][..., length:end, :].copy_(key_states)
        stored[1][..., length:end, :].copy_(value_states)
        self.keys, self.values = stored[0][..., :end, :], stored[1][..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self.stored = None
        super().reset()


class GrowingCache(DynamicCache):
    """transformers' dynamic cache with GrowingLayer layers (full attention only, as MIO's LLM has)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
