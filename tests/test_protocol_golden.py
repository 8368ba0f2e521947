"""Parity with the reference prompt builder and output parser (golden/chat, golden/detok)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from miocli import protocol
from miocli.model.tokenizer import MioTokenizer

GOLDEN = Path(__file__).parent / "golden"
CHAT = json.loads((GOLDEN / "chat" / "chat_cases.json").read_text())
DETOK = json.loads((GOLDEN / "detok" / "detok_cases.json").read_text())
FUZZ = json.loads((GOLDEN / "tokenizer_fuzz.json").read_text())
EXCEPTIONS = {"ValueError": ValueError, "AssertionError": AssertionError, "TypeError": TypeError,
              "IndexError": IndexError}


@pytest.fixture(scope="module")
def tokenizer() -> MioTokenizer:
    return MioTokenizer.from_dir(GOLDEN / "chat" / "tokenizer")


def _image_strings(paths):
    return [CHAT["image_strings"][p] for p in paths]


def _speech_strings(paths, add_timbre):
    return [CHAT["speech_strings"][f"{p}|add_timbre={add_timbre}"] for p in paths]


def _run_chat_case(case, tokenizer):
    kwargs = dict(case["kwargs"])
    add_timbre = kwargs.pop("add_timbre", False)
    images = kwargs.pop("batch_image_paths", None)
    speeches = kwargs.pop("batch_speech_paths", None)
    add_bos = kwargs.pop("add_bos", True)
    batch_images = [_image_strings(p) for p in images] if images is not None else None
    batch_speeches = [_speech_strings(p, add_timbre) for p in speeches] if speeches is not None else None
    encode_options = {k: kwargs.pop(k) for k in ("padding", "truncation", "max_length") if k in kwargs}
    kwargs.pop("return_tensors", None)
    if case["function"] == "apply_chat_template":
        tokenize = kwargs.pop("tokenize", True)
        texts = protocol.apply_chat_template(
            case["args"][0], kwargs.pop("mode", "std"),
            add_generation_prompt=kwargs.pop("add_generation_prompt", True), add_bos=add_bos,
        )
        assert not kwargs, kwargs
        if not tokenize:
            return texts
    else:
        texts = case["args"][0]
    return protocol.encode_prompts(
        tokenizer, texts, batch_image_strings=batch_images, batch_speech_strings=batch_speeches,
        add_bos=add_bos, **encode_options,
    )


@pytest.mark.parametrize("case", CHAT["cases"], ids=[c["name"] for c in CHAT["cases"]])
def test_chat_case(case, tokenizer):
    if "exception" in case:
        with pytest.raises(EXCEPTIONS[case["exception"]["type"]]) as info:
            _run_chat_case(case, tokenizer)
        assert str(info.value) == case["exception"]["message"]
        return
    result = _run_chat_case(case, tokenizer)
    expected = case["output"]
    if isinstance(expected, dict):
        for key in ("input_ids", "attention_mask"):
            want = expected[key]["values"] if isinstance(expected[key], dict) else expected[key]
            assert result[key] == want, key
    else:
        assert result == expected


def test_constants_match_reference():
    constants = CHAT["constants"]
    assert constants["MIO_STD_MODE_SYSTEM"] == protocol.STD_SYSTEM
    assert constants["MIO_VOICE_MODE_SYSTEM"] == protocol.VOICE_SYSTEM
    assert constants["MIO_CHAT_TEMPLATE"]["assistant_starter"] == protocol.ASSISTANT_STARTER


def test_tokenizer_fuzz_against_reference(tokenizer):
    for case in FUZZ["encode"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
    for case in FUZZ["decode"]:
        assert tokenizer.decode(case["ids"]) == case["text"], case["ids"]


def test_every_multimodal_token_is_one_id(tokenizer):
    for token in ["<img0>", "<img8191>", "<spch0>", "<spch4095>", "<image>", "</image>", "<spch>", "</spch>"]:
        assert len(tokenizer.encode(token)) == 1
    assert tokenizer.token_to_id("<|im_start|>") == 6
    assert tokenizer.token_to_id("<|im_end|>") == 7


def _case_texts(case, tokenizer):
    rows = case["input"]
    return tokenizer.batch_decode(rows) if case["input_kind"] == "token_ids" else list(rows)


def _reference_detokenize(case, tokenizer, image_tokens=None):
    """Our parser, arranged like the reference's detokenize (paths named its way).

    `image_tokens=None` takes image segments of any length, as the reference does; the default
    parse reports those without 32 ids instead (test_image_segments_without_32_ids_are_reported).
    """
    kwargs = case["kwargs"]
    texts = _case_texts(case, tokenizer)
    save_images = kwargs.get("save_images", True)
    save_speeches = kwargs.get("save_speeches", True)
    result = {"texts": [], "image_paths": [], "speech_paths": []}
    decoder_inputs = {"image": [], "speech": []}
    problems = []
    for row, text in enumerate(texts):
        parsed = protocol.parse_output(
            text, extract=kwargs.get("extract_assistant", True),
            take_images=save_images, take_speeches=save_speeches, image_tokens=image_tokens,
        )
        result["texts"].append(parsed.text)
        result["image_paths"].append(
            [f"{kwargs['output_image_dir']}/detokenized_image_{row}_{i}.jpg" for i in range(len(parsed.images))]
        )
        result["speech_paths"].append(
            [f"{kwargs['output_speech_dir']}/detokenized_speech_{row}_{i}.wav" for i in range(len(parsed.speeches))]
        )
        decoder_inputs["image"] += [[[seg.ids]] for seg in parsed.images]
        decoder_inputs["speech"] += [
            [[len(seg.codes), 1, len(seg.codes[0])], [[layer] for layer in seg.codes]] for seg in parsed.speeches
        ]
        problems += parsed.problems
    return texts, result, decoder_inputs, problems


@pytest.mark.parametrize("case", DETOK["cases"], ids=[c["name"] for c in DETOK["cases"]])
def test_detokenize_case(case, tokenizer):
    texts, result, decoder_inputs, problems = _reference_detokenize(case, tokenizer)
    trace = {e["event"]: [] for e in case["trace"]}
    for event in case["trace"]:
        trace[event["event"]].append(event["data"])
    if "batch_decode_output" in trace:
        assert texts == trace["batch_decode_output"][0][0]
    if "exception" not in case:
        assert result == case["result"]
        assert decoder_inputs["image"] == trace.get("image_decoder_input_ids", [])
        assert decoder_inputs["speech"] == trace.get("speech_decoder_input_codes", [])
        assert problems == []
        return
    # The one deliberate difference: the reference raises on a malformed speech segment and
    # loses the whole output; we keep the rest and report the segment with the same reason.
    message = case["exception"]["message"]
    if case["name"] == "raw_mixed_spacing_speech":
        # Complete segment whose spacing tripped the reference's split-based reader: we decode it.
        assert problems == []
        assert decoder_inputs["speech"] == [[[4, 1, 1], [[[1]], [[1]], [[1]], [[1]]]]]
        return
    assert [p.reason for p in problems] == [message]
    assert result["speech_paths"] == [[]]
    assert problems[0].raw in result["texts"][0]


@pytest.mark.parametrize("case", [c for c in DETOK["cases"] if "exception" not in c],
                         ids=[c["name"] for c in DETOK["cases"] if "exception" not in c])
def test_image_segments_without_32_ids_are_reported(case, tokenizer):
    # The deliberate difference on images: the reference hands segments of any length to the
    # image decoder, which cannot take them; we decode the 32-id ones exactly as it does and
    # report the others by their count, leaving them in the text.
    reference = [event["data"][0][0] for event in case["trace"] if event["event"] == "image_decoder_input_ids"]
    texts, result, decoder_inputs, problems = _reference_detokenize(
        case, tokenizer, image_tokens=protocol.IMAGE_TOKENS_PER_IMAGE
    )
    assert [entry[0][0] for entry in decoder_inputs["image"]] == [ids for ids in reference if len(ids) == 32]
    assert [(p.kind, p.reason) for p in problems] == [
        ("image", f"an image needs exactly 32 image tokens, found {len(ids)}") for ids in reference if len(ids) != 32
    ]
    for problem in problems:
        assert any(problem.raw in text for text in result["texts"])
    # Speech is untouched by the image check.
    assert decoder_inputs["speech"] == [
        event["data"] for event in case["trace"] if event["event"] == "speech_decoder_input_codes"
    ]


def test_golden_cases_include_short_image_segments():
    # Otherwise the test above would check nothing about them.
    lengths = {len(event["data"][0][0]) for case in DETOK["cases"] for event in case["trace"]
               if event["event"] == "image_decoder_input_ids"}
    assert 32 in lengths and lengths - {32}


def test_image_segment_without_32_ids_keeps_the_rest():
    good = protocol.image_ids_to_string(range(32))
    short = "<image><img1><img2></image>"
    long = protocol.image_ids_to_string(range(33))
    speech = "<spch><spch1><spch1025><spch2049><spch3073></spch>"
    text = f"A {short} B {good} C {long} D {speech}"
    parsed = protocol.parse_output(text, extract=False)
    assert [seg.ids for seg in parsed.images] == [list(range(32))]
    assert [seg.codes for seg in parsed.speeches] == [[[1], [1], [1], [1]]]
    assert [(p.kind, p.reason, p.raw) for p in parsed.problems] == [
        ("image", "an image needs exactly 32 image tokens, found 2", short),
        ("image", "an image needs exactly 32 image tokens, found 33", long),
    ]
    assert parsed.text == f"A {short} B <image_placeholder_0> C {long} D <speech_placeholder_0>"
    # The reference's reading, on request: every segment taken, whatever its length.
    loose = protocol.parse_output(text, extract=False, image_tokens=None)
    assert [len(seg.ids) for seg in loose.images] == [2, 32, 33] and loose.problems == []


def test_malformed_speech_keeps_the_rest():
    image = protocol.image_ids_to_string([7] * 32)
    text = (f"Look {image} and <spch><spch5><spch1029></spch> then "
            "<spch><spch1><spch1025><spch2049><spch3073></spch>")
    parsed = protocol.parse_output(text, extract=False)
    assert [seg.ids for seg in parsed.images] == [[7] * 32]
    assert [seg.codes for seg in parsed.speeches] == [[[1], [1], [1], [1]]]
    assert len(parsed.problems) == 1 and "four parts" in parsed.problems[0].reason
    assert parsed.text.startswith("Look <image_placeholder_0> and <spch><spch5>")
    assert parsed.text.endswith("then <speech_placeholder_0>")


@pytest.mark.parametrize("case", DETOK["check_speech_completeness"],
                         ids=[c["name"] for c in DETOK["check_speech_completeness"]])
def test_check_speech_completeness(case):
    if "exception" in case:
        with pytest.raises(ValueError) as info:
            protocol.check_speech_completeness(case["input"])
        assert str(info.value) == case["exception"]["message"]
    else:
        assert protocol.check_speech_completeness(case["input"]) is case["returned"]


def test_token_strings_match_golden_speech_and_seed():
    import numpy as np

    codes = np.load(GOLDEN / "speech" / "expected_codes.npy")[:, 0, :].tolist()
    expected = json.loads((GOLDEN / "speech" / "expected_tokens.json").read_text())
    for key, value in expected.items():
        flags = dict(part.split("=") for part in key.split(","))
        got = protocol.speech_codes_to_string(
            codes, with_timbre=flags["add_timbre"] == "True", add_begin_end=flags["add_begin_end"] == "True"
        )
        assert got == value, key
    four = protocol.speech_codes_from_string(expected["add_timbre=True,add_begin_end=True"])
    assert four == codes[:4]
    seed = json.loads((GOLDEN / "seed" / "expected.json").read_text())
    for name, entry in seed.items():
        if name == "fixed_id_list":
            continue
        assert protocol.image_ids_to_string(entry["token_ids"]) == entry["tokenize_images_string"]
        assert protocol.image_ids_to_string(entry["token_ids"], add_begin_end=False) == (
            entry["tokenize_images_string_add_begin_end_false"]
        )
        assert protocol.image_ids_from_string(entry["tokenize_images_string"]) == entry["token_ids"]


# ---- user text (PromptText) ---------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"(<(?:image|speech)_placeholder_\d+>)")


def _as_user_text(content):
    """Content as our prompt builders make it: placeholders from the template, the rest typed by the user."""
    return protocol.PromptText((part, not _PLACEHOLDER.fullmatch(part)) for part in _PLACEHOLDER.split(content) if part)


@pytest.mark.parametrize("case", [c for c in CHAT["cases"] if c["function"] == "apply_chat_template"
                                  and c["kwargs"].get("tokenize", True) and "exception" not in c],
                         ids=lambda c: c["name"])
def test_user_text_marks_keep_the_reference_ids(case, tokenizer):
    # Marking the typed text as user text changes nothing for text that holds no token string.
    marked = dict(case, args=[[[dict(turn, content=_as_user_text(turn["content"])) for turn in conversation]
                               for conversation in case["args"][0]]])
    result = _run_chat_case(marked, tokenizer)
    for key in ("input_ids", "attention_mask"):
        want = case["output"][key]["values"] if isinstance(case["output"][key], dict) else case["output"][key]
        assert result[key] == want, key


def test_fuzz_texts_as_user_text(tokenizer):
    specials = {tokenizer.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>", "<unk>", "<|im_start|>",
                                                   "<|im_end|>", "<|im_sep|>", "<|Human|>")}
    unchanged = 0
    for case in FUZZ["encode"]:
        text = case["text"]
        ids = tokenizer.encode(text, plain=[(0, len(text))])
        assert tokenizer.sp.DecodeIds(ids) == text, text
        assert all(i < tokenizer.sp_size and i not in specials for i in ids), text
        if "<" not in text:
            assert ids == case["ids"], text
            unchanged += 1
    assert unchanged  # the fuzz set holds texts without token strings too
