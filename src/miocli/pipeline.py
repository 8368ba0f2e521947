"""Prompts and generation: task prompt text → token ids → the LLM (the engine seam) → parsed output.

Media encoding (image/speech → token strings) and decoding (segments → pixels, samples) plug
in around this (`stream.py`); this module only knows token strings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from miocli import protocol
from miocli.engines.base import Generator, Job
from miocli.engines.rules import Rule
from miocli.errors import InputError, UsageError
from miocli.generation import (
    PRESETS,
    GenerationOverrides,
    GenerationSettings,
    MediaVocabulary,
    row_seed,
)
from miocli.protocol import PromptText
from miocli.runtime import Runtime
from miocli.tasks import TASKS, Task, media_placeholders
from miocli.validate import check_text, template_fields


@dataclass
class Prompt:
    """One generation request: the prompt text (placeholders kept) and its media token strings.

    `text` is a PromptText from the prompt builders, whose user text is encoded as characters.
    A bare str is a raw prompt of user text, as `raw_prompt_text` reads it: its token strings stay
    text and it holds no placeholders; pass `PromptText.trusted(text)` for hand-built prompts.
    """

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


# The templates of the task table: their text is the protocol's. Any other template (edit --template,
# Mio.edit(template=...)) was written by a user and is user text, except the media its {media} places.
_TABLE_TEMPLATES = frozenset(t for task in TASKS.values() for t in (task.instruct, task.base) if t is not None)


def user_text(value: Any, what: str) -> PromptText:
    """A value from the user as prompt text: valid text, encoded as its characters.

    A PromptText is taken as it is marked: `PromptText.trusted` is the opt-in for token strings.
    """
    if isinstance(value, PromptText):
        check_text(value, what)
        return value
    if not isinstance(value, str):
        raise UsageError(f"the {what} should be text, not {type(value).__name__}")
    check_text(value, what)
    return PromptText.user(value)


def fill_template(task: Task, template: str, media: str, fields: dict[str, Any]) -> PromptText:
    """`template` with {media} (trusted placeholders) and its fields (user text) filled in."""
    from_table = template in _TABLE_TEMPLATES
    what = f"`{task.name}` template" if from_table else "template"
    parts: list[tuple[str, bool]] = []
    for literal, name in template_fields(template, what):
        parts.append((literal, not from_table))
        if name is None:
            continue
        if name == "media":
            parts.append((media, False))
        elif name in fields:
            parts.append((user_text(fields[name], name), False))
        else:
            raise UsageError(f"the {what} names {{{name}}}, but the input has no {name!r} field",
                             hint=f"give fields {', '.join(sorted(fields)) or '(none given)'} plus {name!r}")
    return PromptText(parts)


def task_prompt_text(
    task: Task, variant: str, fields: dict[str, Any], media_count: int = 0, system: str | None = None,
    shots: Sequence[Shot] = (),
) -> PromptText:
    """The full prompt text of a task (chat template for Instruct, plain text for Base).

    `shots` are in-context examples put before the question, each the same task on its own
    media with its answer: earlier user/assistant turns for Instruct, earlier "prompt answer"
    lines for Base. Their media take the first placeholders, in order. The fields and `system`
    are user text; the answers of the examples are trusted (they may hold token strings).
    """
    template = task.template(variant)
    turns: list[dict[str, Any]] = []
    start = 0
    for shot in shots:
        turns.append({"role": "user", "content": fill_template(
            task, template, media_placeholders(task.media, shot.media_count, start), fields)})
        turns.append({"role": "assistant", "content": PromptText.trusted(shot.answer)})
        start += shot.media_count
    user_turn = fill_template(task, template, media_placeholders(task.media, media_count, start), fields)
    if variant == "base":
        parts: list[tuple[str, bool]] = []
        for i in range(0, len(turns), 2):
            parts += [(turns[i]["content"], False), (" ", False), (turns[i + 1]["content"], False), ("\n", False)]
        return PromptText([*parts, (user_turn, False)])
    turns.append({"role": "user", "content": user_turn})
    if system is not None:
        conversation = [{"role": "system", "content": user_text(system, "system text")}, *turns]
        text = protocol.apply_chat_template([conversation], "custom")[0]
    else:
        text = protocol.apply_chat_template([turns], task.mode)[0]
    return PromptText([(text, False), (task.prefill, False)])


def conversation_prompt_text(
    messages: Sequence[dict[str, Any]], mode: str, add_generation_prompt: bool = True
) -> PromptText:
    """The prompt of a conversation. Every content is user text (a --messages file included),
    except contents given as `PromptText.trusted`: the interactive session's own history, whose
    answers may hold the media mio generated."""
    turns: list[dict[str, Any]] = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise UsageError(f"message {i} should be an object with \"role\" and \"content\"")
        if turn["role"] not in ("system", "user", "assistant"):
            raise UsageError(f"message {i} has role {turn['role']!r}; use system, user or assistant")
        if not isinstance(turn["content"], str):
            raise UsageError(f"message {i} has content of type {type(turn['content']).__name__}; it should be text")
        turns.append({"role": turn["role"], "content": user_text(turn["content"], f"content of message {i}")})
    if mode == "custom" and (not turns or turns[0]["role"] != "system"):
        raise UsageError(
            "custom mode needs a system turn first", hint="pass --system TEXT or start the messages with one"
        )
    text = protocol.apply_chat_template([turns], mode, add_generation_prompt=add_generation_prompt)[0]
    return text if isinstance(text, PromptText) else PromptText.trusted(text)


def raw_prompt_text(text: str, *, tokens: bool = False) -> PromptText:
    """A prompt without template, as the Base model takes it: BOS, then `text`.

    The text is user text unless `tokens` (`mio generate --raw-tokens`): then its token strings
    are tokens. A leading BOS string is taken as the BOS either way (it is what would be prepended).
    """
    body = text[len(protocol.BOS) :] if text.startswith(protocol.BOS) else text
    return PromptText([(protocol.BOS, False), (body, not tokens)])


class Engine:
    """Turns prompts into parsed outputs with the runtime's tokenizer and LLM."""

    def __init__(self, runtime: Runtime) -> None:
        from miocli.engines.base import check_engine

        self.runtime = runtime
        check_engine(runtime.options.engine, runtime.options.engine_url)
        if (runtime.options.engine == "vllm" or runtime.options.engine_url) and \
                runtime.options.quantize in ("8bit", "4bit"):
            raise UsageError(f"--quantize {runtime.options.quantize} is for the transformers engine",
                             hint="give vLLM a quantized checkpoint instead, or drop --engine/--engine-url")
        self._generator: Generator | None = None
        if runtime.options.engine == "vllm" and not runtime.options.engine_url:
            from miocli.engines.vllm_local import missing_vllm, vllm_problem

            # Before any codec loads or input is read: the whole run would end here anyway.
            problem = vllm_problem()
            if problem:
                raise missing_vllm(problem)

    def generator(self) -> Generator:
        """The engine that runs the LLM (miocli.engines), built once."""
        if self._generator is None:
            options = self.runtime.options
            if options.engine_url:
                from miocli.engines.vllm_server import VllmServer

                self._generator = VllmServer(options.engine_url)
            elif options.engine == "vllm":
                from miocli.engines.vllm_local import VllmLocal

                dtype = str(self.runtime.dtype).replace("torch.", "")
                self._generator = VllmLocal(self.runtime.model_dir, dtype, verbose=options.verbose,
                                            log=self.runtime.log)
            else:
                from miocli.engines.transformers_engine import TransformersEngine

                self._generator = TransformersEngine(self.runtime)
        return self._generator

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        texts: list[str] = []
        for prompt in prompts:
            text = prompt.text if isinstance(prompt.text, PromptText) else raw_prompt_text(prompt.text)
            filled = protocol.fill_placeholders(text, prompt.image_strings, prompt.speech_strings)
            # Trusted text (examples, hand-built prompts) is checked here: the tokenizer cannot take it.
            check_text(filled, "prompt")
            texts.append(filled)
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

    def context_length(self) -> int | None:
        # From config.json until the LLM is loaded: a vLLM engine never loads it in this process.
        return context_length(self.runtime)

    def check_prompt_length(self, task: Task, settings: GenerationSettings, length: int) -> None:
        """UsageError when a prompt of `length` tokens leaves no room for the answer the task must give."""
        context = self.context_length()
        if context is None:
            return
        if length >= context:
            raise UsageError(
                f"the prompt is {length} tokens, the model's context is {context}",
                hint="shorten the input (fewer frames or a shorter recording)",
            )
        room = context - length
        if room < settings.max_new_tokens:
            self._check_room(task, room, length, context)

    def run(
        self,
        task: Task,
        prompts: Sequence[Prompt],
        *,
        overrides: GenerationOverrides | None = None,
        batch_size: int = 1,
        seed: int | None = None,
        samples: Sequence[int] | None = None,
        constrain: bool = True,
        on_batch_done: Callable[[int], None] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> list[Generated]:
        """Generate for every prompt. With a `seed`, each prompt's random stream comes from the seed,
        its ids and its sample number (`samples`, default 0): the same answer in any batch."""
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        settings = self.settings_for(task, overrides)
        tokenizer = self.runtime.tokenizer
        rows = self.encode(prompts)
        longest = max(len(r) for r in rows)
        self.check_prompt_length(task, settings, longest)
        context = self.context_length()
        if context is not None and context - longest < settings.max_new_tokens:
            settings = GenerationOverrides(max_new_tokens=context - longest).apply(settings)
        generator = self.generator()
        if generator.name != "transformers":
            from miocli.engines.base import note_once, vllm_settings

            settings, note = vllm_settings(settings, constrain)
            if note:
                note_once(f"`{task.name}` on --engine vllm: {note}")
        seeds = None
        if seed is not None:
            numbers = list(samples) if samples is not None else [0] * len(rows)
            seeds = [row_seed(seed, row, sample) for row, sample in zip(rows, numbers)]
        elif generator.name != "transformers" and settings.do_sample:
            # vLLM starts from a fixed seed: without seeds of their own, unseeded runs would repeat their samples.
            import secrets

            seeds = [secrets.randbits(63) for _ in rows]
        job = Job(rows, settings, self.stop_id(), tokenizer.pad_id, batch_size, seeds,
                  self.rule_for(task) if constrain else None, on_batch_done, on_tokens)
        outputs = generator.generate(job)
        results = []
        for prompt, ids in zip(prompts, outputs):
            raw = tokenizer.decode(ids)
            text = (task.prefill + raw) if task.prefill else raw
            # The reference drops <unk> from answers (extract_assistant); `raw` keeps what was generated.
            parsed = protocol.parse_output(text.replace(protocol.UNK, ""), extract=False)
            results.append(Generated(prompt, ids, raw, parsed))
        return results

    def rule_for(self, task: Task, vocab: MediaVocabulary | None = None) -> Callable[[int], Rule]:
        """The task's decodable-output rule for a given budget, for every engine's adapter."""
        tokenizer = self.runtime.tokenizer
        vocab = vocab if vocab is not None else MediaVocabulary(tokenizer)
        force = tokenizer.token_to_id(task.force_open) if task.force_open else None
        allow_images = task.output in ("image", "mixed") or bool(task.prefill)
        allow_speech = task.output in ("speech", "mixed")

        def rule(max_new_tokens: int) -> Rule:
            return vocab.rule(max_new_tokens, force_first=force, allow_images=allow_images,
                              allow_speech=allow_speech,
                              # A prompt pre-filled with <image> has already opened the segment.
                              start_in_image=task.prefill == protocol.IMAGE_BEGIN)

        return rule

# ---- recordings that must fit one prompt ------------------------------------------------------
# MIO_PROTOCOL §4: one token per layer for every 320 samples of 16 kHz audio, i.e. 50 per second.
SPEECH_HOP = 320
SPEECH_RATE = 16000
# Tasks whose answers for consecutive parts of one recording can be joined into one answer.
SPLITTABLE_TASKS = frozenset({"asr"})
# Below this a split would cut a recording into slivers too short to say a word in.
MIN_PART_SECONDS = 1.0

log = logging.getLogger("miocli")


@dataclass(frozen=True)
class PromptBudget:
    """How many speech tokens fit one prompt of a task: the LLM's context minus the rest of
    the prompt and the room kept for the answer (the task's max_new_tokens)."""

    engine: Engine
    task: Task
    context: int | None
    answer_tokens: int

    @classmethod
    def for_task(cls, engine: Engine, task: Task, overrides: GenerationOverrides | None) -> PromptBudget:
        answer = engine.settings_for(task, overrides).max_new_tokens
        return cls(engine, task, context_length(engine.runtime), answer)

    def overhead(self, fields: dict[str, str], recordings: int) -> int:
        """Prompt tokens besides the recordings' codes (chat template, question, <spch></spch>)."""
        text = task_prompt_text(self.task, self.engine.runtime.variant, fields, recordings)
        # One code per segment, taken off again: measures the markers as they really tokenize.
        dummy = [protocol.SPEECH_BEGIN + "<spch0>" + protocol.SPEECH_END] * recordings
        return len(self.engine.encode([Prompt(text, [], dummy)])[0]) - recordings

    def fit(self, name: str, fields: dict[str, str], waves: list[Any], per_frame: int) -> list[list[Any]]:
        """`waves` as one prompt's media, or (splittable tasks, one recording) as several parts.

        `per_frame` is the prompt tokens per 20 ms frame (1 for content, 4 with timbre). Raises
        InputError naming the duration and the limit when the recording cannot fit.
        """
        if self.context is None or not waves:
            return [waves]
        frames = sum(math.ceil(len(w) / SPEECH_HOP) for w in waves)
        overhead = self.overhead(fields, len(waves))
        room = self.context - overhead - self.answer_tokens
        if frames * per_frame <= room:
            return [waves]
        seconds = sum(len(w) for w in waves) / SPEECH_RATE
        limit = max(room // per_frame, 0) * SPEECH_HOP / SPEECH_RATE
        where = (f"the model's context is {self.context} tokens, {overhead} of them taken by the rest of the prompt "
                 f"and {self.answer_tokens} kept for the answer (--max-new-tokens)")
        from miocli.media.audio import format_duration, split_for_prompt

        if limit < MIN_PART_SECONDS:
            # Trimming cannot help when the answer's room leaves (next to) nothing for speech.
            raise InputError(
                f"the recording is {format_duration(seconds)} long and one `{self.task.name}` prompt leaves only "
                f"{format_duration(limit)} for speech: {where}",
                hint="pass a smaller --max-new-tokens",
                source=name,
            )
        if self.task.name not in SPLITTABLE_TASKS or len(waves) != 1:
            raise InputError(
                f"the recording is {format_duration(seconds)} long; one `{self.task.name}` prompt holds at most "
                f"{format_duration(limit)} of speech: {where}",
                hint=f"trim it to at most {format_duration(limit)} (e.g. `ffmpeg -i IN -t {math.floor(limit)} "
                "OUT.wav`), pass a smaller --max-new-tokens, or transcribe it with `mio asr`, which splits long "
                "recordings",
                source=name,
            )
        bounds = split_for_prompt(waves[0], limit, SPEECH_RATE)
        cuts = ", ".join(format_duration(end / SPEECH_RATE) for _, end in bounds[:-1])
        log.info(f"{name}: {format_duration(seconds)} is longer than one prompt holds "
                 f"({format_duration(limit)}): transcribing it in {len(bounds)} parts cut at {cuts}")
        return [[waves[0][start:end]] for start, end in bounds]


def context_length(runtime: Runtime) -> int | None:
    """The LLM's context (max_position_embeddings), from config.json so the LLM need not load yet."""
    import json

    if "llm" in runtime.loaded():
        value = getattr(runtime.llm.config, "max_position_embeddings", None)
    else:
        try:
            value = json.loads((runtime.model_dir / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            value = None  # a broken config.json is reported when the LLM loads
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
