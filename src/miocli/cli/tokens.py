"""`mio tokenize` and `mio detokenize`: media to MIO's token strings and back, no LLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from miocli.cli.options import (
    Common,
    GuidanceOpt,
    RecursiveOpt,
    SizeOpt,
    StepsOpt,
    with_options,
)
from miocli.cli.run import (
    pixel_settings,
    read_file,
)
from miocli.errors import MioError, UsageError, report


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
    from miocli.core.inputs import Item, Media, expand_inputs, kind_of_path
    from miocli.core.tasks import AUDIO, IMAGE
    from miocli.output.files import display_name, json_line
    from miocli.output.stdout import one_line, print_line, require_stdout

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


@with_options("codec", "json")
def detokenize(
    tokens: Annotated[list[str], typer.Argument(help="Token strings, files holding them, or '-' for stdin.")],
    output: Annotated[str, typer.Option("--output", "-o", help="One input: the file to write (.png/.jpg/.webp, "
                                        ".wav/.flac, .npy with --embeddings-only, or '-' for stdout). Several: a "
                                        "folder, where each input gives NAME.png, NAME.wav or NAME.npy.")],
    embeddings_only: Annotated[bool, typer.Option("--embeddings-only", help="Images: write the (n, 1024) "
                                                  "unCLIP embeddings as .npy, no diffusion.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files.")] = False,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for the diffusion noise.")] = None,
    *, opts: Common,
) -> int:
    """Turn <image>…</image> or <spch>…</spch> token strings back into files (more segments: NAME-2, …)."""
    from miocli.core.inputs import read_stdin
    from miocli.output.detokenize import default_suffix, run_detokenize, speech_format
    from miocli.output.files import display_name, json_line
    from miocli.output.stdout import print_line

    sources = []
    for number, value in enumerate(tokens, start=1):
        if value == "-":
            sources.append(("stdin", "stdin", read_stdin("tokens")))
        elif value.lstrip().startswith("<"):
            sources.append((f"tokens {number}", f"{number:03d}", value))
        else:
            from miocli.output.speechout import scan_file

            # One long speech segment is decoded from the file in windows; anything else is read whole.
            long = None if embeddings_only else scan_file(value)
            sources.append((value, Path(value).stem, long if long is not None else read_file(value)))
    several = len(sources) > 1
    if several and (output == "-" or Path(output).suffix):
        raise UsageError(f"{len(sources)} inputs need a folder for -o, not {output}",
                         hint="e.g. -o decoded/ (each input gives NAME.png, NAME.wav or NAME.npy there)")
    mio = opts.make_mio(quantize="none")
    failures = 0
    for name, stem, text in sources:
        from miocli import protocol
        from miocli.output.speechout import write_speech_file

        if not isinstance(text, str) and not hasattr(mio, "runtime"):
            text = read_file(name)  # a server decodes what it is sent
        parsed = protocol.parse_output(text, extract=False) if isinstance(text, str) else None  # once: megabytes
        suffix = default_suffix(parsed, embeddings_only) if parsed is not None else ".wav"
        target = str(Path(output) / f"{stem}{suffix}") if several else output
        if several:
            Path(output).mkdir(parents=True, exist_ok=True)
        try:
            if parsed is None:
                written = [write_speech_file(mio, text, display_name(name), target, speech_format(target),
                                             overwrite=overwrite)]
            else:
                written = run_detokenize(mio, parsed, target, embeddings_only=embeddings_only, overwrite=overwrite,
                                         seed=seed, source=display_name(name), **pixel_settings(steps, guidance, size))
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
