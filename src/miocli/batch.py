"""Running one task over many inputs: media → prompts → one batched generation → files and records.

An input that fails (unreadable file, malformed output) is reported and counted; the others
still run. The caller turns the failure count into the exit code.
"""

from __future__ import annotations

import glob
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from miocli import mediatokens, protocol
from miocli.errors import InputError, MioError, UsageError, report
from miocli.outputs import OutputDir, atomic_write, atomic_write_text, print_record, relative_to
from miocli.pipeline import Prompt, Shot, task_prompt_text
from miocli.tasks import AUDIO, IMAGE, VIDEO, Task

EXTENSIONS = {
    IMAGE: {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"},
    AUDIO: {".wav", ".flac", ".ogg", ".mp3", ".opus"},
    VIDEO: {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"},
}


def expand_inputs(values: Iterable[str], kind: str, recursive: bool = False) -> list[Path]:
    """Files from arguments: paths, folders (recursive with -r), globs, or '-' (paths on stdin)."""
    found: list[Path] = []
    for value in values:
        if value == "-":
            found.extend(Path(line.strip()) for line in sys.stdin.read().splitlines() if line.strip())
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            found.extend(sorted(p for p in walker if p.is_file() and p.suffix.lower() in EXTENSIONS[kind]))
        elif not path.exists() and glob.has_magic(value):
            found.extend(sorted(Path(p) for p in glob.glob(value, recursive=recursive)))
        else:
            found.append(path)  # a missing file is reported as that input's failure
    if not found:
        raise UsageError("no input files", hint=f"give {kind} files, folders (with -r to recurse), globs or '-'")
    return found


# MIO_PROTOCOL §4: one token per layer for every 320 samples of 16 kHz audio, i.e. 50 per second.
SPEECH_HOP = 320
SPEECH_RATE = 16000
# Tasks whose answers for consecutive parts of one recording can be joined into one answer.
SPLITTABLE_TASKS = frozenset({"asr"})
# Below this a split would cut a recording into slivers too short to say a word in.
MIN_PART_SECONDS = 1.0


@dataclass
class Job:
    name: str
    stem: str
    fields: dict[str, str] = field(default_factory=dict)
    load_media: Callable[[], list[Any]] | None = None
    media_strings: Callable[[list[Any]], tuple[list[str], list[str]]] | None = None
    # Audio jobs: prompt tokens per 20 ms frame of each recording (1 for content, 4 with timbre);
    # 0 for jobs whose media are not recordings. Lets run_jobs check the length before encoding.
    speech_tokens_per_frame: int = 0
    # In-context examples put before this job's question (`--example MEDIA ANSWER`).
    examples: list[Example] = field(default_factory=list)

    def media_prompt(self, task: Task, variant: str, media: list[Any]) -> Prompt:
        """The prompt for `media` (all of this job's media, or one part of a long recording),
        after the job's in-context examples."""
        shots: list[Shot] = []
        images: list[str] = []
        speeches: list[str] = []
        for example in self.examples:
            example_images, example_speeches = example.strings()
            images += example_images
            speeches += example_speeches
            shots.append(Shot(len(example_images) or len(example_speeches), example.answer))
        own_images, own_speeches = self.media_strings(media) if self.media_strings else ([], [])
        count = len(own_images) if task.media in (IMAGE, VIDEO) else len(own_speeches)
        text = task_prompt_text(task, variant, self.fields, count, shots=shots)
        return Prompt(text, images + own_images, speeches + own_speeches)


@dataclass
class Example:
    """A solved example: media (loaded like a job's) and the answer it should get."""

    job: Job
    answer: str
    _strings: tuple[list[str], list[str]] | None = None

    def strings(self) -> tuple[list[str], list[str]]:
        # Encoded once, however many jobs of the batch show it.
        if self._strings is None:
            job = self.job
            media = job.load_media() if job.load_media else []
            self._strings = job.media_strings(media) if job.media_strings else ([], [])
        return self._strings


@dataclass
class BatchSettings:
    out: OutputDir | None
    as_json: bool
    pixel: mediatokens.PixelOptions = field(default_factory=mediatokens.PixelOptions)
    audio_format: str = "wav"
    show_names: bool = False


def _main_output_name(task: Task, job: Job, settings: BatchSettings) -> str:
    suffix = {"image": "png", "speech": settings.audio_format}.get(task.output, "txt")
    return f"{job.stem}.{task.name}.{suffix}"


def run_jobs(mio: Any, task: Task, jobs: list[Job], settings: BatchSettings, options: Any) -> int:
    """Run `task` for every job; returns how many failed.

    A recording too long for one prompt is split into parts for `asr` (each part is its own
    prompt in the same batched generation; the texts are joined in order) and is that input's
    error for the other audio tasks.
    """
    failures = 0
    if task.output in ("image", "speech", "mixed") and settings.out is None:
        raise UsageError(f"`mio {task.name}` writes files", hint="pass -o DIR")
    budget = prompt_budget(mio, task, options)
    prompts: list[Prompt] = []
    ready: list[tuple[Job, int]] = []  # each job with its number of prompts (parts)
    for job in jobs:
        if settings.out is not None and settings.out.skip_existing and settings.out.exists(
            _main_output_name(task, job, settings)
        ):
            print(f"mio: skipping {job.name}: its output exists", file=sys.stderr)
            continue
        try:
            job_prompts = job_prompts_for(mio, task, job, budget)
        except MioError as exc:
            report(exc, job.name)
            failures += 1
            continue
        prompts.extend(job_prompts)
        ready.append((job, len(job_prompts)))
    if not ready:
        return failures
    replies = mio.run(task, prompts, options)
    start = 0
    for job, count in ready:
        group = replies[start : start + count]
        start += count
        try:
            failures += _write_result(mio, task, job, join_replies(group), settings, chunks=count)
        except MioError as exc:
            report(exc, job.name)
            failures += 1
    return failures


def prompt_budget(mio: Any, task: Task, options: Any) -> PromptBudget | None:
    """The speech budget of an audio task's prompts (None for tasks without recordings)."""
    return PromptBudget.for_task(mio, task, options) if task.media == AUDIO else None


def job_prompts_for(mio: Any, task: Task, job: Job, budget: PromptBudget | None) -> list[Prompt]:
    """A job's prompts: one, or one per part of a recording too long for one prompt."""
    media = job.load_media() if job.load_media else []
    parts = [media]
    if budget is not None and job.speech_tokens_per_frame:
        parts = budget.fit(job, media)
    return [job.media_prompt(task, mio.runtime.variant, part) for part in parts]


@dataclass(frozen=True)
class PromptBudget:
    """How many speech tokens fit one prompt of a task: the LLM's context minus the rest of
    the prompt and the room kept for the answer (the task's max_new_tokens)."""

    mio: Any
    task: Task
    context: int | None
    answer_tokens: int

    @classmethod
    def for_task(cls, mio: Any, task: Task, options: Any) -> PromptBudget:
        overrides = options.overrides() if options is not None else None
        answer = mio.engine.settings_for(task, overrides).max_new_tokens
        return cls(mio, task, context_length(mio.runtime), answer)

    def overhead(self, job: Job, recordings: int) -> int:
        """Prompt tokens besides the recordings' codes (chat template, question, <spch></spch>)."""
        text = task_prompt_text(self.task, self.mio.runtime.variant, job.fields, recordings)
        # One code per segment, taken off again: measures the markers as they really tokenize.
        dummy = [protocol.SPEECH_BEGIN + "<spch0>" + protocol.SPEECH_END] * recordings
        return len(self.mio.prompt_ids(Prompt(text, [], dummy))) - recordings

    def fit(self, job: Job, waves: list[Any]) -> list[list[Any]]:
        """`waves` as one prompt's media, or (splittable tasks, one recording) as several parts.

        Raises InputError naming the duration and the limit when the recording cannot fit.
        """
        if self.context is None or not waves:
            return [waves]
        per_frame = job.speech_tokens_per_frame
        frames = sum(math.ceil(len(w) / SPEECH_HOP) for w in waves)
        overhead = self.overhead(job, len(waves))
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
                source=job.name,
            )
        if self.task.name not in SPLITTABLE_TASKS or len(waves) != 1:
            raise InputError(
                f"the recording is {format_duration(seconds)} long; one `{self.task.name}` prompt holds at most "
                f"{format_duration(limit)} of speech: {where}",
                hint=f"trim it to at most {format_duration(limit)} (e.g. `ffmpeg -i IN -t {math.floor(limit)} "
                "OUT.wav`), pass a smaller --max-new-tokens, or transcribe it with `mio asr`, which splits long "
                "recordings",
                source=job.name,
            )
        bounds = split_for_prompt(waves[0], limit, SPEECH_RATE)
        cuts = ", ".join(format_duration(end / SPEECH_RATE) for _, end in bounds[:-1])
        print(f"mio: {job.name}: {format_duration(seconds)} is longer than one prompt holds "
              f"({format_duration(limit)}): transcribing it in {len(bounds)} parts cut at {cuts}", file=sys.stderr)
        return [[waves[0][start:end]] for start, end in bounds]


def context_length(runtime: Any) -> int | None:
    """The LLM's context (max_position_embeddings), from config.json so the LLM need not load yet."""
    if "llm" in runtime.loaded():
        value = getattr(runtime.llm.config, "max_position_embeddings", None)
    else:
        try:
            value = json.loads((runtime.model_dir / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            value = None  # a broken config.json is reported when the LLM loads
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def join_replies(replies: list[Any]) -> Any:
    """One reply from the replies to consecutive parts of one input: texts joined with a space."""
    if len(replies) == 1:
        return replies[0]
    count = len(replies)
    return replace(
        replies[0],
        text=" ".join(r.text.strip() for r in replies if r.text.strip()),
        raw=" ".join(r.raw for r in replies),
        token_ids=[i for r in replies for i in r.token_ids],
        problems=[f"part {n + 1} of {count}: {p}" for n, r in enumerate(replies) for p in r.problems],
        images=[ids for r in replies for ids in r.images],
        speeches=[codes for r in replies for codes in r.speeches],
    )


def _write_result(mio: Any, task: Task, job: Job, reply: Any, settings: BatchSettings, chunks: int = 1) -> int:
    runtime = mio.runtime
    out = settings.out
    record: dict[str, Any] = {"task": task.name, "input": job.name, "text": reply.text, "problems": reply.problems,
                              "files": []}
    if chunks > 1:
        record["chunks"] = chunks
    for problem in reply.problems:
        print(f"mio: warning: {job.name}: {problem}", file=sys.stderr)
    failed = 0
    if out is not None:
        if task.output in ("image", "mixed") or reply.images:
            images = mediatokens.images_from_ids(runtime, reply.images, settings.pixel) if reply.images else []
            for index, image in enumerate(images):
                number = "" if index == 0 else f"-{index + 1}"
                path = out.target(f"{job.stem}.{task.name}{number}.png", source=job.name)
                atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                record["files"].append(relative_to(path, out.path))
        if task.output in ("speech", "mixed") or reply.speeches:
            from miocli.media.audio import write_audio

            suffix = settings.audio_format
            for index, codes in enumerate(reply.speeches):
                wave = mediatokens.speech_from_codes(runtime, codes)
                number = "" if index == 0 else f"-{index + 1}"
                path = out.target(f"{job.stem}.{task.name}{number}.{suffix}", source=job.name)
                atomic_write(path, lambda tmp, wave=wave: write_audio(tmp, wave, 16000, format=suffix))
                record["files"].append(relative_to(path, out.path))
        if task.output == "text":
            path = out.target(f"{job.stem}.{task.name}.txt", source=job.name)
            atomic_write_text(path, reply.text + "\n")
            record["files"].append(relative_to(path, out.path))
        expected = {"image": reply.images, "speech": reply.speeches}.get(task.output)
        if expected is not None and not expected:
            print(f"mio: error: {job.name}: the model produced no {task.output}", file=sys.stderr)
            record["error"] = f"no {task.output} in the output"
            failed = 1
        out.add_record(record)
    if settings.as_json:
        print_record(record)
    elif task.output == "text" and out is None:
        print(f"{job.name}: {reply.text}" if settings.show_names else reply.text, flush=True)
    return failed


def image_job(path: Path, fields: dict[str, str], runtime: Any) -> Job:
    from miocli.media.image import load_image

    return Job(
        name=str(path), stem=path.stem, fields=fields,
        load_media=lambda: [load_image(path)],
        media_strings=lambda media: (mediatokens.image_strings(runtime, media), []),
    )


def audio_job(path: Path, fields: dict[str, str], runtime: Any, with_timbre: bool = False) -> Job:
    from miocli.media.audio import is_silent, read_audio

    def load() -> list[Any]:
        wave = read_audio(path)
        if is_silent(wave):
            print(f"mio: warning: {path}: the recording is silent", file=sys.stderr)
        return [wave]

    return Job(
        name=str(path), stem=path.stem, fields=fields, load_media=load,
        media_strings=lambda media: ([], [mediatokens.speech_string(runtime, w, with_timbre) for w in media]),
        speech_tokens_per_frame=protocol.SPEECH_LAYERS_IN_OUTPUT if with_timbre else 1,
    )

