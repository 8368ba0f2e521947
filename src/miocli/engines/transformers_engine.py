"""The transformers engine: MIO's LLM in this process through `generate()`, the reference-exact default.

`generate` is the whole loop: prompts grouped by length and left-padded as the reference pads them,
the decodable-output rule and per-row sampling as logits processors
(`miocli.engines.transformers_processors`), the reference's beam scoring when asked for, and the new
ids streamed to a callback as they are chosen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from miocli.engines.base import GenerationSettings, Job
from miocli.engines.rules import MediaVocabulary
from miocli.engines.transformers_processors import RowSampler, RowWatch, SegmentConstraint
from miocli.errors import UsageError

if TYPE_CHECKING:
    from miocli.model.runtime import Runtime
    from miocli.model.tokenizer import MioTokenizer


class TransformersEngine:
    name = "transformers"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def generate(self, job: Job) -> list[list[int]]:
        factory = None
        rule_for = job.rule_for
        if rule_for is not None:
            vocab = MediaVocabulary(self.runtime.tokenizer)

            def factory(prompt_length: int, max_new_tokens: int) -> SegmentConstraint:
                return SegmentConstraint(vocab, prompt_length, max_new_tokens, rule=rule_for(max_new_tokens))

        return generate(
            self.runtime.llm, self.runtime.tokenizer, job.prompts, job.settings, stop_id=job.stop_id,
            batch_size=job.batch_size, seeds=job.seeds, constraint_factory=factory,
            on_batch_done=job.on_batch_done, on_tokens=job.on_tokens, cancelled=job.cancelled,
        )


def generate_cache_keyword() -> str:
    """The keyword `generate()` takes a cache under: `cache` in newer transformers, where the old
    `past_key_values` still works but prints a FutureWarning into every command's stderr."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


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
    on_tokens: Callable[[int, list[int]], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (prompt and padding removed, stop token dropped).

    Prompts are grouped by length before batching so that left padding stays small; the
    results come back in the input order. When sampling, `seeds` gives each prompt its own
    random stream (see `row_seed`), so its answer is the same in any batch; without seeds the
    streams are random. Beam sampling has no per-row sampler in transformers: each of its
    prompts is generated alone. `on_tokens(n, ids)` sees prompt n's new ids as they are chosen,
    without beam search (a beam's tokens are only final at its end); otherwise it is not called.
    `cancelled(n)` stops prompt n at the next step (its answer so far is returned); a batch whose
    prompts are all cancelled is skipped, and `Cancelled` is raised when none is left.
    """
    import secrets

    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from miocli.engines.base import Cancelled

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
        if cancelled is not None and all(cancelled(i) for i in chunk):
            results.update({i: [] for i in chunk})
            continue
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
        watch = StoppingCriteriaList()
        if on_tokens is not None or cancelled is not None:
            watch.append(RowWatch(chunk, stop_id, beams=settings.num_beams > 1, on_tokens=on_tokens,
                                  cancelled=cancelled))
        reference = settings.beam_scoring == "reference" and settings.num_beams > 1
        scoring = reference_beam_scoring(llm, stop_id) if reference else contextlib.nullcontext()
        cache: dict[str, Any] = {}
        if device.type == "cpu":
            from miocli.model.cpu_attention import GrowingCache

            cache[generate_cache_keyword()] = GrowingCache()
        with torch.inference_mode(), scoring:
            output = llm.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                logits_processor=processors,
                eos_token_id=stop_id,
                pad_token_id=pad_id,
                stopping_criteria=watch,
                **hf_generate_kwargs(run_settings),
                **cache,
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
    if cancelled is not None and all(cancelled(i) for i in range(len(prompts))):
        raise Cancelled
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

