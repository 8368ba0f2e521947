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

import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from miocli import protocol
from miocli.core import mediatokens
from miocli.core.composite import cot_visual, interleave
from miocli.core.inputs import Item
from miocli.core.results import Result
from miocli.core.steps import ENCODE_BATCH, Pending, Run, StreamSettings, batches, error_result
from miocli.core.tasks import AUDIO
from miocli.errors import InputError, UsageError

# Token strings decoded before their pictures are handed over (detokenize).
DECODE_BATCH = 8

# The task names of the API (Mio.stream, the server, Ray) and the commands they stand for.
API_TASKS = ("caption", "ask", "imagine", "edit", "asr", "tts", "speak", "speech2speech", "video_caption",
             "video_gen", "interleave", "cot_visual", "tokenize", "detokenize", "chat", "generate")


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


# ---- runners: one per shape of task ------------------------------------------------------------
def _single_stage(run: Run, items: Iterable[Item]) -> Iterator[Result]:
    """Tasks with one generation per input: caption, ask, imagine, edit, asr, tts, speak, …"""
    for batch in batches(items, run.options.batch_size):
        results: dict[int, Result] = {}
        pendings: list[Pending] = []
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
    "interleave": interleave,
    "cot_visual": cot_visual,
    "tokenize": _tokenize,
    "detokenize": _detokenize,
}
