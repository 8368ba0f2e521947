"""llama.cpp against transformers on the tiny checkpoint: the GGUF export, and `--engine llamacpp`.

The export loaded with llama-cpp-python must give transformers' float32 greedy tokens: f32 and f16
exactly or parting only on a tie (`parity.parity_problem`), q8_0 loosely. The engine, behind the
same seam as the others, must give the transformers engine's greedy ids for the shared cases
(tests/engine_cases.py), keep every constrained answer decodable, stream and cancel, and run the
caption, asr and tts commands through the real `mio` entry point, in a server too.

Needs llama-cpp-python (the llamacpp extra): `.ci/run` runs `python -m pytest -m llamacpp`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from engine_cases import CASES, CONSTRAINED_CASES, GREEDY_CASES, run_cases
from mio_testing import Server, one_torch_thread, run_mio  # noqa: F401  (autouse)
from parity import parity_problem

pytestmark = pytest.mark.llamacpp

QUESTIONS = ["What is in this picture?", "Tell me about the red kite.", "Hi", "mem0"]
STEPS = 16
# No beam search on llama.cpp: the cases that ask for beams are refused (test_beams_are_refused).
ONE_BEAM = [name for name, case in CASES.items() if case.get("beams", 1) == 1]


@pytest.fixture(scope="module", autouse=True)
def llama_cpp() -> Any:
    """Every test skips, saying why, where llama-cpp-python is not installed (collected all the same, so
    `pytest -m llamacpp` reports skips rather than "no tests")."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install miocli[llamacpp])")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Exports into a cache of this module's own, for the in-process engine and the `mio` processes."""
    folder = tmp_path_factory.mktemp("llamacpp-cache")
    saved = os.environ.get("MIO_CACHE")
    os.environ["MIO_CACHE"] = str(folder)
    yield folder
    if saved is None:
        del os.environ["MIO_CACHE"]
    else:
        os.environ["MIO_CACHE"] = saved


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> list[list[int]]:
    from miocli.core.pipeline import Engine
    from miocli.core.prompts import Prompt, task_prompt_text
    from miocli.core.tasks import TASKS
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    engine = Engine(Runtime(RuntimeOptions(model=str(tiny_model), device="cpu", dtype="float32")))
    return engine.encode([Prompt(task_prompt_text(TASKS["chat"], "instruct", {"question": q}, 0), [])
                          for q in QUESTIONS])


@pytest.fixture(scope="module")
def reference(tiny_model: Path, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """transformers' float32 greedy answers (STEPS tokens, no stop) and each token's log-probability."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            out = llm.generate(torch.tensor([prompt]), do_sample=False, num_beams=1, max_new_tokens=STEPS,
                               min_new_tokens=STEPS, output_scores=True, return_dict_in_generate=True,
                               pad_token_id=0)
            ids = out.sequences[0, len(prompt):].tolist()
            logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, ids)]
            answers.append((ids, logprobs))
    return answers


def _on_llama_cpp(path: Path, prompts: list[list[int]], reference: list[list[int]]) -> list[dict[str, Any]]:
    """llama.cpp's own greedy answers, and its log-probabilities teacher-forced along the reference."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    results = []
    for prompt, forced in zip(prompts, reference):
        llm.reset()
        llm.eval(prompt)
        answer = []
        for _ in range(STEPS):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            answer.append(token)
            llm.eval([token])
        llm.reset()
        llm.eval(prompt + forced)
        rows = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) - 1 + STEPS], dtype=np.float64)
        logprobs = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
        seen = [{int(row.argmax()): float(row.max()), token: float(row[token])} for row, token in zip(logprobs, forced)]
        results.append({"ids": answer, "forced": seen})
    llm.close()
    return results


# Ties about 12x the largest log-probability gap measured against transformers (32 steps x 8 prompts):
# 7.9e-5 for f32, 3.5e-4 for f16 (and 9.8e-3 for q8_0, 0.10 for q4_0).
@pytest.mark.parametrize(("kind", "tie"), [("f32", 1e-3), ("f16", 5e-3)])
def test_the_export_gives_transformers_greedy_tokens(kind: str, tie: float, tiny_model: Path, tmp_path: Path,
                                                     prompts: list[list[int]], reference: list) -> None:
    from miocli.model.gguf_export import export_gguf

    path = export_gguf(tiny_model, tmp_path / f"tiny-{kind}.gguf", kind)
    found = _on_llama_cpp(path, prompts, [ids for ids, _ in reference])
    for (ids, logprobs), theirs in zip(reference, found):
        assert parity_problem(ids, theirs["ids"], theirs["forced"], logprobs, tie=tie) is None


