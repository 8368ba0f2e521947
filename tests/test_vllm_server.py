"""`--engine-url`: mio's generation on a real `vllm serve` started here on loopback (one for the module)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_cases import CASES, run_cases
from mio_testing import one_torch_thread, run_mio  # noqa: F401  (one_torch_thread: autouse)
from vllm_testing import VllmServe, head32_checkpoint, vllm_python

# Real vLLM starts (tens of seconds each): run by .ci/run as `python -m pytest -m vllm`, not in the default suite.
pytestmark = pytest.mark.vllm

SERVER_CASES = ["chat_batch", "caption_single", "imagine_batch", "imagine_free"]


@pytest.fixture(scope="module")
def model32(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return head32_checkpoint(tiny_model, tmp_path_factory.mktemp("engines") / "tiny32")


@pytest.fixture(scope="module")
def server(model32: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServe]:
    vllm_python()  # skips, saying why, without the virtualenv
    serve = VllmServe(model32, tmp_path_factory.mktemp("vllm-serve"))
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def on_server(model32: Path, server: VllmServe) -> dict:
    return run_cases(model32, "transformers", [*SERVER_CASES, "tts_sampled"], engine_url=server.url)


@pytest.mark.parametrize("case", SERVER_CASES)
def test_server_greedy_ids_equal_transformers(case: str, model32: Path, on_server: dict):
    assert on_server[case]["ids"] == run_cases(model32, "transformers", [case])[case]["ids"]


def test_server_answers_are_decodable(on_server: dict):
    for case in ("chat_batch", "caption_single", "imagine_batch", "tts_sampled"):
        assert on_server[case]["problems"] == [[] for _ in CASES[case]["fields"]], case


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("pictures") / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


def test_cli_caption_on_the_server_equals_greedy_transformers(model32: Path, server: VllmServe, picture: Path):
    remote = run_mio("caption", "--model", str(model32), "--device", "cpu", "--json", "--max-new-tokens", "24",
                     str(picture), env={"MIO_ENGINE_URL": server.url})
    assert remote.returncode == 0, remote.stderr
    # The caption preset is 5 beams: vLLM's beam search cannot take the rule, so it runs greedy and says so, once.
    assert remote.stderr.count("mio: note:") == 1 and "1 beam instead of 5" in remote.stderr
    local = run_mio("caption", "--model", str(model32), "--device", "cpu", "--json", "--max-new-tokens", "24",
                    "--beams", "1", str(picture))
    assert local.returncode == 0, local.stderr
    assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]


def test_cli_tts_on_the_server_writes_audio(model32: Path, server: VllmServe, tmp_path: Path):
    out = tmp_path / "out"
    run = run_mio("tts", "--model", str(model32), "--device", "cpu", "--engine-url", server.url, "--seed", "0",
                  "--max-new-tokens", "60", "-o", str(out), "hello there")
    assert run.returncode == 0, run.stderr
    assert [p.suffix for p in out.iterdir() if p.suffix == ".wav"] == [".wav"]


def test_beam_search_without_the_rule_runs_on_the_server(model32: Path, server: VllmServe):
    # --no-constrain and no penalty: the preset's 5 beams run as vLLM beam search, no note.
    run = run_mio("chat", "--model", str(model32), "--device", "cpu", "--engine-url", server.url, "--no-constrain",
                  "--max-new-tokens", "8", "--json", "hello", env={})
    assert run.returncode == 0, run.stderr
    assert "mio: note:" not in run.stderr
    assert isinstance(json.loads(run.stdout)["text"], str)


def test_one_prompt_streams_its_ids_from_the_server(model32: Path, server: VllmServe):
    from miocli.core.generation import GenerationOverrides
    from miocli.core.pipeline import Engine
    from miocli.core.prompts import Prompt, task_prompt_text
    from miocli.core.tasks import TASKS
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    engine = Engine(Runtime(RuntimeOptions(model=str(model32), device="cpu", engine_url=server.url)))
    seen: list[list[int]] = []
    task = TASKS["chat"]
    [result] = engine.run(task, [Prompt(task_prompt_text(task, "instruct", {"question": "hello"}))],
                          overrides=GenerationOverrides(num_beams=1, max_new_tokens=16),
                          on_tokens=lambda _n, ids: seen.append(ids))
    assert len(seen) > 1, "ids arrive in several chunks, not at the end"
    streamed = [i for chunk in seen for i in chunk]
    assert streamed[: len(result.token_ids)] == result.token_ids
