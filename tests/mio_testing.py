"""Helpers for tests that run the real `mio` entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


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
