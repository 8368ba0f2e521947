"""The steps one batch of a run goes through: load → encode → prompt → generate → decode.

A `Run` holds what one `Mio.stream` call needs across its batches (the Mio, the settings, the
in-context examples encoded once); each of its methods is one arrow of the flow, for the inputs of
one batch (`Pending`, an input on its way). How a task chains these steps is `stream.py`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

from miocli import protocol
from miocli.core import mediatokens
from miocli.core.inputs import Example, Item
from miocli.core.pipeline import SPEECH_RATE, Generated, PromptBudget
from miocli.core.prompts import Prompt, Shot, task_prompt_text
from miocli.core.results import Audio, Result, Segment, StoryPart
from miocli.core.tasks import AUDIO, IMAGE, IMAGE_OUT, MIXED_OUT, SPEECH_OUT, TASKS, VIDEO, Task
from miocli.errors import InputError, MioError, UsageError
from miocli.media.video import FrameOptions

log = logging.getLogger("miocli")

# Images per SEED encoder call: a batch's images go through together, bounded so that one input
# with many frames cannot take all the memory.
ENCODE_BATCH = 32


@dataclass
class StreamSettings:
    """Everything a run needs besides its inputs."""

    options: Any  # api.GenerationOptions
    pixel: mediatokens.PixelOptions = field(default_factory=mediatokens.PixelOptions)
    frames: FrameOptions = field(default_factory=FrameOptions)
    examples: Sequence[Example] = ()
    # Replaces the Instruct template of the task (edit --template).
    template: str | None = None
    # Called with (input index, part) as each image of an interleaved answer is decoded.
    on_part: Callable[[int, StoryPart], None] | None = None
    # tokenize: the (n, 1024) unCLIP embeddings instead of pixels.
    embeddings_only: bool = False
    # Called with (input index, new ids) as an input's answer is generated (one prompt, no beams).
    on_tokens: Callable[[int, list[int]], None] | None = None
    # Called with an input index: True once its answer is no longer wanted (stops at the next step).
    cancelled: Callable[[int], bool] | None = None
    # Called with (label, done, total) through long work inside an input: an image's denoising steps.
    on_step: Callable[[str, int, int], None] | None = None


def batches(items: Iterable[Item], size: int) -> Iterator[list[tuple[int, Item]]]:
    numbered = enumerate(items)
    while chunk := list(islice(numbered, size)):
        yield chunk


def error_result(task: str, index: int, item: Item, exc: MioError) -> Result:
    if isinstance(exc, InputError) and exc.source is None:
        exc.source = item.name
    return Result(task=task, input=item.name, index=index, error=exc)


@dataclass
class Pending:
    """One input on its way through a batch."""

    index: int
    item: Item
    task: Task
    prompts: list[Prompt] = field(default_factory=list)
    generated: list[Generated] = field(default_factory=list)
    # Images waiting for the batch's one SEED encoder call; their prompt is built after it.
    images: list[Any] = field(default_factory=list)
    # cot_visual's second stage: the first stage it follows.
    drawing: Pending | None = None
    # asr: each prompt's (start, end) in seconds of the recording, for the result's segments.
    spans: list[tuple[float, float]] = field(default_factory=list)


class Run:
    """The state of one run: the Mio, the settings, and examples encoded once."""

    def __init__(self, mio: Any, name: str, settings: StreamSettings) -> None:
        self.mio = mio
        self.name = name
        self.settings = settings
        self.options = settings.options
        self.runtime = mio.runtime
        self._examples: list[tuple[list[str], list[str], str]] | None = None
        self._budgets: dict[str, PromptBudget] = {}
        self._required: set[str] = set()

    # ---- media → token strings -----------------------------------------------------------
    def load(self, item: Item) -> list[Any]:
        loaded: list[Any] = []
        frames = self.settings.frames
        if self.name == "video_caption" and self.runtime.variant == "base":
            # The reference's infer.py describes videos to the Base model from uniform frames.
            frames = replace(frames, uniform=True)
        for media in item.media:
            if media.kind == VIDEO and media.path is not None:
                from miocli.core.room import check_video, free_ram

                # Keyframes are decoded into RAM: the runtime's budget (loaded parts counted) is RAM on
                # the CPU only, VRAM on a GPU.
                budget = self.runtime.budget()
                on_cpu = self.runtime.device.type == "cpu"
                check_video(media.path, media.name, frames,
                            (budget.free if budget.total else None) if on_cpu else free_ram())
            decoded = media.load(frames)
            if media.kind == AUDIO:
                from miocli.media.audio import is_silent

                if any(is_silent(wave) for wave in decoded):
                    log.warning(f"warning: {media.name}: the recording is silent")
            loaded.extend(decoded)
        return loaded

    def image_strings(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        ids = mediatokens.image_ids(self.runtime, images, batch_size=ENCODE_BATCH)
        return [protocol.image_ids_to_string(i) for i in ids]

    def speech_string(self, wave: Any, with_timbre: bool) -> str:
        return mediatokens.speech_string(self.runtime, wave, with_timbre)

    def examples(self) -> list[tuple[list[str], list[str], str]]:
        """The in-context examples as token strings, encoded on first use and kept for the run."""
        if self._examples is None:
            self._examples = []
            for example in self.settings.examples:
                media = example.media.load(self.settings.frames)
                if example.media.kind == AUDIO:
                    strings = ([], [self.speech_string(wave, False) for wave in media])
                else:
                    strings = (self.image_strings(media), [])
                self._examples.append((*strings, example.answer))
        return self._examples

    # ---- prompts ---------------------------------------------------------------------------
    def task_for(self, item: Item) -> Task:
        name = self.name
        if name == "ask":
            kind = item.media[0].kind if item.media else IMAGE
            task = TASKS[{AUDIO: "ask-audio", VIDEO: "ask-video"}.get(kind, "ask-image")]
        elif name == "chat":
            task = TASKS["speak" if item.fields.get("mode") == "voice" else "chat"]
        else:
            task = TASKS[name.replace("_", "-")]
        if self.settings.template is not None:
            task = replace(task, instruct=self.settings.template)
        return task

    def budget(self, task: Task) -> PromptBudget:
        if task.name not in self._budgets:
            self._budgets[task.name] = PromptBudget.for_task(self.mio.engine, task, self.options.overrides())
        return self._budgets[task.name]

    def prompt(self, task: Task, item: Item, images: list[str], speeches: list[str]) -> Prompt:
        """The prompt for this input's media, after the run's in-context examples."""
        if item.prompt is not None:
            return Prompt(item.prompt, images, speeches)
        shots: list[Shot] = []
        all_images: list[str] = []
        all_speeches: list[str] = []
        for example_images, example_speeches, answer in self.examples():
            all_images += example_images
            all_speeches += example_speeches
            shots.append(Shot(len(example_images) or len(example_speeches), answer))
        count = len(speeches) if task.media == AUDIO else len(images)
        text = task_prompt_text(task, self.runtime.variant, item.fields, count, shots=shots)
        return Prompt(text, all_images + images, all_speeches + speeches)

    def require(self, task: Task) -> None:
        """The folder checks of a task's components, once per run: a broken or unsafe model folder is one
        error (exit 3) before any input is read, not one per input."""
        if task.name not in self._required:
            self._required.add(task.name)
            self.runtime.require(task.components())

    def prepare(self, index: int, item: Item) -> Pending:
        """Load and encode one input's media and build its prompt(s); raises MioError for a bad input."""
        task = self.task_for(item)
        self.require(task)
        if item.turns is not None and item.prompt is None:
            item = self.conversation_item(task, item)
        media = self.load(item)
        pending = Pending(index, item, task)
        if task.media == AUDIO or any(m.kind == AUDIO for m in item.media):
            per_frame = protocol.SPEECH_LAYERS_IN_OUTPUT if item.with_timbre else 1
            parts = self.budget(task).fit(item.name, item.fields, media, per_frame)
            if task.name == "asr":
                pending.spans = _spans([len(part[0]) for part in parts])
            for part in parts:
                speeches = [self.speech_string(wave, item.with_timbre) for wave in part]
                pending.prompts.append(self.prompt(task, item, [], speeches))
        elif media:
            pending.images = media  # the prompt is built once the batch's images are encoded
        else:
            pending.prompts.append(self.prompt(task, item, [], []))
        return pending

    def encode_turns(self, turns: Sequence[Any]) -> None:
        """Give every media part of a conversation not encoded yet its token strings (`mio ask`'s codec calls)."""
        waiting: list[tuple[Any, list[Any]]] = []
        ask = {AUDIO: "ask-audio", VIDEO: "ask-video"}
        for n, turn in enumerate(turns):
            # mio's own answers are in the prompt as generated (`Turn.raw`): their parts are only files.
            for part in turn.media if turn.raw is None else []:
                if part.tokens is not None:
                    continue
                if part.media is None:
                    raise UsageError(f"message {n}: a {part.kind} part without its media")
                try:
                    self.require(TASKS[ask.get(part.kind, "ask-image")])
                    loaded = self.load(Item(part.media.name, media=[part.media]))
                    if part.kind == AUDIO:
                        part.tokens = [self.speech_string(wave, False) for wave in loaded]
                    else:
                        waiting.append((part, loaded))
                except InputError as exc:
                    raise InputError(f"message {n}: {exc.message}", exc.hint,
                                     source=exc.source or part.media.name) from None
        strings = self.image_strings([image for _, images in waiting for image in images])
        for part, images in waiting:
            part.tokens, strings = strings[: len(images)], strings[len(images):]

    def conversation_item(self, task: Task, item: Item) -> Item:
        """A conversation's media encoded and its prompt fitted to the context; past it, this input's error."""
        from miocli.core import chatrun

        try:
            self.encode_turns(item.turns or [])
            fitted = chatrun.fit(self.mio, item.turns or [], item.fields.get("mode", "std"),
                                 item.fields.get("add_generation_prompt") != "false",
                                 self.mio.engine.settings_for(task, self.options.overrides()).max_new_tokens, None)
        except UsageError as exc:
            raise InputError(exc.message, exc.hint, source=item.name) from None
        return replace(item, prompt=fitted.prompt, turns=None)

    def prompts_of(self, index: int, item: Item) -> list[Prompt]:
        """The prompt(s) of one input, media encoded; loads no LLM (for --print-prompt)."""
        pending = self.prepare(index, item)
        self.encode_images([pending])
        return pending.prompts

    def encode_images(self, pendings: list[Pending]) -> None:
        """All images of the batch through the SEED encoder together, then into their prompts."""
        owners = [p for p in pendings if p.images]
        strings = self.image_strings([image for p in owners for image in p.images])
        start = 0
        for pending in owners:
            own = strings[start : start + len(pending.images)]
            start += len(pending.images)
            pending.prompts = [self.prompt(pending.task, pending.item, own, [])]
            pending.images = []

    # ---- generation --------------------------------------------------------------------------
    def generate(self, pendings: list[Pending], watch: Callable[[int, list[int]], None] | None = None) -> None:
        """Generate every prompt of the batch: one engine call per task (ask mixes image, audio, video).

        The new ids of an input with one prompt go to `watch` and to the run's `on_tokens` as they come
        (an input of several prompts, a long recording's parts, is generated side by side: its ids
        would interleave); the run's `cancelled` stops an input's prompts.
        """
        by_task: dict[str, list[Pending]] = {}
        for pending in pendings:
            by_task.setdefault(pending.task.name, []).append(pending)
        options = self.options
        for group in by_task.values():
            prompts = [prompt for p in group for prompt in p.prompts]
            owners = [p for p in group for _ in p.prompts]
            samples = [p.item.sample for p in owners]
            seeds = [options.seed if p.item.seed is None else p.item.seed for p in owners]
            # The LLM is in use until its answers are out: a component loaded meanwhile (an interleaved
            # story's images) never releases it.
            with self.runtime.using("llm"):
                generated = self.mio.engine.run(
                    group[0].task, prompts, overrides=options.overrides(), batch_size=options.batch_size,
                    seed=seeds, samples=samples, constrain=options.constrain,
                    on_tokens=self._token_router(owners, watch), cancelled=self._cancel_check(owners),
                )
            start = 0
            for pending in group:
                pending.generated = generated[start : start + len(pending.prompts)]
                start += len(pending.prompts)

    def _token_router(self, owners: list[Pending],
                      watch: Callable[[int, list[int]], None] | None) -> Callable[[int, list[int]], None] | None:
        """The engine's (prompt n, ids) as (input index, ids), for inputs of one prompt."""
        listeners = [f for f in (watch, self.settings.on_tokens) if f is not None]
        if not listeners:
            return None
        single = {p.index for p in owners if len(p.prompts) == 1}

        def route(n: int, ids: list[int]) -> None:
            index = owners[n].index
            if index in single:
                for listener in listeners:
                    listener(index, ids)

        return route

    def _cancel_check(self, owners: list[Pending]) -> Callable[[int], bool] | None:
        cancelled = self.settings.cancelled
        if cancelled is None:
            return None
        return lambda n: bool(cancelled(owners[n].index))

    def check_lengths(self, pending: Pending) -> None:
        """A prompt too long for the context is this input's error, not the batch's."""
        engine = self.mio.engine
        settings = engine.settings_for(pending.task, self.options.overrides())
        kinds = [media.kind for media in pending.item.media]
        # What fills the prompt most: a video's frames, then a recording, then images.
        kind = next((k for k in (VIDEO, AUDIO, IMAGE) if k in kinds), None)
        for row in engine.encode(pending.prompts):
            try:
                engine.check_prompt_length(pending.task, settings, len(row), kind)
            except UsageError as exc:
                raise InputError(exc.message, exc.hint, source=pending.item.name) from None

    # ---- decoding ----------------------------------------------------------------------------
    def images(self, id_lists: list[list[int]]) -> list[Any]:
        # One picture per unCLIP call: a batched UNet rounds differently (a few pixels off by one),
        # and a seeded image must not depend on what else was decoded with it.
        count = len(id_lists)
        return [image for number, ids in enumerate(id_lists, start=1)
                for image in mediatokens.images_from_ids(self.runtime, [ids], self.settings.pixel,
                                                         progress=self._steps(number, count))]

    def _steps(self, number: int, count: int) -> Callable[[int, int], None] | None:
        on_step = self.settings.on_step
        if on_step is None:
            return None
        label = "denoising" if count == 1 else f"denoising image {number} of {count}"
        return lambda done, total: on_step(label, done, total)

    def audio(self, codes: list[list[list[int]]]) -> list[Audio]:
        return [Audio(mediatokens.speech_from_codes(self.runtime, c)) for c in codes]

    def results(self, pendings: list[Pending]) -> list[Result]:
        """Each input's answer, with the media its task outputs decoded: the batch's images go
        through unCLIP one picture at a time (`images`)."""
        results = [joined_result(self.name, p.item.name, p.index, p.generated, p.spans) for p in pendings]
        outputs = [p.task.output for p in pendings]
        painted = [r for r, output in zip(results, outputs) if output in (IMAGE_OUT, MIXED_OUT)]
        images = self.images([ids for r in painted for ids in r.image_ids])
        for result in painted:
            result.images, images = images[: len(result.image_ids)], images[len(result.image_ids) :]
        for result, output in zip(results, outputs):
            if output in (SPEECH_OUT, MIXED_OUT):
                result.audio = self.audio(result.speech_codes)
            if self.name == "chat" and result.error is None:
                self._conversation_media(result)
            wanted = {IMAGE_OUT: result.image_ids, SPEECH_OUT: result.speech_codes}.get(output)
            if wanted is not None and not wanted:
                result.error = InputError(f"the model produced no {output}", source=result.input,
                                          hint="run again with --constrain (the default) or a larger --max-new-tokens")
        return results


    def _conversation_media(self, result: Result) -> None:
        """A conversation's answer may hold pictures and speech in any mode: decoded like any task's."""
        try:
            if result.image_ids and not result.images:
                result.images = self.images(result.image_ids)
            if result.speech_codes and not result.audio:
                result.audio = self.audio(result.speech_codes)
        except MioError as exc:
            result.problems.append(f"could not decode the answer's media: {exc.message}")


