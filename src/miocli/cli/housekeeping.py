"""`mio doctor`, `mio download` and `mio demo`: the machine, the weights, and a first run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from miocli.cli.options import (
    Common,
    emit_json,
    with_options,
)


# ---- housekeeping -----------------------------------------------------------------------------
@with_options("json")
def doctor(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder or hub id to check.")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="instruct or base.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    *, opts: Common,
) -> int:
    """Report versions, devices, memory, bitsandbytes, and check a model folder."""
    from miocli.cli.doctor import collect, render

    report = collect(model, variant, device)
    if opts.as_json:
        emit_json(report)
    else:
        render(report)
    return 0 if report["checkpoint"].get("ok") else 3


@with_options()
def download(
    repo: Annotated[str | None, typer.Argument(help="m-a-p/MIO-7B-Instruct or m-a-p/MIO-7B-Base (or use "
                                               "--variant).", show_default=False)] = None,
    variant: Annotated[str, typer.Option("--variant", help="instruct or base.")] = "instruct",
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the hub to answer.")] = 10.0,
    *, opts: Common,
) -> int:
    """Download MIO weights into the Hugging Face cache, on purpose (nothing else ever downloads)."""
    from miocli.model.download import download_model

    if repo is not None:
        from miocli.model.checkpoint import HUB_IDS

        named = {hub_id.lower(): name for name, hub_id in HUB_IDS.items()}
        if repo.lower() not in named:
            from miocli.errors import UsageError

            raise UsageError(f"mio downloads only MIO's own repositories, not {repo}",
                             hint=f"give one of {', '.join(HUB_IDS.values())}")
        variant = named[repo.lower()]
    print(download_model(variant, revision=revision, timeout=timeout))
    return 0


@with_options("json")
def list_models(*, opts: Common) -> int:
    """List the models on this machine: id (what --model takes), variant, size, where."""
    from miocli.model.download import cached_models, human_size
    from miocli.output.stdout import print_line

    models = cached_models()
    for entry in models:
        if opts.as_json:
            emit_json(entry)
        else:
            print_line(f"{entry['id']}\t{entry['variant']}\t{human_size(int(entry['size_bytes']))}\t{entry['path']}")
    if not models:
        import sys

        print("mio: no model here yet: `mio download m-a-p/MIO-7B-Instruct`, or `--model tiny` to build the tiny "
              "random one", file=sys.stderr)
    return 0


@with_options()
def demo(
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Where to write the outputs "
                                                       "(default: ./mio-demo, reused).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Report what was loaded.")] = False,
    *, opts: Common,
) -> int:
    """Build a tiny random checkpoint and run every task on it (outputs are noise; it proves the install)."""
    from miocli.cli.demo import run_demo

    return run_demo(output_dir, verbose=verbose)
