"""The tasks of more than one step: interleaved stories (images decoded while the text is written)
and chain of visual thought (draw first, then answer with the drawing in context)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from miocli import protocol
from miocli.core.inputs import Item
from miocli.core.prompts import Prompt, task_prompt_text
from miocli.core.results import Audio, Result, Step, StoryPart
from miocli.core.steps import Pending, Run, batches, error_result
from miocli.core.tasks import TASKS
from miocli.errors import InputError


def interleave(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Stories of text and images, one input at a time: each image is decoded (and handed to
    `on_part`) as soon as its segment closes, while the rest is still being generated."""
    for index, item in enumerate(items):
        try:
            pending = run.prepare(index, item)
        except InputError as exc:
            yield error_result(run.name, index, item, exc)
            continue
        watcher = _ImageWatcher(run, index)
        run.generate([pending], watch=watcher.watch)
        yield _story(run, pending, watcher)


def _story(run: Run, pending: Pending, watcher: _ImageWatcher) -> Result:
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

    def watch(self, _index: int, token_ids: list[int]) -> None:
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


def cot_visual(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Chain of visual thought, batch by batch: every input's drawing first (stage 1), then every
    answer with the given image (if any) and the drawing in context (stage 2). The drawing goes
    in as the ids the model wrote, not re-encoded pixels: that is exactly what it "thought"."""
    answer_task = TASKS["cot-answer"]
    for batch in batches(items, run.options.batch_size):
        results: dict[int, Result] = {}
        drawings: list[Pending] = []
        for index, item in batch:
            try:
                drawings.append(_cot_draw_prompt(run, index, item))
            except InputError as exc:
                results[index] = error_result(run.name, index, item, exc)
        run.encode_images(drawings)
        if drawings:
            run.generate(drawings)
        answers: list[Pending] = []
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
            answer = Pending(pending.index, pending.item, answer_task, [Prompt(text, strings)], drawing=pending)
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


def _cot_draw_prompt(run: Run, index: int, item: Item) -> Pending:
    task = TASKS["cot-draw" if item.media else "cot-draw-text"]
    run.require(task)
    pending = Pending(index, item, task, [Prompt(task_prompt_text(task, run.runtime.variant, item.fields, 0))])
    if item.media:
        pending.images = run.load(item)
    return pending


def _without_placeholders(text: str) -> str:
    import re

    return re.sub(r"<(image|speech)_placeholder_\d+>", "", text).strip()
