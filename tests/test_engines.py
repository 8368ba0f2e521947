"""The engine seam without vLLM: the pure rule, the preset mapping, option checks and clear failures.

The vLLM engines themselves are tested for real in test_vllm_engine.py and test_vllm_server.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mio_testing import free_port, run_mio
from miocli import protocol
from miocli.core.generation import PRESETS
from miocli.core.pipeline import Engine
from miocli.engines.base import GenerationSettings, finish, vllm_request_settings, vllm_settings
from miocli.engines.rules import MediaVocabulary, Rule, check_decodable
from miocli.errors import UsageError
from miocli.model.devices import RuntimeOptions
from miocli.model.runtime import Runtime


def test_rule_travels_as_compact_json_and_back(vocab: MediaVocabulary):
    rule = vocab.rule(100, force_first=vocab.image_begin, allow_speech=False, max_content_tokens=7)
    text = rule.to_json()
    assert len(text) < 1000  # id runs, not 12k ids: it rides in every vLLM request
    assert Rule.from_json(text) == rule


@pytest.mark.parametrize("bad", ["not json", "{}", '{"format": 1}', '{"format": 99}', "[1, 2]"])
def test_a_bad_rule_is_a_value_error(bad: str):
    # vLLM turns a ValueError from validate_params into HTTP 400: how a client finds out the processor is there.
    with pytest.raises(ValueError):
        Rule.from_json(bad)


def test_check_decodable_replays_the_rule(vocab: MediaVocabulary):
    rule = vocab.rule(40, force_first=vocab.image_begin, allow_speech=False)
    image = [vocab.image_begin, *vocab.image_ids[:32], vocab.image_end]
    assert check_decodable(rule, image) == []
    assert check_decodable(rule, image[:20], stopped=True) == ["the answer ends inside a image segment"]
    assert check_decodable(rule, [vocab.image_begin, *vocab.image_ids[:31], vocab.image_end])
    assert check_decodable(rule, [5])  # the forced opening


def test_rule_and_transformers_adapter_allow_the_same(vocab: MediaVocabulary):
    import torch

    from miocli.engines.transformers_processors import SegmentConstraint

    rule = vocab.rule(60, allow_images=True, allow_speech=True)
    constraint = SegmentConstraint(vocab, 0, 60)
    width = vocab.vocab_size
    state = rule.initial()
    for n, token in enumerate([7, vocab.speech_begin, vocab.speech_part_ids[0][3], vocab.speech_part_ids[1][4]]):
        mask = constraint.allowed(state, n, torch.device("cpu"), width)
        assert mask.tolist() == rule.allowed(state, n).mask(width)
        state = rule.advance(state, token)


# ---- presets on vLLM --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_maps_to_something_vllm_runs_decodably(name: str):
    preset = PRESETS[name]
    settings, note = vllm_settings(preset, constrain=True)
    assert settings.num_beams == 1, "with the rule on, vLLM never runs beam search (it cannot take the rule)"
    assert (note is None) == (preset.num_beams == 1)
    # Everything but the beams is kept.
    assert (settings.do_sample, settings.repetition_penalty, settings.top_p, settings.max_new_tokens) == \
           (preset.do_sample, preset.repetition_penalty, preset.top_p, preset.max_new_tokens)


def test_image_preset_note_names_what_vllm_lacks():
    _, note = vllm_settings(PRESETS["image"], constrain=True)
    assert "repetition penalty (1.15)" in note and "decodable-output rule" in note and "1 beam instead of 5" in note
    # The default 5 beams on transformers against greedy on vLLM is why their answers differ (issue 25).
    assert "with --beams 1 both engines give the same greedy answer" in note


def test_plain_beam_search_runs_as_beam_search_without_the_rule():
    settings, note = vllm_settings(PRESETS["text"], constrain=False)
    assert settings.num_beams == 5 and note is None
    settings, note = vllm_settings(GenerationSettings(beam_scoring="reference"), constrain=False)
    assert settings.beam_scoring == "answer" and "reference" in note


def test_vllm_knobs_are_all_given():
    greedy = vllm_request_settings(PRESETS["image"])
    assert greedy == {"repetition_penalty": 1.15, "top_k": 0, "temperature": 0.0, "top_p": 1.0}
    sampled = vllm_request_settings(PRESETS["tts"])
    assert sampled["temperature"] == 1.0 and sampled["top_p"] == 0.7


def test_finish_cuts_like_the_transformers_engine():
    assert finish([5, 6, 9, 7], stop_id=9, pad_id=0) == [5, 6]
    assert finish([5, 6, 0, 0], stop_id=9, pad_id=0) == [5, 6]


# ---- option checks and failures -----------------------------------------------------------------------
@pytest.mark.parametrize(("options", "words"), [
    (RuntimeOptions(engine="tensorrt"), "unknown engine"),
    (RuntimeOptions(engine_url="127.0.0.1:8000"), "not an http"),
])
def test_bad_engine_options_are_usage_errors(options: RuntimeOptions, words: str):
    with pytest.raises(UsageError, match=words):
        Engine(Runtime(options))


def test_cli_unknown_engine_exits_2(tiny_model: Path):
    run = run_mio("chat", "--model", str(tiny_model), "--engine", "tensorrt", "hi")
    assert run.returncode == 2 and "unknown engine" in run.stderr


def test_engine_with_server_is_a_usage_error(tiny_model: Path):
    run = run_mio("chat", "--model", str(tiny_model), "--engine", "vllm", "--server", "http://127.0.0.1:9", "hi")
    assert run.returncode == 2 and "--server" in run.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment")
def test_missing_vllm_exits_3_before_loading_anything(tiny_model: Path):
    run = run_mio("caption", "--model", str(tiny_model), "--engine", "vllm", str(Path(__file__)))
    assert run.returncode == 3
    assert "vLLM is not installed" in run.stderr and "--engine-url" in run.stderr


def test_unreachable_engine_url_exits_3(tiny_model: Path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = run_mio("chat", "--model", str(tiny_model), "--max-new-tokens", "4", "hi", env={"MIO_ENGINE_URL": url})
    assert run.returncode == 3
    assert f"cannot reach the vLLM server at {url}" in run.stderr and "vllm.entrypoints" in run.stderr


def test_engine_url_is_not_a_mio_serve(tiny_model: Path):
    # Something that answers but is not vLLM: a plain static HTTP server on loopback.
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        run = run_mio("chat", "--model", str(tiny_model), "--engine-url", url, "--max-new-tokens", "4", "hi")
    finally:
        httpd.shutdown()
    assert run.returncode == 3 and "not a `vllm serve`" in run.stderr


def test_default_engine_is_transformers_and_loads_no_engine_module(tiny_model: Path):
    engine = Engine(Runtime(RuntimeOptions(model=str(tiny_model), device="cpu")))
    assert engine.generator().name == "transformers"
    assert protocol.IMAGE_BEGIN  # the golden tests pin the transformers outputs byte for byte


def test_doctor_reports_the_engines(tiny_model: Path):
    from miocli.cli import doctor

    report = doctor.collect(str(tiny_model), None, "cpu")["engines"]
    assert report["transformers"]["usable"] is True
    assert report["vllm"]["usable"] == (importlib.util.find_spec("vllm") is not None)
    assert set(report["vllm_cpu_venv"]) >= {"path", "usable", "problem"}


def test_doctor_says_when_the_engine_url_is_unreachable(tiny_model: Path):
    import json

    url = f"http://127.0.0.1:{free_port()}"
    run = run_mio("doctor", "--model", str(tiny_model), "--device", "cpu", "--json", env={"MIO_ENGINE_URL": url})
    entry = json.loads(run.stdout)["engines"]["engine_url"]
    assert entry["usable"] is False and "cannot reach" in entry["problem"]
