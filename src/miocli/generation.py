"""Generation presets (MIO_PROTOCOL §8), user overrides, batching and decodable-output constraints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from miocli import protocol

# The rule itself lives in miocli.engines.rules (pure, shared with the vLLM engines); its names stay importable here.
from miocli.engines.rules import (
    IMAGE,
    IMAGE_SEGMENT_TOKENS,
    SHORTEST_SPEECH_TOKENS,
    SPEECH,
    TEXT,  # noqa: F401
    Rule,
    SegmentState,
)
from miocli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from miocli.tokenizer import MioTokenizer


@dataclass(frozen=True)
class GenerationSettings:
    num_beams: int = 5
    do_sample: bool = False
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float | None = None
    max_new_tokens: int = 512
    length_penalty: float = 1.0
    # How finished beams are length-normalised: "answer" (transformers >= 4.35: by the answer's length)
    # or "reference" (the reference's pinned 4.34: by prompt + padding + answer, which favours shorter
    # answers; the paper's numbers were made that way).
    beam_scoring: str = "answer"


PRESETS: dict[str, GenerationSettings] = {
    "text": GenerationSettings(num_beams=5, do_sample=False, repetition_penalty=1.0),
    "image": GenerationSettings(num_beams=5, do_sample=False, repetition_penalty=1.15, top_p=0.7),
    "tts": GenerationSettings(num_beams=1, do_sample=True, repetition_penalty=1.15, top_p=0.7, max_new_tokens=2048),
    "spoken": GenerationSettings(num_beams=5, do_sample=False, repetition_penalty=2.0, top_p=0.7, max_new_tokens=2048),
    "s2s": GenerationSettings(num_beams=5, do_sample=False, repetition_penalty=1.15, top_p=0.7, max_new_tokens=2048),
    "video_gen": GenerationSettings(
        num_beams=1, do_sample=True, repetition_penalty=1.15, top_p=0.7, max_new_tokens=1024
    ),
    "interleave": GenerationSettings(
        num_beams=1, do_sample=True, repetition_penalty=1.15, top_p=0.7, max_new_tokens=1024
    ),
}


BEAM_SCORINGS = ("answer", "reference")


@dataclass(frozen=True)
class GenerationOverrides:
    """What the user set on the command line; None keeps the task's preset."""

    num_beams: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    beam_scoring: str | None = None

    def validate(self) -> None:
        if self.beam_scoring is not None and self.beam_scoring not in BEAM_SCORINGS:
            raise UsageError(f"unknown --beam-scoring {self.beam_scoring!r}", hint="use answer or reference")
        if self.num_beams is not None and self.num_beams < 1:
            raise UsageError("--beams must be at least 1")
        if self.temperature is not None and self.temperature <= 0:
            raise UsageError("--temperature must be above 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError("--top-p must be in (0, 1]")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise UsageError("--repetition-penalty must be above 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")

    def apply(self, preset: GenerationSettings) -> GenerationSettings:
        changes = {k: v for k, v in vars(self).items() if v is not None}
        return replace(preset, **changes)


def hf_generate_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_beams": settings.num_beams,
        "do_sample": settings.do_sample,
        "repetition_penalty": settings.repetition_penalty,
        "max_new_tokens": settings.max_new_tokens,
        "length_penalty": settings.length_penalty,
    }
    if settings.do_sample:
        kwargs["temperature"] = settings.temperature
        kwargs["top_k"] = 0
        if settings.top_p is not None:
            kwargs["top_p"] = settings.top_p
    return kwargs


# ---- constraints ------------------------------------------------------------------------------
DONE = "done"


def minimum_new_tokens(output: str, *, prefill: str = "") -> int:
    """The fewest new tokens in which an answer of kind `output` can hold one whole segment.

    `prefill` is text the prompt already ends with: a prompt pre-filled with `<image>` has
    opened the segment, so one token less. Text and mixed answers need no minimum (1).
    """
    if output == IMAGE:
        return IMAGE_SEGMENT_TOKENS - (1 if prefill == protocol.IMAGE_BEGIN else 0)
    if output == SPEECH:
        return SHORTEST_SPEECH_TOKENS
    return 1