def encode_conversation(mio: Any, turns: Sequence[Any], frames: FrameOptions | None = None) -> None:
    """`Run.encode_turns` outside a run (Mio.chat, Mio.conversation_prompt)."""
    from miocli.core.generation import GenerationOptions

    Run(mio, "chat", StreamSettings(GenerationOptions(), frames=frames or FrameOptions())).encode_turns(turns)


def _spans(lengths: list[int]) -> list[tuple[float, float]]:
    """(start, end) seconds of consecutive parts of `lengths` samples (the splitter leaves no gaps)."""
    spans, start = [], 0
    for length in lengths:
        spans.append((start / SPEECH_RATE, (start + length) / SPEECH_RATE))
        start += length
    return spans


def joined_result(task: str, name: str, index: int, replies: list[Generated],
                  spans: Sequence[tuple[float, float]] = ()) -> Result:
    """One input's result from its generation(s): the parts of a long recording joined in order, each
    part a segment with its times when `spans` gives them."""
    parsed = [g.parsed for g in replies]
    count = len(replies)
    problems = [f"{f'part {n + 1} of {count}: ' if count > 1 else ''}malformed {p.kind} segment: {p.reason}"
                for n, parse in enumerate(parsed) for p in parse.problems]
    text = parsed[0].text if count == 1 else " ".join(p.text.strip() for p in parsed if p.text.strip())
    return Result(
        task=task, input=name, index=index, text=text, raw=" ".join(g.raw_text for g in replies),
        token_ids=[i for g in replies for i in g.token_ids], problems=problems,
        image_ids=[s.ids for p in parsed for s in p.images], speech_codes=[s.codes for p in parsed for s in p.speeches],
        chunks=count,
        segments=[Segment(start, end, p.text.strip()) for (start, end), p in zip(spans, parsed)],
    )
