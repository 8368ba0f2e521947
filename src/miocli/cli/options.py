"""The options `mio` commands share, declared once.

Each command names the groups it takes (`@with_options("runtime", "generation", ...)`); the
decorator appends those options to the command's signature, which is what Typer reads, and
hands the command one `Common` object instead of twenty keyword arguments. The command body
runs under `guarded`, so a MioError becomes one clear line and its exit code.

Stays import-light: `mio --help` loads this module.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from miocli.errors import MioError, UsageError, report
from miocli.output.stdout import print_record

RUNTIME = "Model and device"
GENERATION = "Generation"
OUTPUT = "Output"
ENGINES = "Engines and server"
RAY = "Ray cluster"


# Options of several task commands, declared in their signatures.
PIXELS = "Pixels"
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Diffusion steps.", rich_help_panel=PIXELS)]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Guidance scale.", rich_help_panel=PIXELS)]
SizeOpt = Annotated[int | None, typer.Option(
    "--size", help="Output side in pixels [default: the decoder's own: 768 for MIO, 64 for tiny]", show_default=False,
    rich_help_panel=PIXELS)]
FRAMES = "Video frames"
# `--help` lists the task's own options first, then how it runs: model/runtime, then engines, server, Ray.
PANEL_ORDER = (None, PIXELS, FRAMES, OUTPUT, GENERATION, RUNTIME, ENGINES, RAY)
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


@dataclass
class Common:
    """Every shared option with its default; a command only sees the groups it declared."""

    model: str | None = None
    variant: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "auto"
    verbose: bool = False
    engine: str = "transformers"
    engine_url: str | None = None
    server: str | None = None
    ray: bool = False
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    debug: bool = False
    beams: int | None = None
    sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    batch_size: int = 1
    constrain: bool = True
    beam_scoring: str | None = None
    as_json: bool = False
    show_prompt: bool = False
    output_dir: Path | None = None
    overwrite: bool = False
    skip_existing: bool = False
    # Whether the command has --skip-existing at all, so error hints only offer what exists.
    offers_skip_existing: bool = False

    def make_mio(self, quantize: str | None = None, *, local: bool = False) -> Any:
        """The model to run on: `mio serve` at --server / MIO_SERVER (a light client), else in this process."""
        if (self.ray or self.ray_address) and not local:
            return self._ray_mio(quantize)
        if self.server and not local:
            if self.engine != "transformers" or self.engine_url:
                raise UsageError("--engine and --engine-url choose what runs the LLM in this process; a --server "
                                 "runs its own", hint="start `mio serve --engine ...` instead, or drop --server")
            from miocli.serve.client import RemoteMio

            return RemoteMio(self.server)
        if self.verbose:
            # --verbose shows what the libraries say too (decoders, diffusers), not only mio's lines.
            from miocli import quiet

            quiet.set_enabled(False)
        from miocli.core.api import Mio

        return Mio(self.model, variant=self.variant, device=self.device, dtype=self.dtype,
                   quantize=quantize or self.quantize, verbose=self.verbose, engine=self.engine,
                   engine_url=self.engine_url)

    def _ray_mio(self, quantize: str | None) -> Any:
        """`--ray`: the same run on a Ray cluster's workers, one Mio each (miocli.scale.ray)."""
        if self.server:
            raise UsageError("--ray and --server both say where to run", hint="keep one of them")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be at least 1 (got {self.workers})")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker cannot be negative (got {self.gpus_per_worker:g})")
        from miocli.model.devices import RuntimeOptions
        from miocli.scale.ray import Cluster, RayMio

        model = RuntimeOptions(self.model, self.variant, self.device, self.dtype, quantize or self.quantize,
                               self.verbose, self.engine, self.engine_url)
        return RayMio(model, Cluster(self.ray_address, self.workers, self.gpus_per_worker, verbose=self.verbose))

    def generation(self, *, sample: bool | None = None, batch_size: int | None = None) -> Any:
        """The generation options, validated; `sample`/`batch_size` replace the user's when given."""
        from miocli.core.generation import GenerationOptions

        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise UsageError("--batch-size must be at least 1")
        from miocli.core.validate import check_seed

        check_seed(self.seed)
        # The options share GenerationOptions' field names, so they are taken over by name.
        chosen = {f.name: getattr(self, f.name) for f in fields(GenerationOptions)}
        options = GenerationOptions(**{**chosen, "batch_size": size,
                                       "sample": self.sample if sample is None else sample})
        options.overrides().validate()
        return options

    def open_output(self) -> Any:
        if self.overwrite and self.skip_existing:
            raise UsageError("--overwrite and --skip-existing contradict each other")
        if self.output_dir is None:
            return None
        from miocli.output.folder import OutputDir

        return OutputDir(self.output_dir, overwrite=self.overwrite, skip_existing=self.skip_existing,
                         offers_skip_existing=self.offers_skip_existing)


