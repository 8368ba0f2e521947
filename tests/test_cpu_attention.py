"""The CPU decode attention and the in-place key/value cache (miocli.model.cpu_attention) against transformers'."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from miocli.model.cpu_attention import GrowingCache, attention


class GroupedLayer(torch.nn.Module):
    num_key_value_groups = 8
    is_causal = True


def test_one_query_attention_equals_sdpa_with_grouped_heads_and_padding():
    torch.manual_seed(0)
    query = torch.randn(2, 1, 32, 16).transpose(1, 2)  # the projections' layout: heads second by a transpose
    key, value = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :3] = False  # left padding of the first row
    ours, _ = attention(GroupedLayer(), query, key, value, mask)
    expected, _ = sdpa_attention_forward(GroupedLayer(), query, key, value, mask)
    assert ours.shape == expected.shape == (2, 1, 32, 16)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_growing_cache_holds_what_the_dynamic_cache_holds_through_reorder_and_crop():
    torch.manual_seed(0)
    ours, theirs = GrowingCache(), DynamicCache()
    for length in (5, 1, 1, 300, 1):  # the prompt, steps, and a growth past the spare positions
        key = torch.randn(2, length, 4, 8).transpose(1, 2)
        value = torch.randn(2, 4, length, 8)
        for got, want in zip(ours.update(key, value, 0), theirs.update(key, value, 0)):
            assert torch.equal(got, want)
    stored = ours.layers[0].stored[0]
    assert ours.layers[0].keys.data_ptr() == stored.data_ptr() and stored.shape[-2] > 308
    ours.reorder_cache(torch.tensor([1, 0]))  # beams: the next update rebuilds the storage from the new keys
    theirs.reorder_cache(torch.tensor([1, 0]))
    step = torch.randn(2, 4, 1, 8)
    assert torch.equal(ours.update(step, step, 0)[0], theirs.update(step, step, 0)[0])
    ours.crop(-3)
    theirs.crop(-3)
    assert torch.equal(ours.update(step, step, 0)[1], theirs.update(step, step, 0)[1])
    assert ours.get_seq_length() == theirs.get_seq_length() == 307
