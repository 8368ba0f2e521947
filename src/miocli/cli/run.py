"""What the task commands share: their arguments as targets, and one run through the core into the writer.

Targets pair an input (`core.inputs.Item`) with the stem of its output files; `run_task` streams
them through `Mio.stream` (or a `--server`, or `--ray`) and the writer (`miocli.output.writer`)
puts each result on disk and stdout as it comes. Nothing heavy at import: `mio --help` loads this.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from miocli import quiet
from miocli.cli.options import Common, emit_json, err
from miocli.errors import UsageError, article

# --example takes two values; Typer cannot declare a repeatable two-value option, so `app.main`
# joins each pair into one value with this separator before Typer parses the line.
EXAMPLE_SEPARATOR = "\x1f"


# ---- plumbing ---------------------------------------------------------------------------------
def print_prompt(mio: Any, prompt_text: str, as_json: bool, **media: Any) -> None:
    from miocli.core.prompts import Prompt

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
        from miocli.core.inputs import read_stdin

        value = read_stdin(what)
    if value is None or not value.strip():
        raise UsageError(f"the {what} is empty", hint=f"give the {what} as an argument, or '-' to read stdin")
    from miocli.core.validate import check_text

    check_text(value, what)
    return value


def report_problems(name: str, problems: list[str]) -> None:
    for problem in problems:
        err(f"mio: warning: {name}: {problem}")


def read_file(name: str) -> str:
    try:
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text") from None


def expand_text_inputs(values: list[str], what: str) -> list[str]:
    texts: list[str] = []
    for value in values:
        if value == "-":
            from miocli.core.inputs import read_stdin

            texts.extend(line for line in read_stdin(f"{what}s").splitlines() if line.strip())
        else:
            texts.append(value)
    if not texts or any(not t.strip() for t in texts):
        raise UsageError(f"a {what} is empty", hint=f"give non-empty {what}s, or '-' to read them from stdin")
    from miocli.core.validate import check_text

    for text in texts:
        check_text(text, what)
    return texts


class Progress:
    """Bars on stderr while a command works, when stderr is a terminal (nothing otherwise).

    One bar counts the inputs (when there are several); a second follows the long steps inside one
    input, such as an image's denoising steps, so a single picture is not a silent minute. Each bar
    shows the time left.
    """

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self._bars: Any = None
        self._inputs: Any = None
        self._step: Any = None
        self._step_label = ""

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress as Bars

            self._bars = Bars(console=Console(file=quiet.terminal_stderr()), transient=True,
                              # Answers piped on (`| xargs`) must reach the pipe, not the bar's terminal.
                              redirect_stdout=sys.stdout.isatty())
            self._bars.start()
            if self.total > 1:
                self._inputs = self._bars.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._inputs is not None:
            self._bars.advance(self._inputs, n)

    def step(self, label: str, done: int, total: int) -> None:
        """`done` of `total` steps of the work named `label`; a new label (or a restart) starts a new bar."""
        if self._bars is None:
            return
        if self._step is None or label != self._step_label or done <= 1:
            if self._step is not None:
                self._bars.remove_task(self._step)
            self._step, self._step_label = self._bars.add_task(label, total=total), label
        self._bars.update(self._step, completed=done, total=total)
        if done >= total:
            # Finished work leaves no full bar behind under the next one.
            self._bars.remove_task(self._step)
            self._step = None

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()


def write_all(mio: Any, api_task: str, targets: list[Any], writer: Any, **settings: Any) -> int:
    """Stream the targets into the writer with progress on a terminal; the exit code (1 when any failed)."""
    from miocli.output.stdout import StdoutClosed
    from miocli.output.writer import run_and_write

    with Progress(len(targets), writer.task) as bars:
        writer.progress = bars.advance
        try:
            failures = run_and_write(mio, api_task, targets, writer, on_step=bars.step, **settings)
        except StdoutClosed:
            raise typer.Exit(141) from None
    return 1 if failures else 0


# ---- media tasks ------------------------------------------------------------------------------
def run_task(api_task: str, record_task: str, kind: str, targets: list[Any], opts: Common, *,
              options: Any = None, text_format: str = "txt", **settings: Any) -> int:
    """Stream the targets through the task core; the writer puts each result on disk and stdout as it comes
    (text answers as `text_format`, see output/transcripts.py)."""
    from miocli.output.writer import ResultWriter

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
    writer = ResultWriter(record_task, kind, opts.open_output(), as_json=opts.as_json, show_names=len(targets) > 1,
                          text_format=text_format)
    return write_all(mio, api_task, targets, writer, options=options, **settings)


def frame_settings(max_frames: int, uniform: bool, threshold: float | None) -> dict[str, Any]:
    if max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1 (got {max_frames})")
    if threshold is not None and not 0 < threshold <= 255:
        raise UsageError(f"--threshold must be between 0 and 255 (got {threshold})")
    return {"max_frames": max_frames, "uniform": uniform, "threshold": threshold}


def media_targets(kind: str, paths: list[str], recursive: bool, fields: dict[str, str]) -> list[Any]:
    """One target per input file of `kind` (files, folders, globs or '-'); named and stemmed by the file."""
    from miocli.core.inputs import Item, Media, expand_inputs
    from miocli.output.writer import Target

    return [Target(Item(str(path), dict(fields), [Media(kind, str(path), path=path)]), path.stem)
            for path in expand_inputs(paths, kind, recursive)]


def text_targets(texts: list[str], field_name: str, count: int = 1) -> list[Any]:
    """One target per text (`count` per text for imagine -n), stemmed NNN-slug[-k]."""
    from miocli.core.inputs import Item
    from miocli.output.files import slug
    from miocli.output.writer import Target

    targets = []
    for number, text in enumerate((t for t in texts for _ in range(count)), start=1):
        sample = (number - 1) % count
        stem = f"{number:03d}-{slug(text, 30)}" + (f"-{sample + 1}" if count > 1 else "")
        targets.append(Target(Item(text, {field_name: text}, sample=sample), stem))
    return targets


def example_pairs(values: list[str] | None, kind: str) -> list[tuple[Any, str]]:
    """--example pairs (MEDIA, ANSWER); each must be the same kind of media as the input."""
    from miocli.core.inputs import Media, kind_of_path

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
                             hint=f"give {kind} examples for {article(kind)} input")
        pairs.append((Media(kind, media, path=Path(media)), answer.strip()))
    return pairs


def pixel_settings(steps: int, guidance: float, size: int | None) -> dict[str, Any]:
    from miocli.core.validate import check_pixels

    # Here, before any model loads, rather than in the decoder after the whole generation.
    check_pixels(steps, guidance, size)
    return {"steps": steps, "guidance": guidance, "size": size}
