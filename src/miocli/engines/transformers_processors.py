"""The transformers engine's hooks into `generate()`: the decodable-output rule, per-row seeded
sampling, and the per-step watch that streams and cancels rows.

`SegmentConstraint` is the rule (`miocli.engines.rules`) as a transformers `LogitsProcessor`, as
`miocli.engines.vllm_processor` is for vLLM; `RowSampler` gives each prompt its own random stream;
`RowWatch` is a stopping criterion that hands each row's new token to its prompt's callback and
stops the rows whose answers are no longer wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from miocli.engines.base import Cancelled, GenerationSettings
from miocli.engines.rules import MediaVocabulary, Rule, SegmentState

if TYPE_CHECKING:
    import torch


class SegmentConstraint:
    """The decodable-output rule (miocli.engines.rules) as a transformers logits processor.

    Each row's state is replayed from its new tokens (cached by prefix, since beam search reorders
    rows every step); disallowed tokens get -inf.
    """

    def __init__(
        self,
        vocab: MediaVocabulary,
        prompt_length: int,
        max_new_tokens: int,
        *,
        force_first: int | None = None,
        allow_images: bool = True,
        allow_speech: bool = True,
        max_content_tokens: int | None = None,
        start_in_image: bool = False,
        rule: Rule | None = None,
    ) -> None:
        self.vocab = vocab
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.rule = rule if rule is not None else vocab.rule(
            max_new_tokens, force_first=force_first, allow_images=allow_images, allow_speech=allow_speech,
            max_content_tokens=max_content_tokens, start_in_image=start_in_image)
        self.initial = self.rule.initial()
        self._states: dict[bytes, SegmentState] = {}
        self._masks: dict[str, torch.Tensor] = {}

    def advance(self, state: SegmentState, token: int) -> SegmentState:
        return self.rule.advance(state, token)

    def _state_of(self, row: Any) -> SegmentState:
        generated = row[self.prompt_length :]
        key = generated.tobytes()
        state = self._states.get(key)
        if state is not None:
            return state
        previous = self._states.get(generated[:-1].tobytes()) if len(generated) else None
        if previous is not None:
            state = self.rule.advance(previous, int(generated[-1]))
        else:
            state = self.rule.state_after(generated)
        self._states[key] = state
        return state

    def allowed(self, state: SegmentState, generated: int, device: torch.device, width: int) -> torch.Tensor:
        """A cached boolean mask over the vocabulary of what may follow `state`."""
        allowed = self.rule.allowed(state, generated)
        key = f"{allowed.key}:{device}:{width}"
        if key not in self._masks:
            import torch

            mask = torch.full((width,), allowed.complement, dtype=torch.bool, device=device)
            ids = [i for i in allowed.ids if i < width]
            mask[torch.tensor(ids, dtype=torch.long, device=device)] = not allowed.complement
            self._masks[key] = mask
        return self._masks[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.cpu().numpy()
        generated = rows.shape[1] - self.prompt_length
        # Keep only this step's states: beams are reordered every step, the prefixes are not.
        live: dict[bytes, SegmentState] = {}
        width = scores.shape[-1]
        for i, row in enumerate(rows):
            state = self._state_of(row)
            live[row[self.prompt_length :].tobytes()] = state
            allowed = self.allowed(state, generated, scores.device, width)
            scores[i] = scores[i].masked_fill(~allowed, float("-inf"))
        self._states = live
        return scores


class RowSampler:
    """Samples each row's next token with that row's own generator, after temperature and top-p.

    Placed last among the logits processors of a greedy generate() call: it leaves only the
    sampled token finite, so the greedy argmax takes it. transformers' own sampling draws every
    row from one shared random stream, which ties a row's answer to its batch neighbours.

    The decodable-output `constraint` is applied after temperature and top-p, as a filter on the
    nucleus the unconstrained model would sample from (the reference has no constraint): a token
    the reference could draw within the rules keeps its relative odds. When no token of the
    nucleus is allowed, the allowed tokens are drawn from at their temperature-scaled odds.
    """

    def __init__(self, seeds: Sequence[int], settings: GenerationSettings, constraint: Any = None) -> None:
        self.seeds = list(seeds)
        self.settings = settings
        self.constraint = constraint
        self.generators: list[Any] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        if not self.generators:
            # On the scores' device: a CUDA row draws from a CUDA generator, without a copy to the CPU.
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        scaled = scores.float() / self.settings.temperature
        scores = scaled
        top_p = self.settings.top_p
        if top_p is not None and top_p < 1.0:
            # The same rule as transformers' TopPLogitsWarper: drop the low tail whose mass is at
            # most 1 - top_p, always keeping the most likely token.
            ordered, order = torch.sort(scaled, descending=False, dim=-1)
            tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
            tail[..., -1:] = False
            scores = scaled.masked_fill(tail.scatter(1, order, tail), float("-inf"))
        if self.constraint is not None:
            allowed = self.constraint(input_ids, scaled.clone())
            nucleus = scores.masked_fill(allowed == float("-inf"), float("-inf"))
            empty = torch.isinf(nucleus).all(dim=-1, keepdim=True)
            scores = torch.where(empty, allowed, nucleus)
        probabilities = scores.softmax(dim=-1)
        chosen = torch.cat([torch.multinomial(probabilities[row], 1, generator=generator)
                            for row, generator in enumerate(self.generators)])
        only = torch.full_like(scores, float("-inf"))
        return only.scatter(1, chosen.unsqueeze(1), 0.0)


class RowWatch:
    """A stopping criterion called after every step with the rows so far.

    Without beams, row i is prompt `prompts[i]`: its newest token goes to `on_tokens` until it has
    stopped. A row whose prompt is `cancelled` is reported finished, so transformers pads it from
    then on and the batch ends as soon as the rows still wanted do; when none is wanted the whole
    call ends at once (`Cancelled`). With beams, transformers passes the candidate rows of every
    prompt in turn (a fixed number per prompt): a cancelled prompt's candidates all stop.
    """

    def __init__(self, prompts: Sequence[int], stop_id: int, *, beams: bool,
                 on_tokens: Any = None, cancelled: Any = None) -> None:
        self.prompts = list(prompts)
        self.stop_id = stop_id
        self.beams = beams
        self.on_tokens = None if beams else on_tokens
        self.cancelled = cancelled
        self.stopped = [False] * len(self.prompts)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> torch.BoolTensor:
        import torch

        gone = [bool(self.cancelled(n)) for n in self.prompts] if self.cancelled is not None \
            else [False] * len(self.prompts)
        if all(gone):
            raise Cancelled
        if self.on_tokens is not None:
            newest = input_ids[:, -1].tolist()
            for row, token in enumerate(newest):
                if self.stopped[row] or gone[row]:
                    continue
                if token == self.stop_id:
                    self.stopped[row] = True
                else:
                    self.on_tokens(self.prompts[row], [int(token)])
        per_prompt = max(1, input_ids.shape[0] // len(self.prompts))
        done = torch.tensor([gone[row // per_prompt] for row in range(input_ids.shape[0])], dtype=torch.bool)
        return done.to(input_ids.device)