def check_room_for_output(settings: GenerationSettings, output: str, task_name: str, *, prefill: str = "") -> None:
    """UsageError when --max-new-tokens cannot hold the segment an image or speech task must produce."""
    if output not in (IMAGE, SPEECH):
        return
    needed = minimum_new_tokens(output, prefill=prefill)
    if settings.max_new_tokens < needed:
        what = {IMAGE: "an image", SPEECH: "the shortest speech"}[output]
        raise UsageError(
            f"--max-new-tokens {settings.max_new_tokens} is too small for {task_name}: {what} takes at "
            f"least {needed} new tokens",
            hint=f"pass --max-new-tokens {needed} or more, or leave it out for the task's default",
        )


class MediaVocabulary:
    """Ids of the multimodal tokens, looked up by string (never hard-coded)."""

    def __init__(self, tokenizer: MioTokenizer) -> None:
        self.image_begin = tokenizer.token_to_id(protocol.IMAGE_BEGIN)
        self.image_end = tokenizer.token_to_id(protocol.IMAGE_END)
        self.speech_begin = tokenizer.token_to_id(protocol.SPEECH_BEGIN)
        self.speech_end = tokenizer.token_to_id(protocol.SPEECH_END)
        self.image_ids = [tokenizer.token_to_id(f"<img{i}>") for i in range(protocol.IMAGE_CODEBOOK_SIZE)]
        size = protocol.SPEECH_CODEBOOK_SIZE
        self.speech_part_ids = [
            [tokenizer.token_to_id(f"<spch{k * size + i}>") for i in range(size)]
            for k in range(protocol.SPEECH_LAYERS_IN_OUTPUT)
        ]
        self.image_id_set = set(self.image_ids)
        self.speech_part_of = {tid: k for k, ids in enumerate(self.speech_part_ids) for tid in ids}
        self.vocab_size = tokenizer.vocab_size

    def rule(self, max_new_tokens: int, *, force_first: int | None = None, allow_images: bool = True,
             allow_speech: bool = True, max_content_tokens: int | None = None,
             start_in_image: bool = False) -> Rule:
        """The decodable-output rule over these ids for one generation."""
        return Rule(self.image_begin, self.image_end, self.speech_begin, self.speech_end, tuple(self.image_ids),
                    tuple(tuple(p) for p in self.speech_part_ids), max_new_tokens, force_first=force_first,
                    allow_images=allow_images, allow_speech=allow_speech, max_content_tokens=max_content_tokens,
                    start_in_image=start_in_image)


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


# ---- seeds ----------------------------------------------------------------------------------
def row_seed(seed: int, prompt_ids: Sequence[int], sample: int = 0) -> int:
    """The random seed of one prompt's generation: a function of the run's seed, the prompt's
    ids and the sample number only, so the answer does not depend on the batch it lands in."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{seed}:{sample}:".encode())
    digest.update(b",".join(str(i).encode() for i in prompt_ids))
    return int.from_bytes(digest.digest(), "big") >> 1


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


# ---- running ----------------------------------------------------------------------------------
def generate(
    llm: Any,
    tokenizer: MioTokenizer,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    stop_id: int,
    batch_size: int = 1,
    seeds: Sequence[int] | None = None,
    constraint_factory: Callable[[int, int], Any] | None = None,
    on_batch_done: Callable[[int], None] | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (prompt and padding removed, stop token dropped).

    Prompts are grouped by length before batching so that left padding stays small; the
    results come back in the input order. When sampling, `seeds` gives each prompt its own
    random stream (see `row_seed`), so its answer is the same in any batch; without seeds the
    streams are random. Beam sampling has no per-row sampler in transformers: each of its
    prompts is generated alone. `on_tokens` sees the new ids as they are chosen, for one prompt
    without beam search (a beam's tokens are only final at its end); otherwise it is not called.
    """
    import secrets

    import torch
    from transformers import LogitsProcessorList

    if seeds is None:
        seeds = [secrets.randbits(63) for _ in prompts]
    beam_sampling = settings.do_sample and settings.num_beams > 1
    if beam_sampling:
        batch_size = 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, list[int]] = {}
    device = next(llm.parameters()).device
    pad_id = tokenizer.pad_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            prompt = list(prompts[index])
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        processors = LogitsProcessorList()
        constraint = constraint_factory(width, settings.max_new_tokens) if constraint_factory is not None else None
        run_settings = settings
        if settings.do_sample and not beam_sampling:
            processors.append(RowSampler([seeds[i] for i in chunk], settings, constraint))
            run_settings = replace(settings, do_sample=False)
        elif constraint is not None:
            processors.append(constraint)
        if beam_sampling:
            torch.manual_seed(seeds[chunk[0]])
        streamer = None
        if on_tokens is not None and len(prompts) == 1 and settings.num_beams == 1:
            streamer = _TokenStream(on_tokens)
        reference = settings.beam_scoring == "reference" and settings.num_beams > 1
        scoring = reference_beam_scoring(llm, stop_id) if reference else contextlib.nullcontext()
        with torch.inference_mode(), scoring:
            output = llm.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                logits_processor=processors,
                eos_token_id=stop_id,
                pad_token_id=pad_id,
                streamer=streamer,
                **hf_generate_kwargs(run_settings),
            )
        for row, index in enumerate(chunk):
            new = output[row, width:].tolist()
            if stop_id in new:
                new = new[: new.index(stop_id)]
            while new and new[-1] == pad_id:
                new.pop()
            results[index] = new
        if on_batch_done is not None:
            on_batch_done(len(chunk))
    return [results[i] for i in range(len(prompts))]


