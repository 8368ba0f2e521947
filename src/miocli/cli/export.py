"""`mio export-gguf`: MIO's LLM, tokenizer and chat template as one GGUF file (llama.cpp, ollama).

Thin: the export is `miocli.model.gguf_export`; this prints the file written on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from miocli.cli.options import Common, with_options


@with_options()
def export_gguf(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model folder, hub id in the local HF "
                                         "cache, or tiny.", show_default=False)],
    out: Annotated[Path, typer.Argument(metavar="OUT.gguf", help="The GGUF file to write.",
                                        show_default=False)],
    gguf_type: Annotated[str, typer.Option("--type", metavar="q4_0|q8_0|f16|f32",
                                           help="Weight type (norms stay f32; q4_0 keeps the output head in "
                                                "q8_0).")] = "q4_0",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT when it exists.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Report progress.")] = False,
    *, opts: Common,
) -> int:
    """Write MIO's LLM with its tokenizer, media tokens and chat template as GGUF (llama.cpp, ollama)."""
    import sys

    from miocli.model import gguf_export
    from miocli.model.checkpoint import resolve_model
    from miocli.output.stdout import print_line

    if gguf_type not in gguf_export.GGUF_TYPES:
        from miocli.errors import UsageError

        raise UsageError(f"unknown --type {gguf_type!r}", hint=f"use one of {', '.join(gguf_export.GGUF_TYPES)}")
    if out.exists() and not force:
        from miocli.errors import UsageError

        raise UsageError(f"{out} exists", hint="pass --force to replace it, or give another file name")

    def log(message: str) -> None:
        if verbose:
            print(f"mio: {message}", file=sys.stderr)

    print_line(str(gguf_export.export_gguf(resolve_model(model), out, gguf_type, force=force, log=log)))
    return 0
