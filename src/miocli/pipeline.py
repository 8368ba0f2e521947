"""Runs a task over a batch of prompts: prompt → token ids → generate → parse.

Media encoding (image/speech → token strings) and decoding (segments → files) plug in
around this through the runtime's codecs; this module only knows token strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from miocli import protocol
from miocli.errors import UsageError
from miocli.generation import (
    PRESETS,
    GenerationOverrides,
    GenerationSettings,
    MediaVocabulary,
    SegmentConstraint,
    generate,
)
from miocli.runtime import Runtime
from miocli.tasks import Task, media_placeholders


@dataclass
class Prompt:
    """One generation request: the prompt text (placeholders kept) and its media token strings."""

    text: str
    image_strings: list[str] = field(default_factory=list)
    speech_strings: list[str] = field(default_factory=list)


@dataclass
class Generated:
    prompt: Prompt
    token_ids: list[int]
    raw_text: str
    parsed: protocol.ParsedOutput


@dataclass(frozen=True)
class Shot:
    """One in-context example: how many media items it shows and the answer it should get."""

    media_count: int
    answer: str


def task_prompt_text(
    task: Task, variant: str, fields: dict[str, str], media_count: int = 0, system: str | None = None,
    shots: Sequence[Shot] = (),
) -> str:
    """The full prompt text of a task (chat template for Instruct, plain text for Base).

    `shots` are in-context examples put before the question, each the same task on its own
    media with its answer: earlier user/assistant turns for Instruct, earlier "prompt answer"
    lines for Base. Their media take the first placeholders, in order.
    """
    template = task.template(variant)
    turns: list[dict[str, str]] = []
    start = 0
    for shot in shots:
        turns.append({"role": "user", "content": template.format(
            media=media_placeholders(task.media, shot.media_count, start), **fields)})
        turns.append({"role": "assistant", "content": shot.answer})
        start += shot.media_count
    user_turn = template.format(media=media_placeholders(task.media, media_count, start), **fields)
    if variant == "base":
        examples = "".join(f"{turns[i]['content']} {turns[i + 1]['content']}\n" for i in range(0, len(turns), 2))
        return examples + user_turn
    turns.append({"role": "user", "content": user_turn})
    if system is not None:
        text = protocol.apply_chat_template([[{"role": "system", "content": system}, *turns]], "custom")[0]
    else:
        text = protocol.apply_chat_template([turns], task.mode)[0]
    return text + task.prefill


def conversation_prompt_text(
    messages: Sequence[dict[str, Any]], mode: str, add_generation_prompt: bool = True
) -> str:
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise UsageError(f"message {i} should be an object with \"role\" and \"content\"")
        if turn["role"] not in ("system", "user", "assistant"):
            raise UsageError(f"message {i} has role {turn['role']!r}; use system, user or assistant")
    if mode == "custom" and (not messages or messages[0]["role"] != "system"):
        raise UsageError(
            "custom mode needs a system turn first", hint="pass --system TEXT or start the messages with one"
        )
    return protocol.apply_chat_template([list(messages)], mode, add_generation_prompt=add_generation_prompt)[0]


class Engine:
    """Turns prompts into parsed outputs with the runtime's tokenizer and LLM."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        texts = [protocol.fill_placeholders(p.text, p.image_strings, p.speech_strings) for p in prompts]
        return protocol.encode_prompts(self.runtime.tokenizer, texts, padding=False)["input_ids"]

    def stop_id(self) -> int:
        token = protocol.EOS if self.runtime.variant == "base" else protocol.IM_END
        return self.runtime.tokenizer.token_to_id(token)

    def settings_for(self, task: Task, overrides: GenerationOverrides | None) -> GenerationSettings:
        settings = PRESETS[task.preset]
        if overrides is not None:
            overrides.validate()
            settings = overrides.apply(settings)
        # Before the LLM loads: too few new tokens can never hold the image or speech a task must give.
        from miocli.generation import check_room_for_output

        check_room_for_output(settings, task.output, task.name, prefill=task.prefill)
        return settings

    @staticmethod
    def _check_room(task: Task, room: int, prompt_tokens: int, context: int) -> None:
        """A prompt so long that the image or speech the task must give cannot fit after it."""
        from miocli.generation import minimum_new_tokens

        needed = minimum_new_tokens(task.output, prefill=task.prefill)
        if room < needed:
            raise UsageError(
                f"the prompt is {prompt_tokens} tokens: the model's context of {context} leaves {room} for the "
                f"answer, and `{task.name}` needs at least {needed}",
                hint="shorten the input (fewer frames, a shorter recording or text)",
            )

    def run(
        self,
        task: Task,
        prompts: Sequence[Prompt],
        *,
        overrides: GenerationOverrides | None = None,
        batch_size: int = 1,
        seed: int | None = None,
        constrain: bool = True,
        on_batch_done: Callable[[int], None] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> list[Generated]:
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        settings = self.settings_for(task, overrides)
        tokenizer = self.runtime.tokenizer
        rows = self.encode(prompts)
        context = getattr(self.runtime.llm.config, "max_position_embeddings", None)
        if context:
            longest = max(len(r) for r in rows)
            if longest >= context:
                raise UsageError(
                    f"the prompt is {longest} tokens, the model's context is {context}",
                    hint="shorten the input (fewer frames or a shorter recording)",
                )
            room = context - longest
            if room < settings.max_new_tokens:
                self._check_room(task, room, longest, context)
                settings = GenerationOverrides(max_new_tokens=room).apply(settings)
        factory = None
        if constrain:
            vocab = MediaVocabulary(tokenizer)
            force = tokenizer.token_to_id(task.force_open) if task.force_open else None
            allow_images = task.output in ("image", "mixed") or bool(task.prefill)
            allow_speech = task.output in ("speech", "mixed")

            def factory(prompt_length: int, max_new_tokens: int) -> SegmentConstraint:
                return SegmentConstraint(
                    vocab, prompt_length, max_new_tokens, force_first=force,
                    allow_images=allow_images, allow_speech=allow_speech,
                    # A prompt pre-filled with <image> has already opened the segment.
                    start_in_image=task.prefill == protocol.IMAGE_BEGIN,
                )

        outputs = generate(
            self.runtime.llm, tokenizer, rows, settings, stop_id=self.stop_id(), batch_size=batch_size,
            seed=seed, constraint_factory=factory, on_batch_done=on_batch_done, on_tokens=on_tokens,
        )
        results = []
        for prompt, ids in zip(prompts, outputs):
            raw = tokenizer.decode(ids)
            text = (task.prefill + raw) if task.prefill else raw
            parsed = protocol.parse_output(text, extract=False)
            results.append(Generated(prompt, ids, raw, parsed))
        return results