def _opt(*names: str, help: str | None = None, panel: str | None = None, **extra: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, **extra)


# name → (annotation, default); the names are Common's fields.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (Annotated[str | None, _opt("--model", "-m", help="Model folder, hub id in the local HF cache (`mio "
                                         "list`), or tiny (the random test model) [env MIO_MODEL; default "
                                         "m-a-p/MIO-7B-Instruct].", panel=RUNTIME)], None),
    "variant": (Annotated[str | None, _opt("--variant", help="instruct or base (default: detected from the "
                                           "folder).", panel=RUNTIME)], None),
    "device": (Annotated[str, _opt("--device", help="auto, cpu, cuda or cuda:N.", panel=RUNTIME)], "auto"),
    "dtype": (Annotated[str, _opt("--dtype", help="auto, float32, bfloat16 or float16.", panel=RUNTIME)], "auto"),
    "quantize": (Annotated[str, _opt("--quantize", help="auto, none, 8bit or 4bit weights (CUDA: bitsandbytes, "
                                     "NF4 for 4bit; CPU: mio's own int8/int4 layers).", panel=RUNTIME)], "auto"),
    "verbose": (Annotated[bool, _opt("--verbose", "-v", help="Report what was loaded, how long it took, and "
                                     "memory.", panel=RUNTIME)], False),
    "engine": (Annotated[str, _opt("--engine", metavar="transformers|vllm|llamacpp", help="What runs the LLM: "
                                   "transformers (reference-exact), vLLM or llama.cpp in this Python "
                                   "(docs/engines.md).", panel=ENGINES)],
               "transformers"),
    "engine_url": (Annotated[str | None, _opt("--engine-url", envvar="MIO_ENGINE_URL", help="Run the LLM on a "
                                              "`vllm serve` of the same checkpoint at this URL (codecs stay here).",
                                              panel=ENGINES, show_default=False)], None),
    "server": (Annotated[str | None, _opt("--server", envvar="MIO_SERVER", help="Run on a `mio serve` at this URL "
                                          "(key in MIO_API_KEY) instead of loading the model here.",
                                          panel=ENGINES, show_default=False)], None),
    "ray": (Annotated[bool, _opt("--ray", help="Run the job on a Ray cluster (RAY_ADDRESS, or a local one), one "
                                 "model per worker; needs miocli[ray].", panel=RAY)], False),
    "ray_address": (Annotated[str | None, _opt("--ray-address", help="Join the Ray cluster at this address (implies "
                                               "--ray).", panel=RAY, show_default=False)], None),
    "workers": (Annotated[int | None, _opt("--workers", help="Ray workers, each holding one model (default: one "
                                           "per GPU, or 1).", panel=RAY, show_default=False)], None),
    "gpus_per_worker": (Annotated[float | None, _opt("--gpus-per-worker", help="GPUs each Ray worker holds "
                                                     "(default 1 when the cluster has GPUs, else 0).", panel=RAY,
                                                     show_default=False)], None),
    "debug": (Annotated[bool, _opt("--debug", help="Show tracebacks.", panel=RUNTIME)], False),
    "beams": (Annotated[int | None, _opt("--beams", help="Beam count (task preset by default).",
                                         panel=GENERATION)], None),
    "sample": (Annotated[bool | None, _opt("--sample/--greedy", help="Sample or decode deterministically.",
                                           panel=GENERATION, show_default=False)], None),
    "temperature": (Annotated[float | None, _opt("--temperature", panel=GENERATION)], None),
    "top_p": (Annotated[float | None, _opt("--top-p", panel=GENERATION)], None),
    "repetition_penalty": (Annotated[float | None, _opt("--repetition-penalty", panel=GENERATION)], None),
    "max_new_tokens": (Annotated[int | None, _opt("--max-new-tokens", panel=GENERATION)], None),
    "seed": (Annotated[int | None, _opt("--seed", help="Random seed for reproducible sampling.",
                                        panel=GENERATION)], None),
    "constrain": (Annotated[bool, _opt("--constrain/--no-constrain", help="Keep image and speech segments "
                                       "well-formed while generating.", panel=GENERATION)], True),
    "beam_scoring": (Annotated[str | None, _opt("--beam-scoring", metavar="answer|reference", help="How finished "
                                                "beams are length-normalised: by the answer (default) or, as the "
                                                "reference's transformers 4.34 did, by prompt + padding + answer "
                                                "(shorter answers).", panel=GENERATION, show_default=False)], None),
    "batch_size": (Annotated[int, _opt("--batch-size", "-b", help="Prompts per generate call.",
                                       panel=GENERATION)], 1),
    "as_json": (Annotated[bool, _opt("--json", help="One JSON object per result on stdout.", panel=OUTPUT)], False),
    "show_prompt": (Annotated[bool, _opt("--print-prompt", help="Print the exact prompt and exit (no LLM weights "
                                         "are loaded).", panel=OUTPUT)], False),
    "output_dir": (Annotated[Path | None, _opt("--output-dir", "-o", help="Write results and manifest.jsonl "
                                               "here.", panel=OUTPUT)], None),
    "overwrite": (Annotated[bool, _opt("--overwrite", help="Replace existing output files.", panel=OUTPUT)], False),
    "skip_existing": (Annotated[bool, _opt("--skip-existing", help="Skip inputs whose outputs exist (resume a "
                                           "batch).", panel=OUTPUT)], False),
}