def test_q8_0_export_stays_near_transformers(tiny_model: Path, tmp_path: Path, prompts: list[list[int]],
                                            reference: list) -> None:
    from miocli.model.gguf_export import export_gguf

    path = export_gguf(tiny_model, tmp_path / "tiny-q8_0.gguf", "q8_0")
    found = _on_llama_cpp(path, prompts, [ids for ids, _ in reference])
    # Loose: 8-bit weights move the logits of random weights enough to part on near-ties, not on clear choices.
    for (ids, _), theirs in zip(reference, found):
        assert theirs["ids"][:2] == ids[:2]
        assert all(abs(seen[token] - max(seen.values())) < 0.1 for seen, token in zip(theirs["forced"], ids))


@pytest.fixture(scope="module")
def on_llamacpp(tiny_model: Path, cache: Path) -> dict[str, Any]:
    return run_cases(tiny_model, "llamacpp", ONE_BEAM)


SAMPLED = ["imagine_sampled", "tts_sampled", "interleave_sampled"]


@pytest.fixture(scope="module")
def on_transformers(tiny_model: Path) -> dict[str, Any]:
    return run_cases(tiny_model, "transformers", [n for n in GREEDY_CASES if n in ONE_BEAM] + SAMPLED)


@pytest.mark.parametrize("case", SAMPLED)
def test_sampled_answers_follow_mio_s_seeds_on_both_engines(case: str, on_llamacpp: dict, on_transformers: dict):
    # The same per-prompt sampler and seeds (RowSampler) on both engines: the draws agree unless the engines'
    # last-digit differences (a few 1e-5 in log-probability, benchmarks/gguf_parity.py) straddle a draw.
    assert on_llamacpp[case]["ids"] == on_transformers[case]["ids"]


@pytest.mark.parametrize("case", [n for n in GREEDY_CASES if n in ONE_BEAM])
def test_engine_greedy_ids_are_the_transformers_engine_s(case: str, on_llamacpp: dict, on_transformers: dict):
    assert on_llamacpp[case]["ids"] == on_transformers[case]["ids"]
    assert all(on_llamacpp[case]["ids"]), "every prompt got an answer"


@pytest.mark.parametrize("case", [n for n in CONSTRAINED_CASES if n in ONE_BEAM])
def test_constrained_answers_are_decodable_on_llamacpp(case: str, on_llamacpp: dict):
    result = on_llamacpp[case]
    assert result["problems"] == [[] for _ in CASES[case]["fields"]]
    assert result["parse_problems"] == [[] for _ in CASES[case]["fields"]]


def test_media_tasks_open_their_segment_and_the_rule_is_what_keeps_them(on_llamacpp: dict, tiny_model: Path):
    from miocli import protocol
    from miocli.model.tokenizer import MioTokenizer

    tokenizer = MioTokenizer.from_dir(tiny_model)
    image_begin, speech_begin = (tokenizer.token_to_id(t) for t in (protocol.IMAGE_BEGIN, protocol.SPEECH_BEGIN))
    assert {ids[0] for ids in on_llamacpp["imagine_sampled"]["ids"]} == {image_begin}
    assert {ids[0] for ids in on_llamacpp["tts_sampled"]["ids"]} == {speech_begin}
    assert any(on_llamacpp["imagine_free"]["problems"]) and any(on_llamacpp["chat_batch_free"]["problems"])


def test_llama_cpp_reads_media_token_strings_as_mio_does(tiny_model: Path, tmp_path: Path):
    """The export on its own: llama.cpp's tokenizer splits a prompt with media tokens at the same ids."""
    import llama_cpp

    from miocli import protocol
    from miocli.model.gguf_export import export_gguf
    from miocli.model.tokenizer import MioTokenizer

    tokenizer = MioTokenizer.from_dir(tiny_model)
    llm = llama_cpp.Llama(model_path=str(export_gguf(tiny_model, tmp_path / "t.gguf", "q8_0")), vocab_only=True,
                          verbose=False)
    media = protocol.IMAGE_BEGIN + "<img5><img8191>" + protocol.IMAGE_END + protocol.SPEECH_BEGIN + "<spch17>"
    ids = llm.tokenize(media.encode(), add_bos=False, special=False)
    assert ids == [tokenizer.token_to_id(t) for t in (protocol.IMAGE_BEGIN, "<img5>", "<img8191>", protocol.IMAGE_END,
                                                       protocol.SPEECH_BEGIN, "<spch17>")]
    assert llm.token_bos() == tokenizer.token_to_id(protocol.BOS)
    llm.close()


