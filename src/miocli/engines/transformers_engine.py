"""The transformers engine: `miocli.generation.generate` behind the seam, the reference-exact default.

It runs in this process on the runtime's LLM, with the rule adapted as a transformers logits
processor (`miocli.generation.SegmentConstraint`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from miocli.engines.base import Job

if TYPE_CHECKING:
    from miocli.runtime import Runtime


class TransformersEngine:
    name = "transformers"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def generate(self, job: Job) -> list[list[int]]:
        from miocli.generation import MediaVocabulary, SegmentConstraint, generate

        factory = None
        rule_for = job.rule_for
        if rule_for is not None:
            vocab = MediaVocabulary(self.runtime.tokenizer)

            def factory(prompt_length: int, max_new_tokens: int) -> SegmentConstraint:
                return SegmentConstraint(vocab, prompt_length, max_new_tokens, rule=rule_for(max_new_tokens))

        return generate(
            self.runtime.llm, self.runtime.tokenizer, job.prompts, job.settings, stop_id=job.stop_id,
            batch_size=job.batch_size, seeds=job.seeds, constraint_factory=factory,
            on_batch_done=job.on_batch_done, on_tokens=job.on_tokens,
        )
