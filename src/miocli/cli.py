"""The `mio` command line. Thin: options, inputs, printing; the work is in the API.

Nothing heavy is imported at module level: `mio --help` must not pay for torch or
transformers. Results go to stdout (text, or one JSON object per line with --json);
progress and messages go to stderr. The options shared by many commands live in
`cli_options`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from miocli.cli_options import Common, emit_json, err, fail, with_options
from miocli.errors import InputError, UsageError
from miocli.media.video import DEFAULT_MAX_FRAMES

app = typer.Typer(
    name="mio",
    help="Run MIO, the any-to-any multimodal model: text, images, speech and video in and out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

PIXELS = "Pixels"
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Diffusion steps.", rich_help_panel=PIXELS)]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Guidance scale.", rich_help_panel=PIXELS)]
SizeOpt = Annotated[int, typer.Option("--size", help="Output side in pixels.", rich_help_panel=PIXELS)]
FRAMES = "Video frames"
# media/video.py explains the default: 75 frames × 34 tokens leave room in the 4096-token
# context for the question and a full answer.
MaxFramesOpt = Annotated[int, typer.Option("--max-frames", help="At most this many keyframes per video (each "
                                           "costs 34 prompt tokens).", rich_help_panel=FRAMES)]
UniformOpt = Annotated[bool, typer.Option("--uniform", help="Evenly spaced frames instead of one per scene.",
                                          rich_help_panel=FRAMES)]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="Scene-cut threshold, 0-255 (lower finds "
                                                    "more cuts; default 27).", rich_help_panel=FRAMES)]
ExampleOpt = Annotated[list[str] | None, typer.Option("--example", metavar="MEDIA ANSWER", help="An in-context "
                                                      "example: a media file and the answer it should get "
                                                      "(repeatable; few-shot prompt).")]
# --example takes two values; Typer cannot declare a repeatable two-value option, so `main`
# joins each pair into one value with this separator before Typer parses the line.
EXAMPLE_SEPARATOR = "\x1f"


# ---- plumbing ---------------------------------------------------------------------------------
def print_prompt(mio: Any, prompt_text: str, as_json: bool, **media: Any) -> None:
    from miocli.pipeline import Prompt

    if as_json:
        ids = mio.prompt_ids(Prompt(prompt_text, **media))
        emit_json({"prompt": prompt_text, "input_ids": ids})
    else:
        sys.stdout.write(prompt_text)
        if not prompt_text.endswith("\n"):
            sys.stdout.write("\n")


def read_text_argument(value: str | None, what: str) -> str:
    """A prompt from the command line, or from stdin when it is '-'."""
    if value == "-":
        value = sys.stdin.read()
    if value is None or not value.strip():
        raise UsageError(f"the {what} is empty", hint=f"give the {what} as an argument, or '-' to read stdin")
    return value


def report_problems(name: str, problems: list[str]) -> None:
    for problem in problems:
        err(f"mio: warning: {name}: {problem}")


def _read_file(name: str) -> str:
    try:
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text") from None


def _expand_text_inputs(values: list[str], what: str) -> list[str]:
    texts: list[str] = []
    for value in values:
        if value == "-":
            texts.extend(line for line in sys.stdin.read().splitlines() if line.strip())
        else:
            texts.append(value)
    if not texts or any(not t.strip() for t in texts):
        raise UsageError(f"a {what} is empty", hint=f"give non-empty {what}s, or '-' to read them from stdin")
    return texts


class _progress:
    """A rich progress bar on stderr for work of `total` steps (silent when not a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self._progress: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.total > 1 and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._progress = Progress(console=Console(stderr=True), transient=True)
            self._progress.start()
            task = self._progress.add_task(self.label, total=self.total)
            return lambda n: self._progress.advance(task, n)
        return lambda n: None

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


# ---- text commands ----------------------------------------------------------------------------
@app.command()
@with_options("runtime", "generation", "json", "prompt")
def chat(
    question: Annotated[str | None, typer.Argument(help="The question ('-' reads stdin).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="std, voice or custom.")] = "std",
    system: Annotated[str | None, typer.Option("--system", help="System text (custom mode).")] = None,
    messages: Annotated[str | None, typer.Option("--messages", help="A JSON list of {role, content} turns "
                                                    "from FILE or '-'.")] = None,
    no_generation_prompt: Annotated[bool, typer.Option("--no-generation-prompt", help="Do not open an "
                                                       "assistant turn at the end.")] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Keep asking; history is kept.")] = False,
    *, opts: Common,
) -> int:
    """Chat with the Instruct model: one question, a whole conversation, or an interactive session."""
    if mode not in ("std", "voice", "custom"):
        raise UsageError(f"unknown --mode {mode!r}", hint="use std, voice or custom")
    if system is not None and mode != "custom":
        raise UsageError("--system needs --mode custom")
    options = opts.generation(batch_size=1)
    conversation = _conversation(question, messages, interactive)
    mio = opts.make_mio()
    if interactive:
        return _interactive(mio, conversation, mode, system, options, opts.as_json)
    prompt_text = mio.chat_prompt(conversation, mode=mode, system=system,
                                  add_generation_prompt=not no_generation_prompt)
    if opts.show_prompt:
        print_prompt(mio, prompt_text, opts.as_json)
        return 0
    reply = mio.chat(conversation, mode=mode, system=system, add_generation_prompt=not no_generation_prompt,
                     options=options)
    report_problems("answer", reply.problems)
    if opts.as_json:
        emit_json({"task": "chat", "input": _last_user(conversation), **reply.to_record()})
    else:
        print(reply.text)
    return 0


def _conversation(question: str | None, messages: str | None, interactive: bool) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    if messages is not None:
        source = sys.stdin.read() if messages == "-" else _read_file(messages)
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--messages {messages} is not valid JSON: {exc}") from None
        if not isinstance(data, list) or not data:
            raise UsageError(f"--messages {messages} should hold a non-empty JSON list of {{role, content}} turns")
        turns = data
    if question is not None:
        turns.append({"role": "user", "content": read_text_argument(question, "question")})
    if not turns and not interactive:
        raise UsageError("nothing to ask", hint="give a question, --messages FILE, or -i for a session")
    return turns


def _last_user(conversation: list[dict[str, Any]]) -> str:
    users = [t.get("content") for t in conversation if isinstance(t, dict) and t.get("role") == "user"]
    return str(users[-1]) if users else ""


def _interactive(mio: Any, history: list[dict[str, Any]], mode: str, system: str | None, options: Any,
                 as_json: bool) -> int:
    err("mio: interactive chat; an empty line or Ctrl-D ends it.")
    pending = list(history)
    if pending and pending[-1].get("role") == "user":
        reply = mio.chat(pending, mode=mode, system=system, options=options)
        pending.append({"role": "assistant", "content": reply.raw.strip()})
        print(reply.text, flush=True)
    while True:
        err("you> ")
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        pending.append({"role": "user", "content": line.rstrip("\n")})
        reply = mio.chat(pending, mode=mode, system=system, options=options)
        report_problems("answer", reply.problems)
        # History keeps the raw answer so media the model produced stays in context.
        pending.append({"role": "assistant", "content": reply.raw.strip()})
        if as_json:
            emit_json({"task": "chat", "input": line.strip(), **reply.to_record()})
        else:
            print(reply.text, flush=True)


@app.command()
@with_options("runtime", "generation", "batch", "json", "prompt", "output")
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Raw prompts ('-' reads one prompt per line from stdin).")],
    *, opts: Common,
) -> int:
    """Continue raw text with no chat template (the Base model's way; BOS is prepended)."""
    texts = _expand_text_inputs(prompts, "prompt")
    options = opts.generation()
    mio = opts.make_mio()
    if opts.show_prompt:
        for text in texts:
            print_prompt(mio, mio.raw_prompt(text), opts.as_json)
        return 0
    from miocli.outputs import atomic_write_text, slug

    out = opts.open_output()
    todo = []
    names: dict[int, str] = {}
    for index, text in enumerate(texts):
        name = f"{index + 1:03d}-{slug(text, 30)}.txt"
        if out is not None and out.exists(name) and opts.skip_existing:
            err(f"mio: skipping prompt {index + 1}: {out.path / name} exists")
            continue
        names[index] = name
        todo.append(index)
    failures = 0
    with _progress(len(todo), "generating") as advance:
        replies = mio.generate([texts[i] for i in todo], options) if todo else []
        advance(len(todo))
    for index, reply in zip(todo, replies):
        report_problems(f"prompt {index + 1}", reply.problems)
        record = {"task": "generate", "input": texts[index], **reply.to_record()}
        if out is not None:
            try:
                path = out.target(names[index], source=f"prompt {index + 1}")
            except InputError as exc:
                fail(exc)
                failures += 1
                continue
            atomic_write_text(path, reply.text + "\n")
            record["files"] = [str(path)]
            out.add_record(record)
        if opts.as_json:
            emit_json(record)
        elif out is None:
            print(f"[{index + 1}] {reply.text}" if len(texts) > 1 else reply.text)
    return 1 if failures else 0


# ---- housekeeping -----------------------------------------------------------------------------
@app.command()
@with_options("json")
def doctor(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder or hub id to check.")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="instruct or base.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    *, opts: Common,
) -> int:
    """Report versions, devices, memory, bitsandbytes, and check a model folder."""
    from miocli.doctor import collect, render

    report = collect(model, variant, device)
    if opts.as_json:
        emit_json(report)
    else:
        render(report)
    return 0 if report["checkpoint"].get("ok") else 3


@app.command()
@with_options()
def download(
    variant: Annotated[str, typer.Option("--variant", help="instruct or base.")] = "instruct",
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the hub to answer.")] = 10.0,
    *, opts: Common,
) -> int:
    """Download MIO weights into the Hugging Face cache, on purpose (nothing else ever downloads)."""
    from miocli.download import download_model

    print(download_model(variant, revision=revision, timeout=timeout))
    return 0


@app.command()
@with_options()
def demo(
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Where to write the outputs "
                                                       "(default: a new ./mio-demo folder).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Report what was loaded.")] = False,
    *, opts: Common,
) -> int:
    """Build a tiny random checkpoint and run every task on it (outputs are noise; it proves the install)."""
    from miocli.demo import run_demo

    return run_demo(output_dir, verbose=verbose)


