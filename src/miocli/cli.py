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

from miocli.cli_options import Common, emit_json, err, with_options
from miocli.errors import EnvironmentProblem, UsageError, report
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
        from miocli.inputs import read_stdin

        value = read_stdin(what)
    if value is None or not value.strip():
        raise UsageError(f"the {what} is empty", hint=f"give the {what} as an argument, or '-' to read stdin")
    from miocli.validate import check_text

    check_text(value, what)
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
            from miocli.inputs import read_stdin

            texts.extend(line for line in read_stdin(f"{what}s").splitlines() if line.strip())
        else:
            texts.append(value)
    if not texts or any(not t.strip() for t in texts):
        raise UsageError(f"a {what} is empty", hint=f"give non-empty {what}s, or '-' to read them from stdin")
    from miocli.validate import check_text

    for text in texts:
        check_text(text, what)
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
                                                    "from FILE or '-' (contents are plain text: token "
                                                    "strings in them are not tokens).")] = None,
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
    from miocli.writer import require_stdout

    require_stdout()
    if interactive and sys.stdin is None:
        raise UsageError("stdin is closed, so there is nothing to read in an interactive session",
                         hint="run it in a terminal, or give the question as an argument")
    options = opts.generation(batch_size=1)
    conversation = _conversation(question, messages, interactive)
    if opts.show_prompt:
        local = opts.make_mio(local=True)
        prompt_text = local.chat_prompt(conversation, mode=mode, system=system,
                                        add_generation_prompt=not no_generation_prompt)
        print_prompt(local, prompt_text, opts.as_json)
        return 0
    mio = opts.make_mio()
    if interactive:
        return _interactive(mio, conversation, mode, system, options, opts.as_json)
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
        from miocli.inputs import read_stdin

        source = read_stdin("messages") if messages == "-" else _read_file(messages)
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--messages {messages} is not valid JSON: {exc}") from None
        except RecursionError:
            raise UsageError(f"--messages {messages} is nested too deeply to be a list of turns") from None
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
    from miocli.protocol import PromptText

    err("mio: interactive chat; an empty line or Ctrl-D ends it.")
    pending = list(history)
    if pending and pending[-1].get("role") == "user":
        reply = mio.chat(pending, mode=mode, system=system, options=options)
        pending.append({"role": "assistant", "content": PromptText.trusted(reply.raw.strip())})
        print(reply.text, flush=True)
    while True:
        err("you> ")
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        pending.append({"role": "user", "content": line.rstrip("\n")})
        reply = mio.chat(pending, mode=mode, system=system, options=options)
        report_problems("answer", reply.problems)
        # History keeps the raw answer so media the model produced stays in context: mio wrote those
        # token strings, so they stay tokens (trusted), while everything the user typed is plain text.
        pending.append({"role": "assistant", "content": PromptText.trusted(reply.raw.strip())})
        if as_json:
            emit_json({"task": "chat", "input": line.strip(), **reply.to_record()})
        else:
            print(reply.text, flush=True)


