"""What a run asks of generation: the options of the API and the CLI, their overrides, the task presets.

`GenerationOptions` is what a caller passes (a `--server` client builds them too: this module stays
light, no torch); `GenerationOverrides` is what it changes of a task's preset (`PRESETS`,
MIO_PROTOCOL §8), applied to the engines' `GenerationSettings`. Also here: the fewest new tokens an
image or speech answer needs, and the seed of one prompt's generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from miocli import protocol
from miocli.engines.base import GenerationSettings
from miocli.engines.rules import IMAGE, IMAGE_SEGMENT_TOKENS, SHORTEST_SPEECH_TOKENS, SPEECH
from miocli.errors import UsageError


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call generation choices; None keeps the task's preset."""

    beams: int | None = None
    sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    batch_size: int = 1
    constrain: bool = True
    # "answer" (default) or "reference": see GenerationSettings.beam_scoring.
    beam_scoring: str | None = None

    def overrides(self) -> GenerationOverrides:
        return GenerationOverrides(
            num_beams=self.beams, do_sample=self.sample, temperature=self.temperature, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            beam_scoring=self.beam_scoring,
        )


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


# From this size on, a CPU decodes the presets' beam searches with one beam unless --beams is given: there every
# beam is another full pass of the prompt and of each step (MIO-7B, 2 cores: docs/performance.md, "CPU defaults").
ONE_BEAM_ON_CPU_FROM_PARAMETERS = 1_000_000_000


def cpu_settings(settings: GenerationSettings, asked_beams: int | None, parameters: int | None,
                 ) -> tuple[GenerationSettings, str | None]:
    """What the CPU runs of a preset for an LLM of `parameters`, and a note when its beams become one.

    The tiny checkpoint (and anything under a billion parameters) keeps the presets exactly, so the CPU
    still reproduces the reference; an explicit --beams is always kept."""
    if settings.num_beams <= 1 or asked_beams is not None or parameters is None:
        return settings, None
    if parameters < ONE_BEAM_ON_CPU_FROM_PARAMETERS:
        return settings, None
    return replace(settings, num_beams=1), (
        f"1 beam instead of the preset's {settings.num_beams} on the CPU, where each beam costs a whole pass "
        f"(--beams {settings.num_beams} runs the preset; --beams 1 silences this)")


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


def row_seed(seed: int, prompt_ids: Sequence[int], sample: int = 0) -> int:
    """The random seed of one prompt's generation: a function of the run's seed, the prompt's
    ids and the sample number only, so the answer does not depend on the batch it lands in."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{seed}:{sample}:".encode())
    digest.update(b",".join(str(i).encode() for i in prompt_ids))
    return int.from_bytes(digest.digest(), "big") >> 1
