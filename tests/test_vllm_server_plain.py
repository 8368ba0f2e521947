"""A `vllm serve` started without mio's logits processor: mio refuses to trust it with the rule on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mio_testing import run_mio
from vllm_testing import VllmServe, head32_checkpoint, vllm_python

# Real vLLM starts (tens of seconds each): run by .ci/run as `python -m pytest -m vllm`, not in the default suite.
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def plain_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServe]:
    vllm_python()  # skips, saying why, without the virtualenv
    model = head32_checkpoint(tiny_model, tmp_path_factory.mktemp("engines") / "tiny32")
    serve = VllmServe(model, tmp_path_factory.mktemp("vllm-plain"), rule=False)
    serve.model = model  # type: ignore[attr-defined]
    yield serve
    serve.stop()


def test_a_server_without_the_rule_is_refused_with_exit_3(plain_server: VllmServe, tmp_path: Path):
    run = run_mio("imagine", "--model", str(plain_server.model), "--device", "cpu",  # type: ignore[attr-defined]
                  "--engine-url", plain_server.url, "--max-new-tokens", "40", "-o", str(tmp_path / "out"), "a kite")
    assert run.returncode == 3
    assert "does not run mio's decodable-output rule" in run.stderr and "--logits-processors" in run.stderr


def test_without_the_rule_it_still_generates(plain_server: VllmServe):
    run = run_mio("chat", "--model", str(plain_server.model), "--device", "cpu",  # type: ignore[attr-defined]
                  "--engine-url", plain_server.url, "--no-constrain", "--beams", "1", "--max-new-tokens", "8", "hi")
    assert run.returncode == 0, run.stderr
