"""Helpers shared by test modules: a runner for the real `mio` entry point, torch on one thread."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


# ---- a real `mio serve` for the server, OpenAI and playground tests --------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment_without_mio() -> dict[str, str]:
    """This environment without a model, server or key a developer may have set for their own use."""
    return {k: v for k, v in os.environ.items() if k not in ("MIO_MODEL", "MIO_SERVER", "MIO_API_KEY")}


class Server:
    def __init__(self, model: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Its log goes to a file: a pipe nobody reads would block a busy server.
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen([*MIO_COMMAND, "serve", "--model", str(model), "--device", "cpu", "--port",
                                         str(self.port), *extra], stderr=self.log, text=True,
                                        env={**_environment_without_mio(), **(env or {})})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.get("/health")  # any answer (a 401 with a key) means it listens
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mio serve did not start: {self.stop()}")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])

    def stop(self) -> str:
        """SIGTERM, wait, and the server's log."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.seek(0)
        log = self.log.read()
        self.log.close()
        return log


def quantization_logits(runtime: Any) -> Any:
    """The LLM's float32 logits for one fixed sentence: what quantized layers are compared on."""
    import torch

    ids = runtime.tokenizer.encode("<|startoftext|>The quick brown fox jumps over the lazy dog")
    with torch.inference_mode():
        return runtime.llm(torch.tensor([ids])).logits.float()
