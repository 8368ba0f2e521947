"""The `mio` command line: the Typer app, assembled from one module per command group.

- `chat`: chat and generate (text in, text out);
- `media`: the image and speech tasks; `video`: video and composite tasks; `tokens`: tokenize, detokenize;
- `server`: mio serve; `housekeeping`: doctor, download, demo; `export`: export-gguf;
- shared: `options` (the option groups, `Common`), `run` (targets, one run through the core into the writer).

Thin: options, inputs, printing; the work is in the core (`miocli.core.api.Mio`). Nothing heavy is
imported at module level: `mio --help` must not pay for torch or transformers. Results go to stdout
(text, or one JSON object per line with --json); progress and messages go to stderr.
"""

from __future__ import annotations

import os
import sys

import typer

from miocli.cli import chat, export, housekeeping, media, server, tokens, video
from miocli.cli.options import PanelCommand
from miocli.cli.run import EXAMPLE_SEPARATOR

app = typer.Typer(
    name="mio",
    help="Run MIO, the any-to-any multimodal model: text, images, speech and video in and out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("miocli")
        except PackageNotFoundError:  # a checkout run without being installed
            number = "unknown (not installed)"
        print(f"mio {number}")
        raise typer.Exit(0)


@app.callback()
def _main_options(
    show_version: bool = typer.Option(False, "--version", help="Print mio's version and exit.", is_eager=True,
                                      callback=_print_version),
) -> None:
    """Run MIO, the any-to-any multimodal model: text, images, speech and video in and out."""


# In the order `mio --help` lists them.
COMMANDS = [
    ("chat", chat.chat), ("generate", chat.generate),
    ("doctor", housekeeping.doctor), ("download", housekeeping.download), ("list", housekeeping.list_models),
    ("demo", housekeeping.demo),
    ("caption", media.caption), ("ask", media.ask), ("imagine", media.imagine), ("edit", media.edit),
    ("tokenize", tokens.tokenize), ("detokenize", tokens.detokenize),
    ("asr", media.asr), ("tts", media.tts), ("speak", media.speak), ("speech2speech", media.speech2speech),
    ("keyframes", video.keyframes), ("video-caption", video.video_caption), ("video-gen", video.video_gen),
    ("interleave", video.interleave), ("cot-visual", video.cot_visual),
    ("serve", server.serve), ("export-gguf", export.export_gguf),
]
for name, command in COMMANDS:
    app.command(name, cls=PanelCommand)(command)


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
