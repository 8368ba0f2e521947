"""Transcript formats (output/transcripts.py) and segments across the wire (--server, --ray)."""

from __future__ import annotations

import json

import pytest

from miocli.core.results import Result, Segment
from miocli.output.transcripts import render
from miocli.serve import wire


def _result() -> Result:
    return Result(task="asr", input="talk.wav", text="first part --> here\n\nsecond line second part",
                  segments=[Segment(0.0, 61.25, "first part --> here\n\nsecond line"),
                            Segment(61.25, 3723.002, "second part")], chunks=2)


def test_srt_numbers_its_cues_with_comma_millis_and_keeps_cue_text_on_its_own_lines():
    srt = render(_result(), "srt")
    assert srt == ("1\n00:00:00,000 --> 00:01:01,250\nfirst part -> here\nsecond line\n\n"
                   "2\n00:01:01,250 --> 01:02:03,002\nsecond part")


def test_vtt_has_its_header_and_dot_millis():
    assert render(_result(), "vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:01:01.250\nfirst part -> here")


def test_json_is_whisper_shaped_and_txt_is_the_text():
    document = json.loads(render(_result(), "json"))
    assert document["text"] == _result().text
    assert document["segments"][1] == {"id": 1, "start": 61.25, "end": 3723.002, "text": "second part"}
    assert render(_result(), "txt") == _result().text


def test_a_result_without_segments_is_one_untimed_cue():
    assert render(Result(task="asr", input="x", text=" hi "), "srt") == "1\n00:00:00,000 --> 00:00:00,000\nhi"


def test_segments_survive_the_wire():
    back = wire.result_from_json(json.loads(json.dumps(wire.result_to_json(_result()))))
    expected = [(0.0, 61.25, "first part --> here\n\nsecond line"), (61.25, pytest.approx(3723.002, abs=1e-3),
                                                                         "second part")]
    assert [(s.start, s.end, s.text) for s in back.segments] == expected