# ---- media tasks ------------------------------------------------------------------------------
def _run_task(task: Any, jobs_for: Callable[[Any], list[Any]], opts: Common, *, options: Any = None,
              pixel: Any = None) -> int:
    """Run a task (a name in TASKS, or a Task) over the jobs `jobs_for(runtime)` builds."""
    from miocli.batch import BatchSettings, run_jobs
    from miocli.tasks import TASKS

    if isinstance(task, str):
        task = TASKS[task]
    if options is None:
        options = opts.generation()
    mio = opts.make_mio()
    jobs = jobs_for(mio.runtime)
    if opts.show_prompt:
        from miocli.batch import job_prompts_for, prompt_budget

        budget = prompt_budget(mio, task, options)
        for job in jobs:
            # A long recording shows the prompt of each part it will be split into.
            for prompt in job_prompts_for(mio, task, job, budget):
                if opts.as_json:
                    emit_json({"prompt": prompt.text, "input_ids": mio.prompt_ids(prompt)})
                else:
                    print_prompt(mio, prompt.text, False)
        return 0
    settings = BatchSettings(out=opts.open_output(), as_json=opts.as_json, show_names=len(jobs) > 1)
    if pixel is not None:
        settings.pixel = pixel
    failures = run_jobs(mio, task, jobs, settings, options)
    return 1 if failures else 0


