"""The decodable-output rule as a vLLM (V1 model runner) logits processor.

Registered by class path, in-process `LLM(..., logits_processors=[MioRuleProcessor])` and on a
server `--logits-processors miocli.engines.vllm_processor:MioRuleProcessor`. A request turns it
on with the rule's JSON under `mio_rule` in `SamplingParams.extra_args` (the server's `vllm_xargs`);
requests without it are left alone. An invalid rule is refused (HTTP 400 from a server), which
is also how a client tells that a server has the processor at all.

Imported inside vLLM's worker processes: only torch, vLLM and the pure rule, no transformers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from miocli.engines.rules import XARG, Rule


@lru_cache(maxsize=64)
def _rule(text: str) -> tuple[Rule, dict[tuple[str, str, int], torch.Tensor]]:
    """The rule and its mask cache: every request of one run carries the same string, so it is
    parsed, and each of its masks built, once for all of them."""
    return Rule.from_json(text), {}


def _spec(params: Any) -> str | None:
    extra = getattr(params, "extra_args", None) or {}
    spec = extra.get(XARG)
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise ValueError(f"{XARG} must be the rule's JSON string")
    return spec


class _RequestRule:
    """One request's state: advanced over the ids generated since the last step."""

    def __init__(self, rule: Rule, masks: dict[tuple[str, str, int], torch.Tensor]) -> None:
        self.rule = rule
        self.state = rule.initial()
        self.seen = 0
        self.masks = masks

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self.seen :]:
            self.state = self.rule.advance(self.state, int(token))
        self.seen = len(output_ids)
        allowed = self.rule.allowed(self.state, self.seen)
        width = logits.shape[-1]
        key = (allowed.key, str(logits.device), width)
        banned = self.masks.get(key)
        if banned is None:
            banned = torch.full((width,), not allowed.complement, dtype=torch.bool, device=logits.device)
            ids = [i for i in allowed.ids if i < width]
            banned[torch.tensor(ids, dtype=torch.long, device=logits.device)] = allowed.complement
            self.masks[key] = banned
        return logits.masked_fill(banned, float("-inf"))


class MioRuleProcessor(AdapterLogitsProcessor):
    """vLLM's per-request adapter around `_RequestRule`."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        spec = _spec(sampling_params)
        if spec is not None:
            _rule(spec)

    def is_argmax_invariant(self) -> bool:
        # It bans tokens: greedy decoding must see it too.
        return False

    def new_req_logits_processor(self, params: Any) -> Any:
        spec = _spec(params)
        if spec is None:
            return None
        return _RequestRule(*_rule(spec))
