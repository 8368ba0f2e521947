"""The `mio` command line. Thin: options, inputs, printing; the work is in the API.

Nothing heavy is imported at module level: `mio --help` must not pay for torch or
transformers. Results go to stdout (text, or one JSON object per line with --json);
progress and messages go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from miocli.errors import InputError, MioError, UsageError

app = typer.Typer(
    name="mio",
    help="Run MIO, the any-to-any multimodal model: text, images, speech and video in and out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RUNTIME = "Model and device"
GENERATION = "Generation"
OUTPUT = "Output"

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model folder or hub id in the local HF cache [env MIO_MODEL; "
                 "default m-a-p/MIO-7B-Instruct].", rich_help_panel=RUNTIME),
]
VariantOpt = Annotated[
    str | None, typer.Option("--variant", help="instruct or base (default: detected from the folder).",
                                rich_help_panel=RUNTIME)
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUNTIME)]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.", rich_help_panel=RUNTIME)]
QuantizeOpt = Annotated[
    str, typer.Option("--quantize", help="auto, none, 8bit or 4bit (bitsandbytes; NF4 for 4bit).",
                      rich_help_panel=RUNTIME)
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Report what was loaded, how long it took, "
                                          "and memory.", rich_help_panel=RUNTIME)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel=RUNTIME)]
BeamsOpt = Annotated[int | None, typer.Option("--beams", help="Beam count (task preset by default).",
                                                 rich_help_panel=GENERATION)]
SampleOpt = Annotated[bool | None, typer.Option("--sample/--greedy", help="Sample or decode deterministically.",
                                                   rich_help_panel=GENERATION, show_default=False)]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", rich_help_panel=GENERATION)]
TopPOpt = Annotated[float | None, typer.Option("--top-p", rich_help_panel=GENERATION)]
RepetitionOpt = Annotated[float | None, typer.Option("--repetition-penalty", rich_help_panel=GENERATION)]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", rich_help_panel=GENERATION)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed for reproducible sampling.",
                                                rich_help_panel=GENERATION)]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per generate call.",
                                       rich_help_panel=GENERATION)]
ConstrainOpt = Annotated[bool, typer.Option("--constrain/--no-constrain", help="Keep image and speech segments "
                                            "well-formed while generating.", rich_help_panel=GENERATION)]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per result on stdout.",
                                       rich_help_panel=OUTPUT)]
PrintPromptOpt = Annotated[bool, typer.Option("--print-prompt", help="Print the exact prompt and exit (no LLM "
                                              "weights are loaded).", rich_help_panel=OUTPUT)]
OutputDirOpt = Annotated[Path | None, typer.Option("--output-dir", "-o", help="Write results and "
                                                      "manifest.jsonl here.", rich_help_panel=OUTPUT)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.",
                                            rich_help_panel=OUTPUT)]
SkipExistingOpt = Annotated[bool, typer.Option("--skip-existing", help="Skip inputs whose outputs exist "
                                               "(resume a batch).", rich_help_panel=OUTPUT)]


# ---- plumbing ---------------------------------------------------------------------------------
def err(message: str) -> None:
    print(message, file=sys.stderr)


def fail(exc: MioError) -> None:
    err(f"mio: error: {exc.message}")
    if exc.hint:
        err(f"  hint: {exc.hint}")


def guarded(debug: bool, body: Callable[[], int | None]) -> None:
    """Run a command body: MioError → one clear line and its exit code; tracebacks only with --debug."""
    debug = debug or os.environ.get("MIO_DEBUG") == "1"
    try:
        code = body() or 0
    except MioError as exc:
        if debug:
            raise
        fail(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err("mio: interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            raise
        err(f"mio: unexpected error: {exc.__class__.__name__}: {exc}")
        err("  hint: run again with --debug for the traceback, and report it")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def emit_json(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def make_mio(model: str | None, variant: str | None, device: str, dtype: str, quantize: str, verbose: bool) -> Any:
    from miocli.api import Mio

    return Mio(model, variant=variant, device=device, dtype=dtype, quantize=quantize, verbose=verbose)


def generation_options(
    beams: int | None, sample: bool | None, temperature: float | None, top_p: float | None,
    repetition_penalty: float | None, max_new_tokens: int | None, seed: int | None, batch_size: int,
    constrain: bool,
) -> Any:
    from miocli.api import GenerationOptions

    options = GenerationOptions(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                batch_size, constrain)
    options.overrides().validate()
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    return options


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


# ---- commands ---------------------------------------------------------------------------------
@app.command()
def chat(
    question: Annotated[str | None, typer.Argument(help="The question ('-' reads stdin).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="std, voice or custom.")] = "std",
    system: Annotated[str | None, typer.Option("--system", help="System text (custom mode).")] = None,
    messages: Annotated[str | None, typer.Option("--messages", help="A JSON list of {role, content} turns "
                                                    "from FILE or '-'.")] = None,
    no_generation_prompt: Annotated[bool, typer.Option("--no-generation-prompt", help="Do not open an "
                                                       "assistant turn at the end.")] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Keep asking; history is kept.")] = False,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    constrain: ConstrainOpt = True, as_json: JsonOpt = False, show_prompt: PrintPromptOpt = False,
) -> None:
    """Chat with the Instruct model: one question, a whole conversation, or an interactive session."""

    def body() -> int:
        if mode not in ("std", "voice", "custom"):
            raise UsageError(f"unknown --mode {mode!r}", hint="use std, voice or custom")
        if system is not None and mode != "custom":
            raise UsageError("--system needs --mode custom")
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     1, constrain)
        conversation = _conversation(question, messages, interactive)
        mio = make_mio(model, variant, device, dtype, quantize, verbose)
        if interactive:
            return _interactive(mio, conversation, mode, system, options, as_json)
        prompt_text = mio.chat_prompt(conversation, mode=mode, system=system,
                                      add_generation_prompt=not no_generation_prompt)
        if show_prompt:
            print_prompt(mio, prompt_text, as_json)
            return 0
        reply = mio.chat(conversation, mode=mode, system=system, add_generation_prompt=not no_generation_prompt,
                         options=options)
        report_problems("answer", reply.problems)
        if as_json:
            emit_json({"task": "chat", "input": _last_user(conversation), **reply.to_record()})
        else:
            print(reply.text)
        return 0

    guarded(debug, body)


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


def _read_file(name: str) -> str:
    try:
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text") from None


def _last_user(conversation: list[dict[str, Any]]) -> str:
    users = [t.get("content") for t in conversation if isinstance(t, dict) and t.get("role") == "user"]
    return str(users[-1]) if users else ""


def _interactive(mio: Any, history: list[dict[str, Any]], mode: str, system: str | None, options: Any,
                 as_json: bool) -> int:
    err("mio: interactive chat; an empty line or Ctrl-D ends it.")
    pending = [t for t in history]
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
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Raw prompts ('-' reads one prompt per line from stdin).")],
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    batch_size: BatchOpt = 1, constrain: ConstrainOpt = True, as_json: JsonOpt = False,
    show_prompt: PrintPromptOpt = False, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
) -> None:
    """Continue raw text with no chat template (the Base model's way; BOS is prepended)."""

    def body() -> int:
        texts = _expand_text_inputs(prompts, "prompt")
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     batch_size, constrain)
        mio = make_mio(model, variant, device, dtype, quantize, verbose)
        if show_prompt:
            for text in texts:
                print_prompt(mio, mio.raw_prompt(text), as_json)
            return 0
        from miocli.outputs import OutputDir, atomic_write_text, slug

        out = OutputDir(output_dir, overwrite=overwrite, skip_existing=skip_existing) if output_dir else None
        todo = []
        names: dict[int, str] = {}
        for index, text in enumerate(texts):
            name = f"{index + 1:03d}-{slug(text, 30)}.txt"
            if out is not None and out.exists(name) and skip_existing:
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
            if as_json:
                emit_json(record)
            elif out is None:
                if len(texts) > 1:
                    print(f"[{index + 1}] {reply.text}")
                else:
                    print(reply.text)
        return 1 if failures else 0

    guarded(debug, body)


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


