"""Running one task over many inputs: media → prompts → one batched generation → files and records.

An input that fails (unreadable file, malformed output) is reported and counted; the others
still run. The caller turns the failure count into the exit code.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miocli import mediatokens
from miocli.errors import MioError, UsageError
from miocli.outputs import OutputDir, atomic_write, atomic_write_text, relative_to
from miocli.pipeline import Prompt, task_prompt_text
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


@dataclass
class Job:
    name: str
    stem: str
    fields: dict[str, str] = field(default_factory=dict)
    load_media: Callable[[], list[Any]] | None = None
    media_strings: Callable[[list[Any]], tuple[list[str], list[str]]] | None = None


@dataclass
class BatchSettings:
    out: OutputDir | None
    as_json: bool
    pixel: mediatokens.PixelOptions = field(default_factory=mediatokens.PixelOptions)
    audio_format: str = "wav"
    show_names: bool = False


def _report(job: Job, exc: MioError) -> None:
    print(f"mio: error: {job.name}: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"  hint: {exc.hint}", file=sys.stderr)


def _main_output_name(task: Task, job: Job, settings: BatchSettings) -> str:
    suffix = {"image": "png", "speech": settings.audio_format}.get(task.output, "txt")
    return f"{job.stem}.{task.name}.{suffix}"


def run_jobs(mio: Any, task: Task, jobs: list[Job], settings: BatchSettings, options: Any) -> int:
    """Run `task` for every job; returns how many failed."""
    failures = 0
    runtime = mio.runtime
    if task.output in ("image", "speech", "mixed") and settings.out is None:
        raise UsageError(f"`mio {task.name}` writes files", hint="pass -o DIR")
    prompts: list[Prompt] = []
    ready: list[Job] = []
    for job in jobs:
        if settings.out is not None and settings.out.skip_existing and settings.out.exists(
            _main_output_name(task, job, settings)
        ):
            print(f"mio: skipping {job.name}: its output exists", file=sys.stderr)
            continue
        try:
            media = job.load_media() if job.load_media else []
            images, speeches = job.media_strings(media) if job.media_strings else ([], [])
            count = len(images) if task.media in (IMAGE, VIDEO) else len(speeches)
            text = task_prompt_text(task, runtime.variant, job.fields, count)
        except MioError as exc:
            _report(job, exc)
            failures += 1
            continue
        prompts.append(Prompt(text, images, speeches))
        ready.append(job)
    if not ready:
        return failures
    replies = mio.run(task, prompts, options)
    for job, reply in zip(ready, replies):
        try:
            failures += _write_result(mio, task, job, reply, settings)
        except MioError as exc:
            _report(job, exc)
            failures += 1
    return failures


def _write_result(mio: Any, task: Task, job: Job, reply: Any, settings: BatchSettings) -> int:
    runtime = mio.runtime
    out = settings.out
    record: dict[str, Any] = {"task": task.name, "input": job.name, "text": reply.text, "problems": reply.problems,
                              "files": []}
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
        sys.stdout.write(__import__("json").dumps(record, ensure_ascii=False) + "\n")
    elif task.output == "text" and out is None:
        print(f"{job.name}: {reply.text}" if settings.show_names else reply.text, flush=True)
    return failed


def image_job(path: Path, task: Task, fields: dict[str, str], runtime: Any) -> Job:
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
    )

