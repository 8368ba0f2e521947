"""`mio doctor`: what this machine can run, and whether a model folder is complete."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

from miocli import checkpoint
from miocli.errors import MioError

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


def collect(model: str | None, variant: str | None, device: str) -> dict[str, Any]:
    from miocli.runtime import bitsandbytes_problem, resolve_device, resolve_quantize

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
        entry["components"] = [
            {"name": r.name, "ok": r.ok, "problems": r.problems, "notes": r.notes}
            for r in checkpoint.check_components(model_dir)
        ]
        entry["ok"] = all(c["ok"] for c in entry["components"])
    except MioError as exc:
        entry["ok"] = False
        entry["error"] = str(exc)
    report["checkpoint"] = entry
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
    table.add_row("device", f"{report['device']} (auto quantize: {report.get('auto_quantize', '-')})")
    entry = report["checkpoint"]
    table.add_row("model", f"{entry['spec']}")
    if "error" in entry:
        table.add_row("", f"[red]{entry['error']}[/red]")
    else:
        table.add_row("", f"{entry['path']} ({entry['variant']})")
        for component in entry["components"]:
            status = "[green]ok[/green]" if component["ok"] else "[red]" + "; ".join(component["problems"]) + "[/red]"
            table.add_row(f"  {component['name']}", status)
            for note in component["notes"]:
                table.add_row("", f"[yellow]{note}[/yellow]")
    console.print(table)