@app.command()
def doctor(
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto",
    as_json: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Report versions, devices, memory, bitsandbytes, and check a model folder."""

    def body() -> int:
        from miocli.doctor import collect, render

        report = collect(model, variant, device)
        if as_json:
            emit_json(report)
        else:
            render(report)
        return 0 if report["checkpoint"].get("ok") else 3

    guarded(debug, body)


@app.command()
def download(
    variant: Annotated[str, typer.Option("--variant", help="instruct or base.")] = "instruct",
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the hub to answer.")] = 10.0,
    debug: DebugOpt = False,
) -> None:
    """Download MIO weights into the Hugging Face cache, on purpose (nothing else ever downloads)."""

    def body() -> int:
        from miocli.download import download_model

        path = download_model(variant, revision=revision, timeout=timeout)
        print(path)
        return 0

    guarded(debug, body)


@app.command()
def demo(
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Where to write the outputs "
                                                       "(default: a new ./mio-demo folder).")] = None,
    verbose: VerboseOpt = False, debug: DebugOpt = False,
) -> None:
    """Build a tiny random checkpoint and run every task on it (outputs are noise; it proves the install)."""

    def body() -> int:
        from miocli.demo import run_demo

        return run_demo(output_dir, verbose=verbose)

    guarded(debug, body)


# ---- media tasks ------------------------------------------------------------------------------
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Diffusion steps.", rich_help_panel="Pixels")]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Guidance scale.", rich_help_panel="Pixels")]
SizeOpt = Annotated[int, typer.Option("--size", help="Output side in pixels.", rich_help_panel="Pixels")]


def _open_output(output_dir: Path | None, overwrite: bool, skip_existing: bool) -> Any:
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing contradict each other")
    if output_dir is None:
        return None
    from miocli.outputs import OutputDir

    return OutputDir(output_dir, overwrite=overwrite, skip_existing=skip_existing)


def _run_task(task_name: str, jobs_for: Callable[[Any], list[Any]], *, model: str | None, variant: str | None,
              device: str, dtype: str, quantize: str, verbose: bool, options: Any, output_dir: Path | None,
              overwrite: bool, skip_existing: bool, as_json: bool, show_prompt: bool, pixel: Any = None) -> int:
    from miocli.batch import BatchSettings, run_jobs
    from miocli.tasks import TASKS

    task = TASKS[task_name]
    mio = make_mio(model, variant, device, dtype, quantize, verbose)
    jobs = jobs_for(mio.runtime)
    if show_prompt:
        from miocli.pipeline import Prompt, task_prompt_text

        for job in jobs:
            media = job.load_media() if job.load_media else []
            images, speeches = job.media_strings(media) if job.media_strings else ([], [])
            text = task_prompt_text(task, mio.variant, job.fields, len(images) or len(speeches))
            if as_json:
                emit_json({"prompt": text, "input_ids": mio.prompt_ids(Prompt(text, images, speeches))})
            else:
                print_prompt(mio, text, False)
        return 0
    out = _open_output(output_dir, overwrite, skip_existing)
    settings = BatchSettings(out=out, as_json=as_json, show_names=len(jobs) > 1)
    if pixel is not None:
        settings.pixel = pixel
    failures = run_jobs(mio, task, jobs, settings, options)
    return 1 if failures else 0


def _image_jobs(paths: list[str], recursive: bool, task_name: str, fields: dict[str, str]) -> Callable[[Any], list]:
    def build(runtime: Any) -> list[Any]:
        from miocli.batch import expand_inputs, image_job
        from miocli.tasks import IMAGE, TASKS

        return [image_job(p, TASKS[task_name], fields, runtime) for p in expand_inputs(paths, IMAGE, recursive)]

    return build


def _audio_jobs(paths: list[str], recursive: bool, fields: dict[str, str]) -> Callable[[Any], list]:
    def build(runtime: Any) -> list[Any]:
        from miocli.batch import audio_job, expand_inputs
        from miocli.tasks import AUDIO

        return [audio_job(p, fields, runtime) for p in expand_inputs(paths, AUDIO, recursive)]

    return build


def _text_jobs(texts: list[str], field_name: str) -> Callable[[Any], list]:
    def build(runtime: Any) -> list[Any]:
        from miocli.batch import Job
        from miocli.outputs import slug

        return [Job(name=t, stem=f"{i + 1:03d}-{slug(t, 30)}", fields={field_name: t}) for i, t in enumerate(texts)]

    return build


@app.command()
def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    batch_size: BatchOpt = 8, constrain: ConstrainOpt = True, as_json: JsonOpt = False,
    show_prompt: PrintPromptOpt = False, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
) -> None:
    """Describe images (folders are captioned in batches with one model load)."""

    def body() -> int:
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     batch_size, constrain)
        return _run_task("caption", _image_jobs(images, recursive, "caption", {}), model=model, variant=variant,
                         device=device, dtype=dtype, quantize=quantize, verbose=verbose, options=options,
                         output_dir=output_dir, overwrite=overwrite, skip_existing=skip_existing, as_json=as_json,
                         show_prompt=show_prompt)

    guarded(debug, body)


@app.command()
def ask(
    media: Annotated[str, typer.Argument(help="An image or audio file.")],
    question: Annotated[str, typer.Argument(help="The question or instruction.")],
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    constrain: ConstrainOpt = True, as_json: JsonOpt = False, show_prompt: PrintPromptOpt = False,
) -> None:
    """Ask about an image or a recording."""

    def body() -> int:
        from miocli.batch import EXTENSIONS
        from miocli.tasks import AUDIO

        text = read_text_argument(question, "question")
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     1, constrain)
        if Path(media).suffix.lower() in EXTENSIONS[AUDIO]:
            jobs = _audio_jobs([media], False, {"instruction": text})
            task_name = "ask-audio"
        else:
            jobs = _image_jobs([media], False, "ask-image", {"question": text})
            task_name = "ask-image"
        return _run_task(task_name, jobs, model=model, variant=variant, device=device, dtype=dtype,
                         quantize=quantize, verbose=verbose, options=options, output_dir=None, overwrite=False,
                         skip_existing=False, as_json=as_json, show_prompt=show_prompt)

    guarded(debug, body)


@app.command()
def imagine(
    prompts: Annotated[list[str], typer.Argument(help="What to draw ('-' reads one per line from stdin).")],
    count: Annotated[int, typer.Option("-n", "--count", help="Images per prompt.")] = 1,
    output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False, skip_existing: SkipExistingOpt = False,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    batch_size: BatchOpt = 1, constrain: ConstrainOpt = True, as_json: JsonOpt = False,
    show_prompt: PrintPromptOpt = False,
) -> None:
    """Generate images from text: SEED tokens from the LLM, pixels from unCLIP."""

    def body() -> int:
        from miocli.mediatokens import PixelOptions

        if count < 1:
            raise UsageError("-n must be at least 1")
        texts = _expand_text_inputs(prompts, "prompt")
        # Several images of one prompt need different samples: sampling is switched on unless told otherwise.
        wanted_sample = sample if sample is not None else (True if count > 1 else None)
        options = generation_options(beams, wanted_sample, temperature, top_p, repetition_penalty, max_new_tokens,
                                     seed, batch_size, constrain)
        repeated = [t for t in texts for _ in range(count)]

        def jobs(runtime: Any) -> list[Any]:
            built = _text_jobs(repeated, "caption")(runtime)
            if count > 1:
                for i, job in enumerate(built):
                    job.stem = f"{job.stem}-{i % count + 1}"
            return built

        return _run_task("imagine", jobs, model=model, variant=variant, device=device, dtype=dtype,
                         quantize=quantize, verbose=verbose, options=options, output_dir=output_dir,
                         overwrite=overwrite, skip_existing=skip_existing, as_json=as_json, show_prompt=show_prompt,
                         pixel=PixelOptions(steps=steps, guidance=guidance, size=size, seed=seed))

    guarded(debug, body)


@app.command()
def edit(
    image: Annotated[str, typer.Argument(help="The image to edit.")],
    instruction: Annotated[str, typer.Argument(help="What to change.")],
    output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
    template: Annotated[str | None, typer.Option("--template", help="User turn template with {media} and "
                                                    "{instruction}.")] = None,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    constrain: ConstrainOpt = True, as_json: JsonOpt = False, show_prompt: PrintPromptOpt = False,
) -> None:
    """Edit an image following an instruction (the answer is pre-filled with <image>)."""

    def body() -> int:
        from dataclasses import replace

        from miocli.mediatokens import PixelOptions
        from miocli.tasks import TASKS

        text = read_text_argument(instruction, "instruction")
        if template is not None:
            if "{media}" not in template or "{instruction}" not in template:
                raise UsageError("--template needs both {media} and {instruction}")
            TASKS["edit"] = replace(TASKS["edit"], instruct=template)
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     1, constrain)
        return _run_task("edit", _image_jobs([image], False, "edit", {"instruction": text}), model=model,
                         variant=variant, device=device, dtype=dtype, quantize=quantize, verbose=verbose,
                         options=options, output_dir=output_dir, overwrite=overwrite, skip_existing=False,
                         as_json=as_json, show_prompt=show_prompt,
                         pixel=PixelOptions(steps=steps, guidance=guidance, size=size, seed=seed))

    guarded(debug, body)


@app.command()
def tokenize(
    media: Annotated[str, typer.Argument(help="An image or audio file.")],
    with_timbre: Annotated[bool, typer.Option("--with-timbre", help="Audio: all four layers (content + "
                                              "timbre), as MIO writes its own speech.")] = False,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", verbose: VerboseOpt = False,
    as_json: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Print the token string of an image (<image>…</image>) or a recording (<spch>…</spch>)."""

    def body() -> int:
        from miocli import mediatokens
        from miocli.batch import EXTENSIONS
        from miocli.tasks import AUDIO

        mio = make_mio(model, None, device, dtype, "none", verbose)
        path = Path(media)
        if path.suffix.lower() in EXTENSIONS[AUDIO]:
            from miocli.media.audio import read_audio

            text = mediatokens.speech_string(mio.runtime, read_audio(path), with_timbre)
        else:
            from miocli.media.image import load_image

            text = mediatokens.image_strings(mio.runtime, [load_image(path)])[0]
        if as_json:
            emit_json({"input": media, "tokens": text})
        else:
            print(text)
        return 0

    guarded(debug, body)


@app.command()
def detokenize(
    tokens: Annotated[str, typer.Argument(help="A token string, a file holding one, or '-' for stdin.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write (.png/.jpg, .wav/.flac, "
                                         "or .npy with --embeddings-only).")],
    embeddings_only: Annotated[bool, typer.Option("--embeddings-only", help="Images: write the (n, 1024) "
                                                  "unCLIP embeddings as .npy, no diffusion.")] = False,
    overwrite: OverwriteOpt = False, steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    seed: SeedOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", verbose: VerboseOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Turn <image>…</image> or <spch>…</spch> token strings back into a file."""

    def body() -> int:
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
        mio = make_mio(model, None, device, dtype, "none", verbose)
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
                pixel = mediatokens.PixelOptions(steps=steps, guidance=guidance, size=size, seed=seed)
                images = mediatokens.images_from_ids(mio.runtime, ids, pixel)
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

    guarded(debug, body)


@app.command()
def asr(
    audio: Annotated[list[str], typer.Argument(help="Audio files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    batch_size: BatchOpt = 1, constrain: ConstrainOpt = True, as_json: JsonOpt = False,
    show_prompt: PrintPromptOpt = False, output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
) -> None:
    """Transcribe speech."""

    def body() -> int:
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     batch_size, constrain)
        return _run_task("asr", _audio_jobs(audio, recursive, {}), model=model, variant=variant, device=device,
                         dtype=dtype, quantize=quantize, verbose=verbose, options=options, output_dir=output_dir,
                         overwrite=overwrite, skip_existing=skip_existing, as_json=as_json, show_prompt=show_prompt)

    guarded(debug, body)


def _speech_out_command(task_name: str, field_name: str, texts: list[str], *, model: str | None,
                        variant: str | None, device: str, dtype: str, quantize: str, verbose: bool, options: Any,
                        output_dir: Path | None, overwrite: bool, skip_existing: bool, as_json: bool,
                        show_prompt: bool) -> int:
    return _run_task(task_name, _text_jobs(texts, field_name), model=model, variant=variant, device=device,
                     dtype=dtype, quantize=quantize, verbose=verbose, options=options, output_dir=output_dir,
                     overwrite=overwrite, skip_existing=skip_existing, as_json=as_json, show_prompt=show_prompt)


@app.command()
def tts(
    texts: Annotated[list[str] | None, typer.Argument(help="Text to speak ('-' reads one per line).")] = None,
    text_file: Annotated[Path | None, typer.Option("--text-file", help="One utterance per line.")] = None,
    output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False, skip_existing: SkipExistingOpt = False,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    batch_size: BatchOpt = 1, constrain: ConstrainOpt = True, as_json: JsonOpt = False,
    show_prompt: PrintPromptOpt = False,
) -> None:
    """Speak text: one wav per utterance."""

    def body() -> int:
        values = list(texts or [])
        if text_file is not None:
            values.extend(line for line in _read_file(str(text_file)).splitlines() if line.strip())
        if not values:
            raise UsageError("nothing to say", hint="give text, '-' for stdin, or --text-file FILE")
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     batch_size, constrain)
        return _speech_out_command("tts", "text", _expand_text_inputs(values, "text"), model=model,
                                   variant=variant, device=device, dtype=dtype, quantize=quantize, verbose=verbose,
                                   options=options, output_dir=output_dir, overwrite=overwrite,
                                   skip_existing=skip_existing, as_json=as_json, show_prompt=show_prompt)

    guarded(debug, body)


@app.command()
def speak(
    questions: Annotated[list[str], typer.Argument(help="Questions to answer out loud.")],
    output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False, skip_existing: SkipExistingOpt = False,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    batch_size: BatchOpt = 1, constrain: ConstrainOpt = True, as_json: JsonOpt = False,
    show_prompt: PrintPromptOpt = False,
) -> None:
    """Answer questions with speech (voice mode)."""

    def body() -> int:
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     batch_size, constrain)
        return _speech_out_command("speak", "question", _expand_text_inputs(questions, "question"), model=model,
                                   variant=variant, device=device, dtype=dtype, quantize=quantize, verbose=verbose,
                                   options=options, output_dir=output_dir, overwrite=overwrite,
                                   skip_existing=skip_existing, as_json=as_json, show_prompt=show_prompt)

    guarded(debug, body)


@app.command()
def speech2speech(
    audio: Annotated[list[str], typer.Argument(help="Recordings to answer with speech.")],
    recursive: RecursiveOpt = False,
    output_dir: OutputDirOpt = None, overwrite: OverwriteOpt = False, skip_existing: SkipExistingOpt = False,
    model: ModelOpt = None, variant: VariantOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "auto", verbose: VerboseOpt = False, debug: DebugOpt = False,
    beams: BeamsOpt = None, sample: SampleOpt = None, temperature: TemperatureOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepetitionOpt = None, max_new_tokens: MaxNewOpt = None, seed: SeedOpt = None,
    batch_size: BatchOpt = 1, constrain: ConstrainOpt = True, as_json: JsonOpt = False,
    show_prompt: PrintPromptOpt = False,
) -> None:
    """Answer spoken input with speech."""

    def body() -> int:
        options = generation_options(beams, sample, temperature, top_p, repetition_penalty, max_new_tokens, seed,
                                     batch_size, constrain)
        return _run_task("speech2speech", _audio_jobs(audio, recursive, {}), model=model, variant=variant,
                         device=device, dtype=dtype, quantize=quantize, verbose=verbose, options=options,
                         output_dir=output_dir, overwrite=overwrite, skip_existing=skip_existing, as_json=as_json,
                         show_prompt=show_prompt)

    guarded(debug, body)


def main(argv: list[str] | None = None) -> None:
    # Busy-waiting OpenMP threads made CPU encodes 3-6x slower whenever another process held a core
    # (benchmarks/speech.py); passive waiting costs little on an idle machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(args=argv, prog_name="mio")


if __name__ == "__main__":
    main()
