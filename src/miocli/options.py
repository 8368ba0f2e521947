"""Generation options as the API and the CLI take them.

Its own light module: a `--server` client builds them without importing the model-side code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from miocli.generation import GenerationOverrides


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
        from miocli.generation import GenerationOverrides

        return GenerationOverrides(
            num_beams=self.beams, do_sample=self.sample, temperature=self.temperature, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            beam_scoring=self.beam_scoring,
        )
