"""The task core: inputs in, results out, one batch at a time.

    media → encode → prompt → generate → decode

for `batch_size` inputs at a time, yielding each input's `Result` as soon as its batch is
decoded, in input order. Inputs are read lazily from any iterable, so memory holds one batch
whatever the number of inputs. Nothing here writes files or prints: the CLI's writer, a
server or a Ray worker consumes the results. Notices (a recording split in parts, a silent
recording) go to the "miocli" logger.

A bad input becomes that input's `Result.error`; a model or environment problem (exit code 3)
or a usage error ends the stream with the exception.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

from miocli import mediatokens, protocol
from miocli.errors import InputError, MioError, UsageError
from miocli.inputs import Example, Item
from miocli.media.video import FrameOptions
from miocli.pipeline import Generated, Prompt, PromptBudget, Shot, task_prompt_text
from miocli.results import Audio, Result, Step, StoryPart
from miocli.tasks import AUDIO, IMAGE, IMAGE_OUT, MIXED_OUT, SPEECH_OUT, TASKS, VIDEO, Task

log = logging.getLogger("miocli")

# Images per SEED encoder call (a batch's images go through together, bounded so that one input
# with many frames cannot take all the memory), and token strings decoded before their pictures
# are handed over (detokenize).
ENCODE_BATCH = 32
DECODE_BATCH = 8

# The task names of the API (Mio.stream, the server, Ray) and the commands they stand for.
API_TASKS = ("caption", "ask", "imagine", "edit", "asr", "tts", "speak", "speech2speech", "video_caption",
             "video_gen", "interleave", "cot_visual", "tokenize", "detokenize", "chat", "generate")


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


def run(mio: Any, task: str, items: Iterable[Item], settings: StreamSettings) -> Iterator[Result]:
    """Results of `task` for `items`, in order, batch by batch."""
    runner = _RUNNERS.get(task)
    if runner is None:
        raise UsageError(f"unknown task {task!r}", hint=f"use one of {', '.join(API_TASKS)}")
    if settings.options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    # Every image decoded in this run starts from the same noise, as in the reference.
    if settings.pixel.seed is None:
        settings = replace(settings, pixel=replace(settings.pixel, seed=secrets.randbits(31)))
    return runner(Run(mio, task, settings), items)


def batches(items: Iterable[Item], size: int) -> Iterator[list[tuple[int, Item]]]:
    numbered = enumerate(items)
    while chunk := list(islice(numbered, size)):
        yield chunk


def error_result(task: str, index: int, item: Item, exc: MioError) -> Result:
    if isinstance(exc, InputError) and exc.source is None:
        exc.source = item.name
    return Result(task=task, input=item.name, index=index, error=exc)


@dataclass
class _Pending:
    """One input on its way through a batch."""

    index: int
    item: Item
    task: Task
    prompts: list[Prompt] = field(default_factory=list)
    generated: list[Generated] = field(default_factory=list)
    # Images waiting for the batch's one SEED encoder call; their prompt is built after it.
    images: list[Any] = field(default_factory=list)
    # cot_visual's second stage: the first stage it follows.
    drawing: _Pending | None = None


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

    def prepare(self, index: int, item: Item) -> _Pending:
        """Load and encode one input's media and build its prompt(s); raises MioError for a bad input."""
        task = self.task_for(item)
        self.require(task)
        media = self.load(item)
        pending = _Pending(index, item, task)
        if task.media == AUDIO or any(m.kind == AUDIO for m in item.media):
            per_frame = protocol.SPEECH_LAYERS_IN_OUTPUT if item.with_timbre else 1
            parts = self.budget(task).fit(item.name, item.fields, media, per_frame)
            for part in parts:
                speeches = [self.speech_string(wave, item.with_timbre) for wave in part]
                pending.prompts.append(self.prompt(task, item, [], speeches))
        elif media:
            pending.images = media  # the prompt is built once the batch's images are encoded
        else:
            pending.prompts.append(self.prompt(task, item, [], []))
        return pending

    def prompts_of(self, index: int, item: Item) -> list[Prompt]:
        """The prompt(s) of one input, media encoded; loads no LLM (for --print-prompt)."""
        pending = self.prepare(index, item)
        self.encode_images([pending])
        return pending.prompts

    def encode_images(self, pendings: list[_Pending]) -> None:
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
    def generate(self, pendings: list[_Pending], on_tokens: Callable[[list[int]], None] | None = None) -> None:
        """Generate every prompt of the batch: one engine call per task (ask mixes image, audio, video)."""
        by_task: dict[str, list[_Pending]] = {}
        for pending in pendings:
            by_task.setdefault(pending.task.name, []).append(pending)
        options = self.options
        for group in by_task.values():
            prompts = [prompt for p in group for prompt in p.prompts]
            samples = [p.item.sample for p in group for _ in p.prompts]
            # The LLM is in use until its answers are out: a component loaded meanwhile (an interleaved
            # story's images) never releases it.
            with self.runtime.using("llm"):
                generated = self.mio.engine.run(
                    group[0].task, prompts, overrides=options.overrides(), batch_size=options.batch_size,
                    seed=options.seed, samples=samples, constrain=options.constrain, on_tokens=on_tokens,
                )
            start = 0
            for pending in group:
                pending.generated = generated[start : start + len(pending.prompts)]
                start += len(pending.prompts)

    def check_lengths(self, pending: _Pending) -> None:
        """A prompt too long for the context is this input's error, not the batch's."""
        engine = self.mio.engine
        settings = engine.settings_for(pending.task, self.options.overrides())
        for row in engine.encode(pending.prompts):
            try:
                engine.check_prompt_length(pending.task, settings, len(row))
            except UsageError as exc:
                raise InputError(exc.message, exc.hint, source=pending.item.name) from None

    # ---- decoding ----------------------------------------------------------------------------
    def images(self, id_lists: list[list[int]]) -> list[Any]:
        # One picture per unCLIP call: a batched UNet rounds differently (a few pixels off by one),
        # and a seeded image must not depend on what else was decoded with it.
        return [image for ids in id_lists for image in mediatokens.images_from_ids(self.runtime, [ids],
                                                                                      self.settings.pixel)]

    def audio(self, codes: list[list[list[int]]]) -> list[Audio]:
        return [Audio(mediatokens.speech_from_codes(self.runtime, c)) for c in codes]

    def results(self, pendings: list[_Pending]) -> list[Result]:
        """Each input's answer, with the media its task outputs decoded: the batch's images go
        through unCLIP together (DECODE_BATCH at a time)."""
        results = [joined_result(self.name, p.item.name, p.index, p.generated) for p in pendings]
        outputs = [p.task.output for p in pendings]
        painted = [r for r, output in zip(results, outputs) if output in (IMAGE_OUT, MIXED_OUT)]
        images = self.images([ids for r in painted for ids in r.image_ids])
        for result in painted:
            result.images, images = images[: len(result.image_ids)], images[len(result.image_ids) :]
        for result, output in zip(results, outputs):
            if output in (SPEECH_OUT, MIXED_OUT):
                result.audio = self.audio(result.speech_codes)
            wanted = {IMAGE_OUT: result.image_ids, SPEECH_OUT: result.speech_codes}.get(output)
            if wanted is not None and not wanted:
                result.error = InputError(f"the model produced no {output}", source=result.input,
                                          hint="run again with --constrain (the default) or a larger --max-new-tokens")
        return results