def _media_kind(path: str) -> str:
    """Image, audio or video, by the file's extension (images are the default)."""
    from miocli.batch import EXTENSIONS
    from miocli.tasks import AUDIO, IMAGE, VIDEO

    suffix = Path(path).suffix.lower()
    return next((kind for kind in (AUDIO, VIDEO) if suffix in EXTENSIONS[kind]), IMAGE)


def _frame_options(max_frames: int, uniform: bool, threshold: float | None) -> Any:
    from miocli.video_tasks import FrameOptions

    if max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1 (got {max_frames})")
    if threshold is not None and not 0 < threshold <= 255:
        raise UsageError(f"--threshold must be between 0 and 255 (got {threshold})")
    return FrameOptions(max_frames=max_frames, uniform=uniform, threshold=threshold)


def _media_jobs(kind: str, paths: list[str], recursive: bool, fields: dict[str, str],
                frames: Any = None) -> Callable[[Any], list]:
    """A builder of one job per input file of `kind` (files, folders, globs or '-')."""

    def build(runtime: Any) -> list[Any]:
        from miocli.batch import audio_job, expand_inputs, image_job
        from miocli.tasks import AUDIO, IMAGE

        found = expand_inputs(paths, kind, recursive)
        if kind == IMAGE:
            return [image_job(p, fields, runtime) for p in found]
        if kind == AUDIO:
            return [audio_job(p, fields, runtime) for p in found]
        from miocli.video_tasks import FrameOptions, video_job

        return [video_job(p, fields, runtime, frames or FrameOptions()) for p in found]

    return build