@contextlib.contextmanager
def reference_beam_scoring(llm: Any, stop_id: int) -> Iterator[None]:
    """Beam search scored as the reference's transformers 4.34 did: a finished beam's log-probability
    divided by the length of the whole row (prompt, its left padding and the answer; for a beam that
    stopped, without its stop token) rather than of the answer alone.

    transformers normalises in `_update_finished_beams` and estimates the best reachable score in
    `_check_early_stop_heuristic`, both from `cur_len - decoder_prompt_len`: with a prompt length of 0
    they see the whole row. It also counts a stopped beam's stop token, which 4.34 did not; that is
    undone for candidates whose new token is `stop_id`. Patched on this model object for one call.
    """
    import torch

    unsupported = UsageError("--beam-scoring reference is not supported by this transformers version",
                             hint="use --beam-scoring answer")
    update, check = llm._update_finished_beams, type(llm)._check_early_stop_heuristic
    needed = {"decoder_prompt_len", "cur_len", "length_penalty", "topk_log_probs", "topk_running_sequences"}
    import inspect

    if not needed <= set(inspect.signature(update).parameters) or \
            "decoder_prompt_len" not in inspect.signature(check).parameters:
        raise unsupported

    def update_whole_row(*args: Any, **kwargs: Any) -> Any:
        if args or not needed <= set(kwargs):
            raise unsupported
        cur_len, penalty, scores = kwargs["cur_len"], kwargs["length_penalty"], kwargs["topk_log_probs"]
        stopped = kwargs["topk_running_sequences"][:, :, cur_len] == stop_id
        # transformers divides by (cur_len + 1) ** penalty; a stopped beam should get cur_len ** penalty.
        scores = torch.where(stopped, scores * ((cur_len + 1) / cur_len) ** penalty, scores)
        return update(**{**kwargs, "topk_log_probs": scores, "decoder_prompt_len": 0})

    def check_whole_row(*args: Any, **kwargs: Any) -> Any:
        if "decoder_prompt_len" not in kwargs:
            raise unsupported
        return check(*args, **{**kwargs, "decoder_prompt_len": 0})

    llm._update_finished_beams = update_whole_row
    llm._check_early_stop_heuristic = check_whole_row
    try:
        yield
    finally:
        del llm._update_finished_beams
        del llm._check_early_stop_heuristic


class _TokenStream:
    """A transformers streamer (put/end) handing each step's new ids to a callback."""

    def __init__(self, callback: Callable[[list[int]], None]) -> None:
        self.callback = callback
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        # generate() first puts the prompt itself; only what follows is new.
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.callback([int(token) for token in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass
