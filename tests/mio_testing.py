"""Helpers shared by test modules: a runner for the real `mio` entry point, torch on one thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def run_mio(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed `mio` entry point in a fresh process (what a user's shell does)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MIO_MODEL"}
    full_env.update(env or {})
    return subprocess.run(
        [*MIO_COMMAND, *args], input=stdin, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


# The console script pip installed; `python -m miocli` runs the same function when it is not on PATH.
MIO_COMMAND = [shutil.which("mio")] if shutil.which("mio") else [sys.executable, "-m", "miocli"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Autouse in the modules that import it: torch on one thread while they run.

    The tiny model's tensors are a few kilobytes: on a shared 2-core machine, waking torch's
    thread pool for every op costs far more than the work itself.
    """
    import torch  # here, not at the top: the CLI tests import this module and never need torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rewired_checkpoint(tiny_model: Path, folder: Path, rows: Callable[[Any, Any], None]) -> Path:
    """A copy of the tiny checkpoint whose layers add nothing, for answers computable by hand.

    Zero output projections leave the last hidden state equal to the current token's embedding
    (the final norm set to 1); `rows(embed, head)` then fills the zeroed embedding and output
    matrices, e.g. one-hot embeddings and output rows that chain one token to the next. The other
    files are links to the tiny checkpoint's.
    """
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    for entry in tiny_model.iterdir():
        if entry.name != "model.safetensors":
            (folder / entry.name).symlink_to(entry)
    weights = load_file(tiny_model / "model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
    weights["model.norm.weight"] = torch.ones_like(weights["model.norm.weight"])
    embed = torch.zeros_like(weights["model.embed_tokens.weight"])
    head = torch.zeros_like(weights["lm_head.weight"])
    rows(embed, head)
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