def _examples(values: list[str] | None, kind: str) -> list[tuple[str, str]]:
    """--example pairs (MEDIA, ANSWER); each must be the same kind of media as the input."""
    pairs = []
    for value in values or []:
        media, separator, answer = value.partition(EXAMPLE_SEPARATOR)
        if not separator:
            raise UsageError("--example needs two values: a media file and its answer",
                             hint='e.g. --example cat.png "A cat asleep on a sofa."')
        if not answer.strip():
            raise UsageError(f"--example {media}: the answer is empty")
        if _media_kind(media) != kind:
            raise UsageError(f"--example {media} is {_media_kind(media)}, the input is {kind}",
                             hint=f"give {kind} examples for a {kind} input")
        pairs.append((media, answer.strip()))
    return pairs


def _with_examples(build: Callable[[Any], list], pairs: list[tuple[str, str]], fields: dict[str, str],
                   frames: Any = None) -> Callable[[Any], list]:
    """Give every job the in-context examples (loaded once per job, like its own media)."""
    if not pairs:
        return build

    def build_with_examples(runtime: Any) -> list[Any]:
        from miocli.batch import Example

        jobs = build(runtime)
        examples = []
        for media, answer in pairs:
            [example_job] = _media_jobs(_media_kind(media), [media], False, fields, frames)(runtime)
            examples.append(Example(example_job, answer))
        for job in jobs:
            job.examples = examples
        return jobs

    return build_with_examples


def _text_jobs(texts: list[str], field_name: str) -> Callable[[Any], list]:
    def build(runtime: Any) -> list[Any]:
        from miocli.batch import Job
        from miocli.outputs import slug

        return [Job(name=t, stem=f"{i + 1:03d}-{slug(t, 30)}", fields={field_name: t}) for i, t in enumerate(texts)]

    return build


def _pixel_options(steps: int, guidance: float, size: int, seed: int | None) -> Any:
    from miocli.mediatokens import PixelOptions

    return PixelOptions(steps=steps, guidance=guidance, size=size, seed=seed)


@app.command()
@with_options("runtime", "generation", "batch", "json", "prompt", "output", batch_size=8)
def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    example: ExampleOpt = None,
    *, opts: Common,
) -> int:
    """Describe images (folders are captioned in batches with one model load)."""
    from miocli.tasks import IMAGE

    jobs = _media_jobs(IMAGE, images, recursive, {})
    return _run_task("caption", _with_examples(jobs, _examples(example, IMAGE), {}), opts)