def test_streams_and_cancels(tiny_model: Path, cache: Path):
    from engine_cases import run_watched
    from miocli.core.pipeline import Engine
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    engine = Engine(Runtime(RuntimeOptions(model=str(tiny_model), device="cpu", dtype="float32",
                                           engine="llamacpp")))
    watched = run_watched(engine)
    assert watched["streamed"][0] == watched["ids"][0] == watched["whole"][0]
    assert watched["streamed"][2] == watched["ids"][2] == watched["whole"][2]
    assert 3 <= len(watched["ids"][1]) <= 4 and watched["ids"][1] == watched["whole"][1][: len(watched["ids"][1])]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "noise.png")
    t = np.arange(16000) / 16000
    soundfile.write(folder / "tone.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype("float32"), 16000)
    return folder


def _both(*args: str) -> tuple[Any, Any]:
    env = {"MIO_CACHE": os.environ["MIO_CACHE"]}
    return (run_mio(*args, "--engine", "llamacpp", env=env), run_mio(*args, env=env))


def test_cli_caption_and_asr_match_the_transformers_engine(tiny_model: Path, media: Path, cache: Path):
    for task, source in (("caption", media / "noise.png"), ("asr", media / "tone.wav")):
        on_llamacpp, on_transformers = _both(task, str(source), "--model", str(tiny_model), "--beams", "1",
                                             "--max-new-tokens", "12", "--json")
        assert on_llamacpp.returncode == 0, on_llamacpp.stderr
        assert json.loads(on_llamacpp.stdout)["text"] == json.loads(on_transformers.stdout)["text"]


def test_cli_tts_writes_speech(tiny_model: Path, tmp_path: Path, cache: Path):
    done = run_mio("tts", "Hello there", "--model", str(tiny_model), "--engine", "llamacpp", "--seed", "0",
                   "--max-new-tokens", "40", "-o", str(tmp_path), "--json", env={"MIO_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    wavs = [tmp_path / f for f in record["files"] if f.endswith(".wav")]
    assert wavs and soundfile.info(str(wavs[0])).samplerate == 16000 and soundfile.info(str(wavs[0])).frames > 0


def test_beams_are_refused_and_a_preset_s_beams_get_a_note(tiny_model: Path, media: Path, cache: Path):
    env = {"MIO_CACHE": str(cache)}
    refused = run_mio("caption", str(media / "noise.png"), "--model", str(tiny_model), "--engine", "llamacpp",
                      "--beams", "3", env=env)
    assert refused.returncode == 2 and "no beam search" in refused.stderr and "--beams 1" in refused.stderr
    noted = run_mio("caption", str(media / "noise.png"), "--model", str(tiny_model), "--engine", "llamacpp",
                    "--max-new-tokens", "4", env=env)
    assert noted.returncode == 0, noted.stderr
    assert noted.stderr.count("llama.cpp has no beam search") == 1


def test_doctor_reports_llama_cpp_usable(tiny_model: Path):
    done = run_mio("doctor", "--model", str(tiny_model), "--device", "cpu", "--json")
    assert json.loads(done.stdout)["engines"]["llamacpp"]["usable"] is True


def test_serve_with_llamacpp_answers_as_in_process(tiny_model: Path, media: Path, cache: Path):
    env = {"MIO_CACHE": str(cache)}
    args = ("caption", str(media / "noise.png"), "--beams", "1", "--max-new-tokens", "8", "--json")
    server = Server(tiny_model, "--engine", "llamacpp", env=env)
    try:
        remote = run_mio(*args, "--server", server.url, env=env)
    finally:
        log = server.stop()
    local = run_mio(*args, "--model", str(tiny_model), "--engine", "llamacpp", env=env)
    assert remote.returncode == 0, (remote.stderr, log)
    assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]