@app.command()
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Raw prompts ('-' reads one prompt per line from stdin).")],
    raw_tokens: Annotated[bool, typer.Option("--raw-tokens", help="For hand-built prompts: read token strings "
                                             "(<|im_start|>, <image>, <img5>, <spch5>, ...) in the prompts as "
                                             "the tokens they name. Without it prompts are plain text.")] = False,
    *, opts: Common,
) -> int:
    """Continue raw text with no chat template (the Base model's way; BOS is prepended).

    Prompts are plain text: a token string typed in one is text, not a token, unless --raw-tokens.
    """
    from miocli.inputs import Item
    from miocli.outputs import slug
    from miocli.pipeline import raw_prompt_text
    from miocli.writer import GENERATE, Target

    texts = _expand_text_inputs(prompts, "prompt")
    targets = [Target(Item(text, prompt=raw_prompt_text(text, tokens=raw_tokens)),
                      f"{number:03d}-{slug(text, 30)}") for number, text in enumerate(texts, start=1)]
    return _run_task("generate", "generate", GENERATE, targets, opts)


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
def _run_task(api_task: str, record_task: str, kind: str, targets: list[Any], opts: Common, *,
              options: Any = None, **settings: Any) -> int:
    """Stream the targets through the task core; the writer puts each result on disk and stdout as it comes."""
    from miocli.writer import ResultWriter, StdoutClosed, run_and_write

    if options is None:
        options = opts.generation()
    # --print-prompt needs no LLM: it always runs here, on the local model folder.
    mio = opts.make_mio(local=opts.show_prompt)
    if opts.show_prompt:
        # A long recording shows the prompt of each part it will be split into.
        for prompt in mio.prompts(api_task, [t.item for t in targets], options=options, **settings):
            print_prompt(mio, prompt.text, opts.as_json, image_strings=prompt.image_strings,
                         speech_strings=prompt.speech_strings)
        return 0
    writer = ResultWriter(record_task, kind, opts.open_output(), as_json=opts.as_json, show_names=len(targets) > 1)
    with _progress(len(targets), record_task) as advance:
        writer.progress = advance
        try:
            failures = run_and_write(mio, api_task, targets, writer, options=options, **settings)
        except StdoutClosed:
            raise typer.Exit(141) from None
    return 1 if failures else 0


def _frame_settings(max_frames: int, uniform: bool, threshold: float | None) -> dict[str, Any]:
    if max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1 (got {max_frames})")
    if threshold is not None and not 0 < threshold <= 255:
        raise UsageError(f"--threshold must be between 0 and 255 (got {threshold})")
    return {"max_frames": max_frames, "uniform": uniform, "threshold": threshold}


def _media_targets(kind: str, paths: list[str], recursive: bool, fields: dict[str, str]) -> list[Any]:
    """One target per input file of `kind` (files, folders, globs or '-'); named and stemmed by the file."""
    from miocli.inputs import Item, Media, expand_inputs
    from miocli.writer import Target

    return [Target(Item(str(path), dict(fields), [Media(kind, str(path), path=path)]), path.stem)
            for path in expand_inputs(paths, kind, recursive)]


def _text_targets(texts: list[str], field_name: str, count: int = 1) -> list[Any]:
    """One target per text (`count` per text for imagine -n), stemmed NNN-slug[-k]."""
    from miocli.inputs import Item
    from miocli.outputs import slug
    from miocli.writer import Target

    targets = []
    for number, text in enumerate((t for t in texts for _ in range(count)), start=1):
        sample = (number - 1) % count
        stem = f"{number:03d}-{slug(text, 30)}" + (f"-{sample + 1}" if count > 1 else "")
        targets.append(Target(Item(text, {field_name: text}, sample=sample), stem))
    return targets


def _examples(values: list[str] | None, kind: str) -> list[tuple[Any, str]]:
    """--example pairs (MEDIA, ANSWER); each must be the same kind of media as the input."""
    from miocli.inputs import Media, kind_of_path

    pairs = []
    for value in values or []:
        media, separator, answer = value.partition(EXAMPLE_SEPARATOR)
        if not separator:
            raise UsageError("--example needs two values: a media file and its answer",
                             hint='e.g. --example cat.png "A cat asleep on a sofa."')
        if not answer.strip():
            raise UsageError(f"--example {media}: the answer is empty")
        if kind_of_path(media) != kind:
            raise UsageError(f"--example {media} is {kind_of_path(media)}, the input is {kind}",
                             hint=f"give {kind} examples for a {kind} input")
        pairs.append((Media(kind, media, path=Path(media)), answer.strip()))
    return pairs


def _pixels(steps: int, guidance: float, size: int) -> dict[str, Any]:
    from miocli.validate import check_pixels

    # Here, before any model loads, rather than in the decoder after the whole generation.
    check_pixels(steps, guidance, size)
    return {"steps": steps, "guidance": guidance, "size": size}


