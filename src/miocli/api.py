"""The Python API: what the `mio` commands call, usable from scripts without parsing text.

    from miocli import Mio
    mio = Mio(model="path/to/MIO-7B-Instruct", device="cpu", quantize="4bit")
    print(mio.chat("What is the capital of France?").text)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from miocli import protocol
from miocli.errors import UsageError
from miocli.generation import GenerationOverrides
from miocli.pipeline import Engine, Generated, Prompt, conversation_prompt_text, task_prompt_text
from miocli.runtime import Runtime, RuntimeOptions
from miocli.tasks import TASKS, Task


@dataclass
class Reply:
    """One answer: its text (media replaced by placeholders), the raw decoded output and ids."""

    text: str
    raw: str
    token_ids: list[int]
    problems: list[str] = field(default_factory=list)
    images: list[list[int]] = field(default_factory=list)
    speeches: list[list[list[int]]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    def to_record(self) -> dict[str, Any]:
        return {"text": self.text, "raw": self.raw, "problems": self.problems}


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

    def overrides(self) -> GenerationOverrides:
        return GenerationOverrides(
            num_beams=self.beams, do_sample=self.sample, temperature=self.temperature, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
        )


def _reply(generated: Generated) -> Reply:
    parsed = generated.parsed
    return Reply(
        text=parsed.text,
        raw=generated.raw_text,
        token_ids=generated.token_ids,
        problems=[f"malformed {p.kind} segment: {p.reason}" for p in parsed.problems],
        images=[segment.ids for segment in parsed.images],
        speeches=[segment.codes for segment in parsed.speeches],
    )


class Mio:
    """A MIO model folder plus device choices; components load on first use."""

    def __init__(
        self,
        model: str | None = None,
        *,
        variant: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "auto",
        verbose: bool = False,
    ) -> None:
        self.runtime = Runtime(
            RuntimeOptions(model=model, variant=variant, device=device, dtype=dtype, quantize=quantize, verbose=verbose)
        )
        self.engine = Engine(self.runtime)

    @property
    def variant(self) -> str:
        return self.runtime.variant

    # ---- prompts ---------------------------------------------------------------------------
    def chat_prompt(
        self,
        messages: str | Sequence[dict[str, Any]],
        *,
        mode: str = "std",
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The exact prompt text of a conversation (BOS and chat template included)."""
        if mode not in protocol.MODES:
            raise UsageError(f"unknown mode {mode!r}", hint="use std, voice or custom")
        if isinstance(messages, str):
            if not messages.strip():
                raise UsageError("the question is empty", hint="give the text to ask, or --messages FILE")
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system is not None:
            if mode != "custom":
                raise UsageError("--system needs --mode custom")
            messages = [{"role": "system", "content": system}, *[m for m in messages if m.get("role") != "system"]]
        if not any(m.get("role") == "user" for m in messages if isinstance(m, dict)):
            raise UsageError("the conversation has no user turn")
        return conversation_prompt_text(messages, mode, add_generation_prompt)

    def raw_prompt(self, text: str) -> str:
        if not text.strip():
            raise UsageError("the prompt is empty", hint="give the text to continue")
        return text if text.startswith(protocol.BOS) else protocol.BOS + text

    def task_prompt(self, task: str | Task, fields: dict[str, str], media_count: int = 0) -> str:
        task = TASKS[task] if isinstance(task, str) else task
        return task_prompt_text(task, self.variant, fields, media_count)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.engine.encode([prompt])[0]

    # ---- generation ------------------------------------------------------------------------
    def run(
        self,
        task: str | Task,
        prompts: Sequence[Prompt],
        options: GenerationOptions | None = None,
        on_batch_done: Callable[[int], None] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> list[Reply]:
        """Generate for every prompt; `on_tokens` watches a single unbeamed prompt's ids as they come."""
        task = TASKS[task] if isinstance(task, str) else task
        options = options or GenerationOptions()
        generated = self.engine.run(
            task, prompts, overrides=options.overrides(), batch_size=options.batch_size, seed=options.seed,
            constrain=options.constrain, on_batch_done=on_batch_done, on_tokens=on_tokens,
        )
        return [_reply(g) for g in generated]

    def chat(
        self,
        messages: str | Sequence[dict[str, Any]],
        *,
        mode: str = "std",
        system: str | None = None,
        add_generation_prompt: bool = True,
        options: GenerationOptions | None = None,
    ) -> Reply:
        """Answer a question or continue a conversation (Instruct model)."""
        self._require_instruct("chat")
        text = self.chat_prompt(messages, mode=mode, system=system, add_generation_prompt=add_generation_prompt)
        task = TASKS["speak"] if mode == "voice" else TASKS["chat"]
        return self.run(task, [Prompt(text)], options)[0]

    def generate(self, prompts: str | Sequence[str], options: GenerationOptions | None = None) -> list[Reply]:
        """Continue raw text prompts (no chat template; meant for the Base model)."""
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.run("generate", [Prompt(self.raw_prompt(p)) for p in items], options)

    def _require_instruct(self, command: str) -> None:
        if self.variant == "base":
            from miocli.tasks import raise_variant_error

            raise_variant_error(command, "Instruct")