GROUPS: dict[str, tuple[str, ...]] = {
    # Commands that only encode or decode media take the model folder and device, not the LLM's options.
    "codec": ("model", "device", "dtype", "verbose", "server"),
    # The model a process loads itself (`mio serve`); "runtime" adds --server for the commands.
    "model": ("model", "variant", "device", "dtype", "quantize", "verbose", "engine", "engine_url"),
    "runtime": ("model", "variant", "device", "dtype", "quantize", "verbose", "engine", "engine_url", "server"),
    "generation": ("beams", "sample", "temperature", "top_p", "repetition_penalty", "max_new_tokens", "seed",
                   "constrain", "beam_scoring"),
    "batch": ("batch_size",),
    # Batch commands that can run on a Ray cluster (issue 14).
    "ray": ("ray", "ray_address", "workers", "gpus_per_worker"),
    "json": ("as_json",),
    "prompt": ("show_prompt",),
    "output": ("output_dir", "overwrite", "skip_existing"),
    "write": ("output_dir", "overwrite"),
}

# Declaration order of Common is the order of the options in --help.
_ORDER = [f.name for f in fields(Common)]


def with_options(*groups: str, batch_size: int = 1) -> Callable[[Callable[..., int | None]], Callable[..., None]]:
    """Give a command the options of `groups`; it receives them as `opts: Common`."""
    names = {"debug"}
    for group in groups:
        names.update(GROUPS[group])
    chosen = [n for n in _ORDER if n in names]

    def decorate(command: Callable[..., int | None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        hints = get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.name != "opts"]
        clash = {p.name for p in own} & set(chosen)
        if clash:
            raise TypeError(f"{command.__name__} redeclares shared options {sorted(clash)}")
        shared = []
        for name in chosen:
            annotation, default = OPTIONS[name]
            shared.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=batch_size if name == "batch_size" else default))

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            opts = Common(**{name: kwargs.pop(name) for name in chosen})
            opts.offers_skip_existing = "skip_existing" in chosen
            guarded(opts.debug, lambda: command(**kwargs, opts=opts))

        parameters = own + shared
        run.__signature__ = signature.replace(parameters=parameters, return_annotation=None)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # Typer must read the new signature, not the wrapped function's
        return run

    return decorate


class PanelCommand(typer.core.TyperCommand):
    """Plain-text help (no rich: `--help` stays fast) with the options in their `rich_help_panel` sections."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str | None, list[tuple[str, str]]] = {}
        arguments = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                sections.setdefault(getattr(param, "rich_help_panel", None), []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        rank = {panel: n for n, panel in enumerate(PANEL_ORDER)}
        for panel in sorted(sections, key=lambda name: rank.get(name, 1)):
            with formatter.section(panel or "Options"):
                formatter.write_dl(sections[panel])


# ---- plumbing shared by the commands ---------------------------------------------------------------
def err(message: str) -> None:
    print(message, file=sys.stderr)


def fail(exc: MioError) -> None:
    report(exc)


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
    except BrokenPipeError:
        # The reader of stdout went away (`mio … | head -1`): stop quietly, as a process killed by
        # SIGPIPE would (exit status 128 + 13).
        from miocli.output.stdout import silence_stdout

        silence_stdout()
        raise typer.Exit(141) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            raise
        err(f"mio: unexpected error: {exc.__class__.__name__}: {exc}")
        err("  hint: run again with --debug for the traceback, and report it")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def emit_json(record: Any) -> None:
    print_record(record)
