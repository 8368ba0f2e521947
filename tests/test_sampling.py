"""The per-row sampler: seeds per prompt, top-p over the model's own distribution, then the rules."""

from __future__ import annotations

import torch

from miocli.core.generation import row_seed
from miocli.engines.base import GenerationSettings
from miocli.engines.transformers_processors import RowSampler


def ban(*tokens: int):
    """A decodable-output rule that forbids `tokens` (the shape of SegmentConstraint: ids, scores → scores)."""

    def rule(_input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, list(tokens)] = float("-inf")
        return scores

    return rule


def draws(sampler: RowSampler, logits: list[float], count: int) -> set[int]:
    chosen = set()
    ids = torch.zeros((1, 3), dtype=torch.long)
    for _ in range(count):
        out = sampler(ids, torch.tensor([logits]))
        chosen.add(int(out.argmax()))
    return chosen


def test_the_nucleus_is_taken_before_the_rules():
    # Token 0 (p≈0.5) and 1 (p≈0.4) form the 0.7 nucleus; 2 and 3 are the tail. The rule bans 1.
    logits = torch.tensor([0.5, 0.4, 0.06, 0.04]).log().tolist()
    settings = GenerationSettings(num_beams=1, do_sample=True, top_p=0.7)
    sampler = RowSampler([1], settings, ban(1))
    # Masking first would renormalise over {0, 2, 3} and let the tail into the nucleus.
    assert draws(sampler, logits, 200) == {0}


def test_when_the_rules_leave_nothing_of_the_nucleus_the_allowed_tokens_are_drawn():
    logits = torch.tensor([0.5, 0.4, 0.06, 0.04]).log().tolist()
    settings = GenerationSettings(num_beams=1, do_sample=True, top_p=0.7)
    assert draws(RowSampler([2], settings, ban(0, 1)), logits, 300) == {2, 3}


def test_rows_draw_from_their_own_streams():
    settings = GenerationSettings(num_beams=1, do_sample=True, top_p=None)
    logits = torch.zeros((3, 50))
    ids = torch.zeros((3, 2), dtype=torch.long)
    together = RowSampler([11, 12, 13], settings)(ids, logits.clone()).argmax(-1).tolist()
    alone = [int(RowSampler([seed], settings)(ids[:1], logits[:1].clone()).argmax()) for seed in (11, 12, 13)]
    assert together == alone


def test_row_seeds_depend_on_the_seed_the_prompt_and_the_sample_only():
    assert row_seed(1, [5, 6, 7]) == row_seed(1, [5, 6, 7])
    assert len({row_seed(1, [5, 6, 7]), row_seed(2, [5, 6, 7]), row_seed(1, [5, 6]), row_seed(1, [5, 6, 7], 1)}) == 4
    assert 0 <= row_seed(2**70, list(range(4000))) < 2**63