@app.command()
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output", batch_size=8)
def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    example: ExampleOpt = None,
    *, opts: Common,
) -> int:
    """Describe images (folders are captioned in batches with one model load)."""
    from miocli.tasks import IMAGE
    from miocli.writer import TEXT

    examples = _examples(example, IMAGE)
    return _run_task("caption", "caption", TEXT, _media_targets(IMAGE, images, recursive, {}), opts,
                     examples=examples)


@app.command()
@with_options("runtime", "ray", "generation", "json", "prompt")
def ask(
    media: Annotated[str, typer.Argument(help="An image, audio or video file.")],
    question: Annotated[str, typer.Argument(help="The question or instruction.")],
    example: ExampleOpt = None,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Ask about an image, a recording or a video (--example adds solved examples first)."""
    from miocli.inputs import kind_of_path
    from miocli.tasks import AUDIO, VIDEO
    from miocli.writer import TEXT

    text = read_text_argument(question, "question")
    kind = kind_of_path(media)
    record_task = {AUDIO: "ask-audio", VIDEO: "ask-video"}.get(kind, "ask-image")
    frames = _frame_settings(max_frames, uniform, threshold)
    # The image and video templates say {question}, the audio one {instruction}.
    targets = _media_targets(kind, [media], False, {"question": text, "instruction": text})
    return _run_task("ask", record_task, TEXT, targets, opts, options=opts.generation(batch_size=1),
                     examples=_examples(example, kind), **frames)


@app.command()
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def imagine(
    prompts: Annotated[list[str], typer.Argument(help="What to draw ('-' reads one per line from stdin).")],
    count: Annotated[int, typer.Option("-n", "--count", help="Images per prompt.")] = 1,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Generate images from text: SEED tokens from the LLM, pixels from unCLIP."""
    from miocli.writer import IMAGE

    if count < 1:
        raise UsageError("-n must be at least 1")
    texts = _expand_text_inputs(prompts, "prompt")
    # Several images of one prompt need different samples: sampling is switched on unless told otherwise.
    options = opts.generation(sample=True if count > 1 and opts.sample is None else None)
    return _run_task("imagine", "imagine", IMAGE, _text_targets(texts, "caption", count), opts, options=options,
                     **_pixels(steps, guidance, size))


@app.command()
@with_options("runtime", "ray", "generation", "json", "prompt", "write")
def edit(
    image: Annotated[str, typer.Argument(help="The image to edit.")],
    instruction: Annotated[str, typer.Argument(help="What to change.")],
    template: Annotated[str | None, typer.Option("--template", help="User turn template with {media} and "
                                                    "{instruction} (its own text is plain text).")] = None,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Edit an image following an instruction (the answer is pre-filled with <image>)."""
    from miocli.tasks import IMAGE as IMAGE_INPUT
    from miocli.writer import IMAGE

    text = read_text_argument(instruction, "instruction")
    if template is not None:
        from miocli.validate import check_template

        check_template(template, ("media", "instruction"))
    targets = _media_targets(IMAGE_INPUT, [image], False, {"instruction": text})
    return _run_task("edit", "edit", IMAGE, targets, opts, options=opts.generation(batch_size=1), template=template,
                     **_pixels(steps, guidance, size))


@app.command()
@with_options("codec", "ray", "json")
def tokenize(
    media: Annotated[list[str], typer.Argument(help="Image or audio files, folders, globs, or '-' (paths on "
                                               "stdin).")],
    recursive: RecursiveOpt = False,
    with_timbre: Annotated[bool, typer.Option("--with-timbre", help="Audio: all four layers (content + "
                                              "timbre), as MIO writes its own speech.")] = False,
    *, opts: Common,
) -> int:
    """Print the token string of images (<image>…</image>) and recordings (<spch>…</spch>), one per input."""
    from miocli.inputs import Item, Media, expand_inputs, kind_of_path
    from miocli.outputs import display_name, json_line
    from miocli.tasks import AUDIO, IMAGE
    from miocli.writer import one_line, print_line, require_stdout

    require_stdout()
    paths = expand_inputs(media, (IMAGE, AUDIO), recursive)
    items = [Item(str(p), media=[Media(kind_of_path(p), str(p), path=p)], with_timbre=with_timbre) for p in paths]
    mio = opts.make_mio(quantize="none")
    failures = 0
    for result in mio.stream("tokenize", items, batch_size=8):
        name = display_name(result.input)
        if result.error is not None:
            failures += 1
            report(result.error, name)
            if opts.as_json:
                print_line(json_line({"input": result.input, "error": result.error.message,
                                      "hint": result.error.hint}))
        elif opts.as_json:
            print_line(json_line({"input": result.input, "tokens": result.text}))
        else:
            print_line(f"{name}: {one_line(result.text)}" if len(items) > 1 else result.text)
    return 1 if failures else 0


@app.command()
@with_options("codec", "json")
def detokenize(
    tokens: Annotated[list[str], typer.Argument(help="Token strings, files holding them, or '-' for stdin.")],
    output: Annotated[str, typer.Option("--output", "-o", help="One input: the file to write (.png/.jpg/.webp, "
                                        ".wav/.flac, .npy with --embeddings-only, or '-' for stdout). Several: a "
                                        "folder, where each input gives NAME.png, NAME.wav or NAME.npy.")],
    embeddings_only: Annotated[bool, typer.Option("--embeddings-only", help="Images: write the (n, 1024) "
                                                  "unCLIP embeddings as .npy, no diffusion.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files.")] = False,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for the diffusion noise.")] = None,
    *, opts: Common,
) -> int:
    """Turn <image>…</image> or <spch>…</spch> token strings back into files (more segments: NAME-2, …)."""
    from miocli.detokenize import default_suffix, run_detokenize
    from miocli.errors import MioError
    from miocli.inputs import read_stdin
    from miocli.outputs import display_name, json_line
    from miocli.writer import print_line

    sources = []
    for number, value in enumerate(tokens, start=1):
        if value == "-":
            sources.append(("stdin", "stdin", read_stdin("tokens")))
        elif value.lstrip().startswith("<"):
            sources.append((f"tokens {number}", f"{number:03d}", value))
        else:
            sources.append((value, Path(value).stem, _read_file(value)))
    several = len(sources) > 1
    if several and (output == "-" or Path(output).suffix):
        raise UsageError(f"{len(sources)} inputs need a folder for -o, not {output}",
                         hint="e.g. -o decoded/ (each input gives NAME.png, NAME.wav or NAME.npy there)")
    mio = opts.make_mio(quantize="none")
    failures = 0
    for name, stem, text in sources:
        from miocli import protocol

        parsed = protocol.parse_output(text, extract=False)  # once: a token file can be megabytes
        target = str(Path(output) / f"{stem}{default_suffix(parsed, embeddings_only)}") if several else output
        if several:
            Path(output).mkdir(parents=True, exist_ok=True)
        try:
            written = run_detokenize(mio, parsed, target, embeddings_only=embeddings_only, overwrite=overwrite,
                                     seed=seed, **_pixels(steps, guidance, size))
        except MioError as exc:
            if not several:
                raise
            failures += 1
            report(exc, display_name(name))
            if opts.as_json:
                print_line(json_line({"input": name, "error": exc.message, "hint": exc.hint, "files": []}))
            continue
        files = [path for path in written if path != "-" and Path(path).is_file()]
        # Paths on stdout would corrupt bytes written to a stream that may be stdout itself.
        if opts.as_json and output != "-":
            print_line(json_line({"input": name, "files": files}))
        elif not opts.as_json:
            for path in files:
                print_line(path)
    return 1 if failures else 0


@app.command()
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def asr(
    audio: Annotated[list[str], typer.Argument(help="Audio files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    *, opts: Common,
) -> int:
    """Transcribe speech."""
    from miocli.tasks import AUDIO
    from miocli.writer import TEXT

    return _run_task("asr", "asr", TEXT, _media_targets(AUDIO, audio, recursive, {}), opts)


@app.command()
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def tts(
    texts: Annotated[list[str] | None, typer.Argument(help="Text to speak ('-' reads one per line).")] = None,
    text_file: Annotated[Path | None, typer.Option("--text-file", help="One utterance per line.")] = None,
    *, opts: Common,
) -> int:
    """Speak text: one wav per utterance."""
    from miocli.writer import SPEECH

    values = list(texts or [])
    if text_file is not None:
        values.extend(line for line in _read_file(str(text_file)).splitlines() if line.strip())
    if not values:
        raise UsageError("nothing to say", hint="give text, '-' for stdin, or --text-file FILE")
    return _run_task("tts", "tts", SPEECH, _text_targets(_expand_text_inputs(values, "text"), "text"), opts)


@app.command()
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def speak(
    questions: Annotated[list[str], typer.Argument(help="Questions to answer out loud.")],
    *, opts: Common,
) -> int:
    """Answer questions with speech (voice mode)."""
    from miocli.writer import SPEECH

    targets = _text_targets(_expand_text_inputs(questions, "question"), "question")
    return _run_task("speak", "speak", SPEECH, targets, opts)


@app.command()
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def speech2speech(
    audio: Annotated[list[str], typer.Argument(help="Recordings to answer with speech.")],
    recursive: RecursiveOpt = False,
    *, opts: Common,
) -> int:
    """Answer spoken input with speech."""
    from miocli.tasks import AUDIO
    from miocli.writer import SPEECH

    return _run_task("speech2speech", "speech2speech", SPEECH, _media_targets(AUDIO, audio, recursive, {}), opts)


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
    from miocli.inputs import expand_inputs
    from miocli.media.video import FrameOptions
    from miocli.tasks import VIDEO
    from miocli.video_tasks import write_keyframes
    from miocli.writer import print_line

    frames = FrameOptions(**_frame_settings(max_frames, uniform, threshold))
    if opts.output_dir is None:
        raise UsageError("`mio keyframes` writes files", hint="pass -o DIR")
    paths = expand_inputs(videos, VIDEO, recursive)
    entries, failures = write_keyframes(paths, opts.open_output(), frames)
    if opts.as_json:
        emit_json(entries)
    else:
        for entry in entries:
            print_line(f"{opts.output_dir / entry['file']}\t{entry['time_s']:.3f}s\tscene {entry['scene']}")
    return 1 if failures else 0


@app.command("video-caption")
@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def video_caption(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Describe videos from their keyframes."""
    from miocli.tasks import VIDEO
    from miocli.writer import TEXT

    frames = _frame_settings(max_frames, uniform, threshold)
    return _run_task("video_caption", "video-caption", TEXT, _media_targets(VIDEO, videos, recursive, {}), opts,
                     **frames)


@app.command("video-gen")
@with_options("runtime", "ray", "generation", "json", "output")
def video_gen(
    descriptions: Annotated[list[str], typer.Argument(help="What happens in the video ('-' reads one per "
                                                      "line).")],
    fps: Annotated[float, typer.Option("--fps", help="Frame rate of the assembled mp4.")] = 2.0,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Generate a video as a sequence of keyframes: the frames as images plus an mp4."""
    import math

    from miocli.writer import VIDEO, ResultWriter, run_and_write

    if not (math.isfinite(fps) and fps > 0):
        raise UsageError(f"--fps must be a positive number (got {fps})")
    texts = _expand_text_inputs(descriptions, "description")
    writer = ResultWriter("video-gen", VIDEO, opts.open_output(), as_json=opts.as_json, fps=fps)
    failures = run_and_write(opts.make_mio(), "video_gen", _text_targets(texts, "description"), writer,
                             options=opts.generation(batch_size=1), **_pixels(steps, guidance, size))
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
    from miocli.inputs import Item
    from miocli.writer import STORY, ResultWriter, Target, run_and_write

    text = read_text_argument(topic, "topic").strip().rstrip(".")
    writer = ResultWriter("interleave", STORY, opts.open_output(), as_json=opts.as_json)
    failures = run_and_write(opts.make_mio(), "interleave", [Target(Item(text, {"topic": text}), "story")], writer,
                             options=opts.generation(batch_size=1), **_pixels(steps, guidance, size))
    return 1 if failures else 0


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
    from miocli.inputs import Item, Media
    from miocli.outputs import slug
    from miocli.tasks import IMAGE
    from miocli.writer import COT, ResultWriter, Target, run_and_write

    text = read_text_argument(question, "question").strip()
    media = [Media(IMAGE, str(image), path=image)] if image is not None else []
    writer = ResultWriter("cot-visual", COT, opts.open_output(), as_json=opts.as_json, show_steps=show_steps)
    failures = run_and_write(opts.make_mio(), "cot_visual", [Target(Item(text, {"question": text}, media),
                                                                    slug(text, 40))], writer,
                             options=opts.generation(batch_size=1), **_pixels(steps, guidance, size))
    return 1 if failures else 0


# ---- the server ------------------------------------------------------------------------------------
@app.command()
@with_options("model")
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8765,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="MIO_API_KEY", help="Key clients must send "
                                                "(Authorization: Bearer KEY); needed to listen beyond loopback.",
                                                show_default=False)] = None,
    insecure_no_api_key: Annotated[bool, typer.Option("--insecure-no-api-key", help="Listen beyond loopback "
                                                      "without a key: anyone who can reach the port can use the "
                                                      "model.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Most inputs in one generation batch "
                                            "(requests for the same task are gathered).")] = 8,
    batch_window: Annotated[float, typer.Option("--batch-window", help="Seconds to wait for other requests to "
                                                "join a batch.")] = 0.005,
    idle_unload: Annotated[str | None, typer.Option("--idle-unload", help="Unload the model after this long "
                                                    "without requests (e.g. 10m); it loads again on use.")] = None,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", help="Largest request body, in MiB.")] = 64,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a request may take.")] = 600.0,
    *, opts: Common,
) -> int:
    """Keep MIO loaded and serve every command (`--server URL`), scripts and OpenAI clients over HTTP."""
    try:
        from miocli.server import ServeSettings, check_bind, parse_duration
        from miocli.server import serve as run_server
    except ImportError as exc:
        raise EnvironmentProblem(f"`mio serve` needs the server extra ({exc.name} is missing)",
                                 hint="pip install 'miocli[serve]'") from None

    check_bind(host, api_key, insecure_no_api_key)
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535 (got {port})")
    if batch_size < 1 or max_body_mb < 1 or not 0 <= batch_window <= 5 or not request_timeout > 0:
        raise UsageError("--batch-size and --max-body-mb must be at least 1, --batch-window 0-5 s, "
                         "--request-timeout above 0")
    if not api_key and host not in ("127.0.0.1", "::1", "localhost"):
        err(f"mio serve: WARNING: listening on {host} WITHOUT an API key: anyone who can reach it can use it")
    settings = ServeSettings(host=host, port=port, api_key=api_key or None, batch_size=batch_size,
                             batch_window_s=batch_window, max_body_bytes=max_body_mb * 2**20,
                             request_timeout_s=request_timeout,
                             idle_unload_s=parse_duration(idle_unload) if idle_unload else None)
    return run_server(opts.make_mio(local=True), settings)


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


def _notices_to_stderr() -> None:
    """The core's notices (a recording split in parts, a silent recording) as `mio: …` lines on stderr."""
    import logging

    logger = logging.getLogger("miocli")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mio: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    # Busy-waiting OpenMP threads made CPU encodes 3-6x slower whenever another process held a core
    # (benchmarks/speech.py); passive waiting costs little on an idle machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _notices_to_stderr()
    app(args=join_example_values(sys.argv[1:] if argv is None else argv), prog_name="mio")


if __name__ == "__main__":
    main()
