"""Generation: prompts → token ids → the LLM (the engine seam) → parsed output.

Media encoding (image/speech → token strings) and decoding (segments → pixels, samples) plug
in around this (`steps.py`); prompt text comes from `prompts.py`; this module only knows token strings.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from miocli import protocol
from miocli.core.generation import PRESETS, GenerationOverrides, cpu_settings, row_seed
from miocli.core.prompts import Prompt, raw_prompt_text, task_prompt_text
from miocli.core.tasks import Task
from miocli.core.validate import check_text
from miocli.engines.base import GenerationSettings, Generator, Job
from miocli.engines.rules import MediaVocabulary, Rule
from miocli.errors import InputError, UsageError
from miocli.model.runtime import Runtime
from miocli.protocol import PromptText


@dataclass
class Generated:
    prompt: Prompt
    token_ids: list[int]
    raw_text: str
    parsed: protocol.ParsedOutput


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
        if runtime.options.engine == "llamacpp":
            from miocli.engines.llamacpp import llamacpp_problem, missing_llamacpp

            problem = llamacpp_problem()
            if problem:
                raise missing_llamacpp(problem)
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
            elif options.engine == "llamacpp":
                from miocli.engines.llamacpp import LlamaCpp

                self._generator = LlamaCpp(self.runtime)
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
        from miocli.core.generation import check_room_for_output

        check_room_for_output(settings, task.output, task.name, prefill=task.prefill)
        return settings

    @staticmethod
    def _check_room(task: Task, room: int, prompt_tokens: int, context: int, kind: str | None) -> None:
        """A prompt so long that the image or speech the task must give cannot fit after it."""
        from miocli.core.generation import minimum_new_tokens

        needed = minimum_new_tokens(task.output, prefill=task.prefill)
        if room < needed:
            raise UsageError(
                f"the prompt is {prompt_tokens} tokens: the model's context of {context} leaves {room} for the "
                f"answer, and `{task.name}` needs at least {needed}",
                hint=shorten_hint(kind, context - needed, prompt_tokens),
            )

    @functools.cached_property
    def _llm_parameters(self) -> int | None:
        from miocli.model import memory

        config = memory.llm_config(self.runtime.model_dir)
        return memory.llm_size(config).parameters if config is not None else None

    def llm_parameters(self) -> int | None:
        """The LLM's parameter count from config.json (nothing loaded, read once), None when it does not say."""
        return self._llm_parameters

    def context_length(self) -> int | None:
        # From config.json until the LLM is loaded: a vLLM engine never loads it in this process.
        return context_length(self.runtime)

    def check_prompt_length(self, task: Task, settings: GenerationSettings, length: int,
                            kind: str | None = None) -> None:
        """UsageError when a prompt of `length` tokens leaves no room for the answer the task must give.

        `kind` is the largest part of the prompt (the input's media kind, or None for text): the hint says
        how to shorten that.
        """
        context = self.context_length()
        if context is None:
            return
        if length >= context:
            raise UsageError(f"the prompt is {length} tokens, the model's context is {context}",
                             hint=shorten_hint(kind, context, length))
        room = context - length
        if room < settings.max_new_tokens:
            self._check_room(task, room, length, context, kind)

    def check_text_size(self, characters: int) -> None:
        """UsageError for a text that cannot fit the context whatever it says, known from its length:
        a prompt of megabytes is refused at once instead of being tokenized first."""
        context = self.context_length()
        if context is None:
            return
        fewest = characters // self.runtime.tokenizer.longest_piece
        if fewest >= context:
            raise UsageError(f"the text is {characters:,} characters, at least {fewest:,} tokens, and the model reads "
                             f"at most {context:,}", hint="shorten it")

    def run(
        self,
        task: Task,
        prompts: Sequence[Prompt],
        *,
        overrides: GenerationOverrides | None = None,
        batch_size: int = 1,
        seed: int | Sequence[int | None] | None = None,
        samples: Sequence[int] | None = None,
        constrain: bool = True,
        on_batch_done: Callable[[int], None] | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Generated]:
        """Generate for every prompt. With a `seed`, each prompt's random stream comes from the seed,
        its ids and its sample number (`samples`, default 0): the same answer in any batch. `seed`
        may also be one seed per prompt (None: a random one), so that requests with their own seeds
        share a batch. `on_tokens(n, ids)` and `cancelled(n)` are the engine's (`engines.base.Job`);
        when every prompt is cancelled, `engines.base.Cancelled` is raised."""
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        settings = self.settings_for(task, overrides)
        tokenizer = self.runtime.tokenizer
        rows = self.encode(prompts)
        longest = max(len(r) for r in rows)
        self.check_prompt_length(task, settings, longest, task.media)
        context = self.context_length()
        if context is not None and context - longest < settings.max_new_tokens:
            settings = GenerationOverrides(max_new_tokens=context - longest).apply(settings)
        generator = self.generator()
        if generator.name == "llamacpp":
            from miocli.engines.base import note_once
            from miocli.engines.llamacpp import llamacpp_settings

            settings, note = llamacpp_settings(settings, overrides.num_beams if overrides is not None else None)
            if note:
                note_once(f"`{task.name}` on --engine llamacpp: {note}")
        elif generator.name == "transformers" and self.runtime.device.type == "cpu":
            from miocli.engines.base import note_once

            settings, note = cpu_settings(settings, overrides.num_beams if overrides is not None else None,
                                          self.llm_parameters())
            if note:
                note_once(f"`{task.name}`: {note}")
        elif generator.name != "transformers":
            from miocli.engines.base import note_once, vllm_settings

            settings, note = vllm_settings(settings, constrain)
            if note:
                note_once(f"`{task.name}` on --engine vllm: {note}")
        job = Job(rows, settings, self.stop_id(), tokenizer.pad_id, batch_size,
                  _row_seeds(rows, seed, samples, random=generator.name != "transformers" and settings.do_sample),
                  self.rule_for(task) if constrain else None, on_batch_done, on_tokens, cancelled)
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
        # A conversation's answer may be in any modality (std mode's system text says so).
        chat = task.name == "chat"
        allow_images = task.output in ("image", "mixed") or bool(task.prefill) or chat
        allow_speech = task.output in ("speech", "mixed") or chat

        def rule(max_new_tokens: int) -> Rule:
            return vocab.rule(max_new_tokens, force_first=force, allow_images=allow_images,
                              allow_speech=allow_speech,
                              # A prompt pre-filled with <image> has already opened the segment.
                              start_in_image=task.prefill == protocol.IMAGE_BEGIN)

        return rule