@app.command()
@with_options("runtime", "generation", "json", "prompt")
def ask(
    media: Annotated[str, typer.Argument(help="An image, audio or video file.")],
    question: Annotated[str, typer.Argument(help="The question or instruction.")],
    example: ExampleOpt = None,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Ask about an image, a recording or a video (--example adds solved examples first)."""
    from miocli.tasks import AUDIO, VIDEO

    text = read_text_argument(question, "question")
    kind = _media_kind(media)
    task_name, field = {AUDIO: ("ask-audio", "instruction"), VIDEO: ("ask-video", "question")}.get(
        kind, ("ask-image", "question"))
    fields = {field: text}
    frames = _frame_options(max_frames, uniform, threshold)
    jobs = _with_examples(_media_jobs(kind, [media], False, fields, frames), _examples(example, kind), fields,
                          frames)
    return _run_task(task_name, jobs, opts, options=opts.generation(batch_size=1))


@app.command()
@with_options("runtime", "generation", "batch", "json", "prompt", "output")
def imagine(
    prompts: Annotated[list[str], typer.Argument(help="What to draw ('-' reads one per line from stdin).")],
    count: Annotated[int, typer.Option("-n", "--count", help="Images per prompt.")] = 1,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Generate images from text: SEED tokens from the LLM, pixels from unCLIP."""
    if count < 1:
        raise UsageError("-n must be at least 1")
    texts = _expand_text_inputs(prompts, "prompt")
    # Several images of one prompt need different samples: sampling is switched on unless told otherwise.
    options = opts.generation(sample=True if count > 1 and opts.sample is None else None)
    repeated = [t for t in texts for _ in range(count)]

    def jobs(runtime: Any) -> list[Any]:
        built = _text_jobs(repeated, "caption")(runtime)
        if count > 1:
            for i, job in enumerate(built):
                job.stem = f"{job.stem}-{i % count + 1}"
        return built

    return _run_task("imagine", jobs, opts, options=options,
                     pixel=_pixel_options(steps, guidance, size, opts.seed))


@app.command()
@with_options("runtime", "generation", "json", "prompt", "write")
def edit(
    image: Annotated[str, typer.Argument(help="The image to edit.")],
    instruction: Annotated[str, typer.Argument(help="What to change.")],
    template: Annotated[str | None, typer.Option("--template", help="User turn template with {media} and "
                                                    "{instruction}.")] = None,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Edit an image following an instruction (the answer is pre-filled with <image>)."""
    from dataclasses import replace

    from miocli.tasks import IMAGE, TASKS

    text = read_text_argument(instruction, "instruction")
    task = TASKS["edit"]
    if template is not None:
        if "{media}" not in template or "{instruction}" not in template:
            raise UsageError("--template needs both {media} and {instruction}")
        task = replace(task, instruct=template)
    return _run_task(task, _media_jobs(IMAGE, [image], False, {"instruction": text}), opts,
                     options=opts.generation(batch_size=1), pixel=_pixel_options(steps, guidance, size, opts.seed))


@app.command()
@with_options("codec", "json")
def tokenize(
    media: Annotated[str, typer.Argument(help="An image or audio file.")],
    with_timbre: Annotated[bool, typer.Option("--with-timbre", help="Audio: all four layers (content + "
                                              "timbre), as MIO writes its own speech.")] = False,
    *, opts: Common,
) -> int:
    """Print the token string of an image (<image>…</image>) or a recording (<spch>…</spch>)."""
    from miocli import mediatokens
    from miocli.batch import EXTENSIONS
    from miocli.tasks import AUDIO

    mio = opts.make_mio(quantize="none")
    path = Path(media)
    if path.suffix.lower() in EXTENSIONS[AUDIO]:
        from miocli.media.audio import read_audio

        text = mediatokens.speech_string(mio.runtime, read_audio(path), with_timbre)
    else:
        from miocli.media.image import load_image

        text = mediatokens.image_strings(mio.runtime, [load_image(path)])[0]
    if opts.as_json:
        emit_json({"input": media, "tokens": text})
    else:
        print(text)
    return 0


@app.command()
@with_options("codec")
def detokenize(
    tokens: Annotated[str, typer.Argument(help="A token string, a file holding one, or '-' for stdin.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write (.png/.jpg, .wav/.flac, "
                                         "or .npy with --embeddings-only).")],
    embeddings_only: Annotated[bool, typer.Option("--embeddings-only", help="Images: write the (n, 1024) "
                                                  "unCLIP embeddings as .npy, no diffusion.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for the diffusion noise.")] = None,
    *, opts: Common,
) -> int:
    """Turn <image>…</image> or <spch>…</spch> token strings back into a file."""
    from miocli import mediatokens, protocol
    from miocli.outputs import atomic_write

    if tokens == "-":
        text = sys.stdin.read()
    elif tokens.lstrip().startswith("<"):
        text = tokens
    else:
        text = _read_file(tokens)
    parsed = protocol.parse_output(text, extract=False)
    for problem in parsed.problems:
        err(f"mio: warning: malformed {problem.kind} segment: {problem.reason}")
    if output.exists() and not overwrite:
        raise InputError(f"{output} already exists", hint="pass --overwrite to replace it")
    mio = opts.make_mio(quantize="none")
    if parsed.images:
        ids = [segment.ids for segment in parsed.images]
        if embeddings_only:
            import numpy as np

            embeds = mediatokens.image_embeddings(mio.runtime, ids).numpy().astype("float32")

            def save(tmp: Path) -> None:
                # np.save on a path appends ".npy" to a temporary name: hand it a file instead.
                with open(tmp, "wb") as handle:
                    np.save(handle, embeds, allow_pickle=False)

            atomic_write(output, save)
        else:
            images = mediatokens.images_from_ids(mio.runtime, ids, _pixel_options(steps, guidance, size, seed))
            fmt = "JPEG" if output.suffix.lower() in (".jpg", ".jpeg") else "PNG"
            atomic_write(output, lambda tmp: images[0].save(tmp, format=fmt))
            for index, image in enumerate(images[1:], start=2):
                extra = output.with_name(f"{output.stem}-{index}{output.suffix}")
                atomic_write(extra, lambda tmp, image=image: image.save(tmp, format=fmt))
    elif parsed.speeches:
        from miocli.media.audio import write_audio

        wave = mediatokens.speech_from_codes(mio.runtime, parsed.speeches[0].codes)
        fmt = output.suffix.lower().lstrip(".") or "wav"
        atomic_write(output, lambda tmp: write_audio(tmp, wave, 16000, format=fmt))
    else:
        raise UsageError("no complete <image>…</image> or <spch>…</spch> segment in the input")
    print(output)
    return 0


@app.command()
@with_options("runtime", "generation", "batch", "json", "prompt", "output")
def asr(
    audio: Annotated[list[str], typer.Argument(help="Audio files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    *, opts: Common,
) -> int:
    """Transcribe speech."""
    from miocli.tasks import AUDIO

    return _run_task("asr", _media_jobs(AUDIO, audio, recursive, {}), opts)


@app.command()
@with_options("runtime", "generation", "batch", "json", "prompt", "output")
def tts(
    texts: Annotated[list[str] | None, typer.Argument(help="Text to speak ('-' reads one per line).")] = None,
    text_file: Annotated[Path | None, typer.Option("--text-file", help="One utterance per line.")] = None,
    *, opts: Common,
) -> int:
    """Speak text: one wav per utterance."""
    values = list(texts or [])
    if text_file is not None:
        values.extend(line for line in _read_file(str(text_file)).splitlines() if line.strip())
    if not values:
        raise UsageError("nothing to say", hint="give text, '-' for stdin, or --text-file FILE")
    return _run_task("tts", _text_jobs(_expand_text_inputs(values, "text"), "text"), opts)


@app.command()
@with_options("runtime", "generation", "batch", "json", "prompt", "output")
def speak(
    questions: Annotated[list[str], typer.Argument(help="Questions to answer out loud.")],
    *, opts: Common,
) -> int:
    """Answer questions with speech (voice mode)."""
    return _run_task("speak", _text_jobs(_expand_text_inputs(questions, "question"), "question"), opts)


@app.command()
@with_options("runtime", "generation", "batch", "json", "prompt", "output")
def speech2speech(
    audio: Annotated[list[str], typer.Argument(help="Recordings to answer with speech.")],
    recursive: RecursiveOpt = False,
    *, opts: Common,
) -> int:
    """Answer spoken input with speech."""
    from miocli.tasks import AUDIO

    return _run_task("speech2speech", _media_jobs(AUDIO, audio, recursive, {}), opts)


# ---- video and composite tasks ------------------------------------------------------------------
@app.command()
@with_options("json", "write")
def keyframes(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Write the keyframes MIO would see (one per scene, in order) and keyframes.json; no model needed."""
    from miocli.batch import expand_inputs
    from miocli.tasks import VIDEO
    from miocli.video_tasks import write_keyframes

    frames = _frame_options(max_frames, uniform, threshold)
    if opts.output_dir is None:
        raise UsageError("`mio keyframes` writes files", hint="pass -o DIR")
    paths = expand_inputs(videos, VIDEO, recursive)
    entries, failures = write_keyframes(paths, opts.open_output(), frames)
    if opts.as_json:
        emit_json(entries)
    else:
        for entry in entries:
            print(f"{opts.output_dir / entry['file']}\t{entry['time_s']:.3f}s\tscene {entry['scene']}")
    return 1 if failures else 0


@app.command("video-caption")
@with_options("runtime", "generation", "batch", "json", "prompt", "output")
def video_caption(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Describe videos from their keyframes."""
    from miocli.tasks import VIDEO

    frames = _frame_options(max_frames, uniform, threshold)
    return _run_task("video-caption", _media_jobs(VIDEO, videos, recursive, {}, frames), opts)


@app.command("video-gen")
@with_options("runtime", "generation", "json", "output")
def video_gen(
    descriptions: Annotated[list[str], typer.Argument(help="What happens in the video ('-' reads one per "
                                                      "line).")],
    fps: Annotated[float, typer.Option("--fps", help="Frame rate of the assembled mp4.")] = 2.0,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Generate a video as a sequence of keyframes: the frames as images plus an mp4."""
    import math

    from miocli.video_tasks import run_video_gen

    if not (math.isfinite(fps) and fps > 0):
        raise UsageError(f"--fps must be a positive number (got {fps})")
    texts = _expand_text_inputs(descriptions, "description")
    options = opts.generation(batch_size=1)
    out = opts.open_output()
    if out is None:
        raise UsageError("`mio video-gen` writes files", hint="pass -o DIR")
    mio = opts.make_mio()
    jobs = _text_jobs(texts, "description")(mio.runtime)
    failures = run_video_gen(mio, jobs, out, options, _pixel_options(steps, guidance, size, opts.seed), fps,
                             opts.as_json)
    return 1 if failures else 0


@app.command()
@with_options("runtime", "generation", "json", "write")
def interleave(
    topic: Annotated[str, typer.Argument(help="What the story is about: the prompt is \"Generate a visual story "
                                          "about TOPIC.\" ('-' reads stdin).")],
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Generate interleaved text and images: story.md with the text and image links, and the images."""
    from miocli.composite import run_interleave

    text = read_text_argument(topic, "topic").strip().rstrip(".")
    options = opts.generation(batch_size=1)
    out = opts.open_output()
    if out is None:
        raise UsageError("`mio interleave` writes files", hint="pass -o DIR")
    return run_interleave(opts.make_mio(), text, out, options, _pixel_options(steps, guidance, size, opts.seed),
                          opts.as_json)


@app.command("cot-visual")
@with_options("runtime", "generation", "json", "write")
def cot_visual(
    question: Annotated[str, typer.Argument(help="The question ('-' reads stdin).")],
    image: Annotated[Path | None, typer.Option("--image", help="An image the question is about.")] = None,
    show_steps: Annotated[bool, typer.Option("--show-steps", help="Also print the first stage: the drawn "
                                             "image and any text written with it.")] = False,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Chain of visual thought: draw an illustrating image, then answer with it in context."""
    from miocli.composite import run_cot_visual

    text = read_text_argument(question, "question").strip()
    options = opts.generation(batch_size=1)
    out = opts.open_output()
    if out is None:
        raise UsageError("`mio cot-visual` writes the illustrating image", hint="pass -o DIR")
    return run_cot_visual(opts.make_mio(), text, image, out, options,
                          _pixel_options(steps, guidance, size, opts.seed), opts.as_json, show_steps)


def join_example_values(argv: list[str]) -> list[str]:
    """`--example MEDIA ANSWER` → `--example MEDIA<sep>ANSWER`, the one value Typer can take."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            joined.extend(argv[index:])
            break
        # A value that looks like an option means the pair is incomplete: left alone, it gets
        # the "needs two values" error instead of swallowing the option.
        if token == "--example" and index + 2 < len(argv) and not _is_option(*argv[index + 1:index + 3]):
            joined += [token, argv[index + 1] + EXAMPLE_SEPARATOR + argv[index + 2]]
            index += 3
            continue
        if token.startswith("--example=") and index + 1 < len(argv) and not _is_option(argv[index + 1]):
            joined += ["--example", token.split("=", 1)[1] + EXAMPLE_SEPARATOR + argv[index + 1]]
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def _is_option(*tokens: str) -> bool:
    return any(token.startswith("--") for token in tokens)


def main(argv: list[str] | None = None) -> None:
    # Busy-waiting OpenMP threads made CPU encodes 3-6x slower whenever another process held a core
    # (benchmarks/speech.py); passive waiting costs little on an idle machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(args=join_example_values(sys.argv[1:] if argv is None else argv), prog_name="mio")


if __name__ == "__main__":
    main()