def joined_result(task: str, name: str, index: int, replies: list[Generated]) -> Result:
    """One input's result from its generation(s): the parts of a long recording joined in order."""
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
    )


# ---- runners: one per shape of task ------------------------------------------------------------
def _single_stage(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Tasks with one generation per input: caption, ask, imagine, edit, asr, tts, speak, …"""
    for batch in batches(items, run.options.batch_size):
        results: dict[int, Result] = {}
        pendings: list[_Pending] = []
        for index, item in batch:
            try:
                pendings.append(run.prepare(index, item))
            except InputError as exc:
                results[index] = error_result(run.name, index, item, exc)
        run.encode_images(pendings)
        ready = []
        for pending in pendings:
            try:
                run.check_lengths(pending)
                ready.append(pending)
            except InputError as exc:
                results[pending.index] = error_result(run.name, pending.index, pending.item, exc)
        if ready:
            run.generate(ready)
        for result in run.results(ready):
            results[result.index] = result
        yield from (results[index] for index, _ in batch)


def _interleave(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Stories of text and images, one input at a time: each image is decoded (and handed to
    `on_part`) as soon as its segment closes, while the rest is still being generated."""
    for index, item in enumerate(items):
        try:
            pending = run.prepare(index, item)
        except InputError as exc:
            yield error_result(run.name, index, item, exc)
            continue
        watcher = _ImageWatcher(run, index)
        run.generate([pending], on_tokens=watcher)
        yield _story(run, pending, watcher)


def _story(run: Run, pending: _Pending, watcher: _ImageWatcher) -> Result:
    generated = pending.generated[0]
    parsed = generated.parsed
    image_ids = [s.ids for s in parsed.images]
    # Images already decoded while streaming are reused; any the stream missed are decoded now.
    images = [watcher.decoded[i][1] if i < len(watcher.decoded) and watcher.decoded[i][0] == ids
              else run.images([ids])[0] for i, ids in enumerate(image_ids)]
    audio = run.audio([s.codes for s in parsed.speeches])
    result = Result(
        task=run.name, input=pending.item.name, index=pending.index, text=parsed.text, raw=generated.raw_text,
        token_ids=generated.token_ids, problems=[f"malformed {p.kind} segment: {p.reason}" for p in parsed.problems],
        images=images, audio=audio, image_ids=image_ids, speech_codes=[s.codes for s in parsed.speeches],
    )
    result.parts = story_parts(parsed.text, images, audio)
    return result


def story_parts(text: str, images: list[Any], audio: list[Audio]) -> list[StoryPart]:
    """The answer in reading order: text pieces between the images and recordings they name."""
    import re

    parts: list[StoryPart] = []
    position = 0
    for match in re.finditer(r"<(image|speech)_placeholder_(\d+)>", text):
        before = text[position : match.start()]
        if before.strip():
            parts.append(StoryPart("text", text=before.strip()))
        number = int(match.group(2))
        if match.group(1) == "image" and number < len(images):
            parts.append(StoryPart("image", image=images[number]))
        elif match.group(1) == "speech" and number < len(audio):
            parts.append(StoryPart("audio", audio=audio[number]))
        position = match.end()
    if text[position:].strip():
        parts.append(StoryPart("text", text=text[position:].strip()))
    return parts


class _ImageWatcher:
    """Watches streamed ids and decodes each image as soon as its segment closes."""

    def __init__(self, run: Run, index: int) -> None:
        tokenizer = run.runtime.tokenizer
        self.run, self.index, self.tokenizer = run, index, tokenizer
        self.begin = tokenizer.token_to_id(protocol.IMAGE_BEGIN)
        self.end = tokenizer.token_to_id(protocol.IMAGE_END)
        self.current: list[int] | None = None
        self.decoded: list[tuple[list[int], Any]] = []

    def __call__(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if token == self.begin:
                self.current = []
            elif token == self.end and self.current is not None:
                ids = protocol.image_ids_from_string(self.tokenizer.decode(self.current))
                self.current = None
                # The parser drops segments of another length too, so the numbering stays in step.
                if len(ids) == protocol.IMAGE_TOKENS_PER_IMAGE:
                    image = self.run.images([ids])[0]
                    self.decoded.append((ids, image))
                    if self.run.settings.on_part is not None:
                        self.run.settings.on_part(self.index, StoryPart("image", image=image))
            elif self.current is not None:
                self.current.append(token)


def _cot_visual(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Chain of visual thought, batch by batch: every input's drawing first (stage 1), then every
    answer with the given image (if any) and the drawing in context (stage 2). The drawing goes
    in as the ids the model wrote, not re-encoded pixels: that is exactly what it "thought"."""
    answer_task = TASKS["cot-answer"]
    for batch in batches(items, run.options.batch_size):
        results: dict[int, Result] = {}
        drawings: list[_Pending] = []
        for index, item in batch:
            try:
                drawings.append(_cot_draw_prompt(run, index, item))
            except InputError as exc:
                results[index] = error_result(run.name, index, item, exc)
        run.encode_images(drawings)
        if drawings:
            run.generate(drawings)
        answers: list[_Pending] = []
        for pending in drawings:
            parsed = pending.generated[0].parsed
            if not parsed.images:
                results[pending.index] = error_result(run.name, pending.index, pending.item, InputError(
                    "the model drew no illustrating image in the first stage",
                    hint="run again with --constrain (the default) or a larger --max-new-tokens"))
                continue
            given = pending.prompts[0].image_strings
            strings = [*given, protocol.image_ids_to_string(parsed.images[0].ids)]
            text = task_prompt_text(answer_task, run.runtime.variant, pending.item.fields, len(strings))
            answer = _Pending(pending.index, pending.item, answer_task, [Prompt(text, strings)], drawing=pending)
            answers.append(answer)
        if answers:
            run.generate(answers)
        pictures = run.images([a.drawing.generated[0].parsed.images[0].ids for a in answers])
        for answer, picture in zip(answers, pictures):
            drawn = answer.drawing.generated[0]
            reply = answer.generated[0]
            words = _without_placeholders(drawn.parsed.text)
            problems = [f"malformed {p.kind} segment: {p.reason}" for p in (*drawn.parsed.problems,
                                                                               *reply.parsed.problems)]
            results[answer.index] = Result(
                task=run.name, input=answer.item.name, index=answer.index, text=reply.parsed.text,
                raw=reply.raw_text, token_ids=reply.token_ids, problems=problems, images=[picture],
                image_ids=[drawn.parsed.images[0].ids],
                steps=[Step("illustrate", words, picture), Step("answer", reply.parsed.text)],
            )
        yield from (results[index] for index, _ in batch)


def _cot_draw_prompt(run: Run, index: int, item: Item) -> _Pending:
    task = TASKS["cot-draw" if item.media else "cot-draw-text"]
    run.require(task)
    pending = _Pending(index, item, task, [Prompt(task_prompt_text(task, run.runtime.variant, item.fields, 0))])
    if item.media:
        pending.images = run.load(item)
    return pending


def _without_placeholders(text: str) -> str:
    import re

    return re.sub(r"<(image|speech)_placeholder_\d+>", "", text).strip()


def _tokenize(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Media → token strings, no LLM: a batch's images go through the SEED encoder together."""
    for batch in batches(items, max(run.options.batch_size, 1)):
        results: dict[int, Result] = {}
        images: list[tuple[int, Item, list[Any]]] = []
        for index, item in batch:
            try:
                media = run.load(item)
                if item.media and item.media[0].kind == AUDIO:
                    layers = protocol.SPEECH_LAYERS_IN_OUTPUT if item.with_timbre else 1
                    codes = [mediatokens.speech_codes(run.runtime, wave, layers) for wave in media]
                    text = "".join(protocol.speech_codes_to_string(c, with_timbre=item.with_timbre) for c in codes)
                    results[index] = Result(task=run.name, input=item.name, index=index, text=text,
                                            speech_codes=codes)
                else:
                    images.append((index, item, media))
            except InputError as exc:
                results[index] = error_result(run.name, index, item, exc)
        flat = [image for _, _, media in images for image in media]
        ids = mediatokens.image_ids(run.runtime, flat, batch_size=ENCODE_BATCH) if flat else []
        start = 0
        for index, item, media in images:
            own = ids[start : start + len(media)]
            start += len(media)
            results[index] = Result(task=run.name, input=item.name, index=index, image_ids=own,
                                    text="".join(protocol.image_ids_to_string(i) for i in own))
        yield from (results[index] for index, _ in batch)


def _detokenize(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Token strings → images and recordings, no LLM: DECODE_BATCH inputs' images per unCLIP call."""
    for batch in batches(items, DECODE_BATCH):
        results = []
        for index, item in batch:
            parsed = protocol.parse_output(item.fields.get("tokens", ""), extract=False)
            result = Result(task=run.name, input=item.name, index=index, text=parsed.text,
                            problems=[f"malformed {p.kind} segment: {p.reason}" for p in parsed.problems],
                            image_ids=[s.ids for s in parsed.images], speech_codes=[s.codes for s in parsed.speeches])
            if not parsed.images and not parsed.speeches:
                result.error = InputError("no complete <image>…</image> or <spch>…</spch> segment in the input",
                                          source=item.name)
            results.append(result)
        todo = [r for r in results if r.ok]
        if run.settings.embeddings_only:
            for result in todo:
                result.embeddings = mediatokens.image_embeddings(run.runtime, result.image_ids).numpy()
        else:
            images = run.images([ids for r in todo for ids in r.image_ids])
            for result in todo:
                result.images, images = images[: len(result.image_ids)], images[len(result.image_ids) :]
        for result in todo:
            result.audio = run.audio(result.speech_codes)
        yield from results


_RUNNERS: dict[str, Callable[[Run, Iterable[Item]], Iterator[Result]]] = {
    **{name: _single_stage for name in ("caption", "ask", "imagine", "edit", "asr", "tts", "speak", "speech2speech",
                                        "video_caption", "video_gen", "chat", "generate")},
    "interleave": _interleave,
    "cot_visual": _cot_visual,
    "tokenize": _tokenize,
    "detokenize": _detokenize,
}