def _row_seeds(rows: list[list[int]], seed: int | Sequence[int | None] | None, samples: Sequence[int] | None,
               random: bool) -> list[int] | None:
    """Each prompt's random seed (`row_seed`) from the run's seed or the prompts' own; None when no
    prompt has one and the engine draws its own random streams (`random`: vLLM starts from a fixed
    seed, so unseeded runs there would repeat their samples without seeds of their own)."""
    import secrets

    given = list(seed) if isinstance(seed, Sequence) else [seed] * len(rows)
    if all(s is None for s in given) and not random:
        return None
    numbers = list(samples) if samples is not None else [0] * len(rows)
    return [secrets.randbits(63) if s is None else row_seed(s, row, sample)
            for s, row, sample in zip(given, rows, numbers)]


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


def shorten_hint(kind: str | None, most: int, length: int) -> str:
    """How to make a prompt of `length` tokens fit when the model reads at most `most`: by what fills it."""
    if kind == "audio":
        return (f"the model reads at most {most} tokens and this recording's prompt has {length}: give a shorter "
                "recording, or transcribe it with `mio asr`, which splits long recordings")
    if kind == "video":
        return (f"the model reads at most {most} tokens and this video's prompt has {length} (each keyframe takes "
                "about 34): keep fewer frames with --max-frames")
    if kind == "image":
        return f"the model reads at most {most} tokens and this prompt has {length}: give fewer images"
    return f"the model reads at most {most} tokens and this prompt has {length}; shorten it"
