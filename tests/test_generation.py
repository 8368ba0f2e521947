"""Generation presets (MIO_PROTOCOL §8), overrides, and the constraint that keeps media segments decodable.

The constraint is first driven without any model: random logits stand in for the LLM, and a
greedy loop feeds the processor exactly what `generate` would (prompt + tokens so far, rows
reordered between steps as beam search does). Whatever the logits, every image must come out
with 32 ids and every speech segment complete. Then the real tiny LLM runs once each way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mio_testing import one_torch_thread, run_mio  # noqa: F401  (one_torch_thread: autouse)
from miocli import protocol
from miocli.core.api import GenerationOptions, Mio
from miocli.core.generation import PRESETS, GenerationOverrides, cpu_settings, minimum_new_tokens
from miocli.core.pipeline import Engine
from miocli.core.prompts import Prompt, task_prompt_text
from miocli.core.tasks import TASKS
from miocli.engines.base import GenerationSettings
from miocli.engines.rules import MediaVocabulary
from miocli.engines.transformers_engine import hf_generate_kwargs
from miocli.engines.transformers_processors import SegmentConstraint
from miocli.errors import UsageError
from miocli.model.devices import RuntimeOptions
from miocli.model.runtime import Runtime
from miocli.model.tokenizer import MioTokenizer

# ---- presets -----------------------------------------------------------------------------------
# MIO_PROTOCOL §8, row by row: (preset, beams, sample, repetition penalty, top_p).
SPEC_TABLE = [
    ("text", 5, False, 1.0, None),
    ("image", 5, False, 1.15, 0.7),
    ("tts", 1, True, 1.15, 0.7),
    ("spoken", 5, False, 2.0, 0.7),
    ("s2s", 5, False, 1.15, 0.7),
    ("video_gen", 1, True, 1.15, 0.7),
    ("interleave", 1, True, 1.15, 0.7),
]


@pytest.mark.parametrize(("name", "beams", "sample", "penalty", "top_p"), SPEC_TABLE)
def test_preset_matches_protocol_table(name: str, beams: int, sample: bool, penalty: float, top_p: float | None):
    preset = PRESETS[name]
    assert preset.num_beams == beams
    assert preset.do_sample is sample
    assert preset.repetition_penalty == pytest.approx(penalty)
    assert preset.top_p == (pytest.approx(top_p) if top_p is not None else None)
    assert preset.temperature == 1.0
    assert preset.length_penalty == 1.0


def test_every_preset_is_in_the_table():
    assert set(PRESETS) == {row[0] for row in SPEC_TABLE}


def test_text_presets_use_512_new_tokens_and_speech_presets_more():
    assert PRESETS["text"].max_new_tokens == 512
    assert PRESETS["image"].max_new_tokens == 512
    # 200 tokens per second of audio with the four layers: 512 would cut speech after 2.5 s.
    for name in ("tts", "spoken", "s2s"):
        assert PRESETS[name].max_new_tokens >= 4 * 512


@pytest.mark.parametrize(
    ("task", "preset"),
    [("chat", "text"), ("caption", "text"), ("asr", "text"), ("ask-video", "text"), ("imagine", "image"),
     ("edit", "image"), ("tts", "tts"), ("speak", "spoken"), ("speech2speech", "s2s"),
     ("video-gen", "video_gen"), ("interleave", "interleave")],
)
def test_tasks_use_the_preset_of_their_row(task: str, preset: str):
    assert TASKS[task].preset == preset


def test_hf_kwargs_greedy_beam_search_has_no_sampling_knobs():
    kwargs = hf_generate_kwargs(PRESETS["image"])
    assert kwargs == {"num_beams": 5, "do_sample": False, "repetition_penalty": 1.15, "max_new_tokens": 512,
                      "length_penalty": 1.0}


def test_hf_kwargs_sampling_turns_top_k_off_and_passes_top_p():
    kwargs = hf_generate_kwargs(PRESETS["tts"])
    assert kwargs["do_sample"] is True
    assert kwargs["top_k"] == 0  # transformers' default top_k=50 would silently narrow MIO's sampling
    assert kwargs["top_p"] == pytest.approx(0.7)
    assert kwargs["temperature"] == 1.0


def test_a_7b_model_on_the_cpu_runs_the_presets_beams_as_one_unless_asked():
    preset = PRESETS["text"]
    seven_b = 6_160_000_000
    one, note = cpu_settings(preset, None, seven_b)
    assert one.num_beams == 1 and one.do_sample is False and one.repetition_penalty == preset.repetition_penalty
    assert note is not None and "--beams 5" in note
    # asked for, the beams stay; the tiny checkpoint (or a size config.json does not give) keeps the preset
    assert cpu_settings(preset, 5, seven_b) == (preset, None)
    assert cpu_settings(preset, None, 400_000) == (preset, None)
    assert cpu_settings(preset, None, None) == (preset, None)
    assert cpu_settings(PRESETS["tts"], None, seven_b) == (PRESETS["tts"], None)


def test_the_tiny_checkpoint_on_the_cpu_keeps_the_presets_beams(tiny_model: Path):
    engine = Engine(Runtime(RuntimeOptions(model=str(tiny_model), device="cpu")))
    parameters = engine.llm_parameters()
    assert parameters is not None and 0 < parameters < 1_000_000_000
    assert cpu_settings(engine.settings_for(TASKS["chat"], None), None, parameters)[0].num_beams == 5


def test_overrides_replace_only_what_was_given():
    settings = GenerationOverrides(num_beams=2, max_new_tokens=7).apply(PRESETS["spoken"])
    assert (settings.num_beams, settings.max_new_tokens) == (2, 7)
    assert settings.repetition_penalty == 2.0 and settings.top_p == 0.7 and settings.do_sample is False
    assert GenerationOverrides().apply(PRESETS["tts"]) == PRESETS["tts"]
    # The preset table itself is never modified.
    assert PRESETS["spoken"].num_beams == 5


def test_override_turning_sampling_on_reaches_hf_kwargs():
    settings = GenerationOverrides(do_sample=True, temperature=0.5, top_p=0.9).apply(PRESETS["text"])
    kwargs = hf_generate_kwargs(settings)
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.5 and kwargs["top_p"] == 0.9


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        (GenerationOverrides(num_beams=0), "--beams"),
        (GenerationOverrides(temperature=0.0), "--temperature"),
        (GenerationOverrides(temperature=-1.0), "--temperature"),
        (GenerationOverrides(top_p=0.0), "--top-p"),
        (GenerationOverrides(top_p=1.5), "--top-p"),
        (GenerationOverrides(repetition_penalty=0.0), "--repetition-penalty"),
        (GenerationOverrides(max_new_tokens=0), "--max-new-tokens"),
    ],
)
def test_bad_overrides_are_usage_errors_naming_the_flag(overrides: GenerationOverrides, flag: str):
    with pytest.raises(UsageError, match=re.escape(flag)):
        overrides.validate()


def test_boundary_overrides_are_accepted():
    GenerationOverrides(num_beams=1, temperature=1e-3, top_p=1.0, repetition_penalty=0.5, max_new_tokens=1).validate()


def test_api_options_map_onto_overrides():
    options = GenerationOptions(beams=3, sample=True, temperature=0.8, top_p=0.5, repetition_penalty=1.3,
                                max_new_tokens=9)
    assert options.overrides() == GenerationOverrides(num_beams=3, do_sample=True, temperature=0.8, top_p=0.5,
                                                      repetition_penalty=1.3, max_new_tokens=9)


# ---- the constraint without a model --------------------------------------------------------------
@dataclass(frozen=True)
class FakeModel:
    """Logit biases of a pretend LLM; random noise is added at every step."""

    open_bias: float = 0.0  # towards <image> and <spch> in text
    content_bias: float = 0.0  # towards another speech content token rather than timbre0
    stop_bias: float = -1.0  # towards the stop token in text


def base_logits(tokenizer: MioTokenizer, vocab: MediaVocabulary, model: FakeModel, stop_id: int) -> torch.Tensor:
    logits = torch.zeros(vocab.vocab_size)
    # Text pieces that decode to '<' or '>' could spell a marker in the decoded text and blur the
    # parse-based check; the pretend model never emits them (the constraint is not involved).
    for token_id in range(tokenizer.sp_size):
        piece = tokenizer.id_to_token(token_id)
        if "<" in piece or ">" in piece:
            logits[token_id] = float("-inf")
    logits[stop_id] = model.stop_bias
    logits[vocab.image_begin] = model.open_bias
    logits[vocab.speech_begin] = model.open_bias
    logits[vocab.speech_part_ids[0]] += model.content_bias
    return logits


def simulate(
    constraint: SegmentConstraint,
    prompt: list[int],
    rows: int,
    steps: int,
    logits: torch.Tensor,
    *,
    stop_id: int,
    pad_id: int,
    seed: int,
) -> list[list[int]]:
    """Greedy decoding as transformers drives a logits processor; returns each row's new ids up to the stop."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt] * rows, dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    for _ in range(steps):
        scores = logits + torch.randn(rows, logits.shape[0], generator=generator) * 1.5
        masked = constraint(ids.clone(), scores)
        chosen = masked.argmax(dim=-1)
        # Every row must keep at least one allowed token, or argmax would silently pick id 0.
        assert torch.isfinite(masked.gather(1, chosen[:, None])).all()
        chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
        finished |= chosen == stop_id
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        # Beam search hands the rows back in another order every step.
        order = torch.randperm(rows, generator=generator)
        ids, finished = ids[order], finished[order]
        if finished.all():
            break
    results = []
    for row in ids[:, len(prompt):].tolist():
        results.append(row[: row.index(stop_id)] if stop_id in row else row)
    return results


MEDIA_LEFT_IN_TEXT = re.compile(r"<img\d+>|<spch\d*>|</spch>|</?image>")


def check_row(
    tokenizer: MioTokenizer, vocab: MediaVocabulary, ids: list[int], *, start_in_image: bool = False,
    max_content: int | None = None,
) -> protocol.ParsedOutput:
    """Assert that a generated row parses into whole, decodable segments and nothing stray."""
    text = tokenizer.decode(ids)
    if start_in_image:
        text = protocol.IMAGE_BEGIN + text  # what the pipeline does with a pre-filled <image>
    parsed = protocol.parse_output(text, extract=False)
    opened_images = ids.count(vocab.image_begin) + int(start_in_image)
    assert len(parsed.images) == opened_images, text
    for image in parsed.images:
        assert len(image.ids) == protocol.IMAGE_TOKENS_PER_IMAGE, image.raw
        assert all(0 <= i < protocol.IMAGE_CODEBOOK_SIZE for i in image.ids)
    assert parsed.problems == [], parsed.problems
    assert len(parsed.speeches) == ids.count(vocab.speech_begin), text
    for speech in parsed.speeches:
        assert protocol.check_speech_completeness(speech.raw)
        frames = len(speech.codes[0])
        assert frames >= 1
        if max_content is not None:
            assert frames <= max_content
    assert not MEDIA_LEFT_IN_TEXT.search(parsed.text), parsed.text
    return parsed


@pytest.fixture(scope="module")
def prompt(tokenizer: MioTokenizer) -> list[int]:
    text = protocol.apply_chat_template([[{"role": "user", "content": "Please generate an image."}]])[0]
    return tokenizer.encode(text)


@pytest.fixture(scope="module")
def stop_id(tokenizer: MioTokenizer) -> int:
    return tokenizer.token_to_id(protocol.IM_END)


def test_vocabulary_ids_are_looked_up_and_distinct(vocab: MediaVocabulary, tokenizer: MioTokenizer):
    assert len(vocab.image_ids) == protocol.IMAGE_CODEBOOK_SIZE
    assert [len(part) for part in vocab.speech_part_ids] == [protocol.SPEECH_CODEBOOK_SIZE] * 4
    markers = {vocab.image_begin, vocab.image_end, vocab.speech_begin, vocab.speech_end}
    assert len(markers) == 4
    everything = set(vocab.image_ids) | set(vocab.speech_part_of) | markers
    assert len(everything) == 8192 + 4096 + 4
    assert tokenizer.id_to_token(vocab.speech_part_ids[3][5]) == "<spch3077>"
    assert max(everything) < vocab.vocab_size


@pytest.mark.parametrize(
    ("force", "start_in_image", "budget", "model", "seed"),
    [
        ("image", False, 34, FakeModel(), 1),  # exactly room for one image
        ("image", False, 120, FakeModel(open_bias=3.0), 2),
        ("speech", False, 6, FakeModel(), 3),  # the shortest speech: one frame in four parts
        ("speech", False, 90, FakeModel(content_bias=1.5), 4),
        ("speech", False, 150, FakeModel(open_bias=3.0), 5),
        (None, True, 33, FakeModel(), 6),  # pre-filled <image>: 32 ids and the closer
        (None, True, 100, FakeModel(open_bias=3.0, content_bias=1.0), 7),
        (None, False, 200, FakeModel(open_bias=4.0, content_bias=0.5), 8),
        (None, False, 200, FakeModel(open_bias=4.0, content_bias=2.0, stop_bias=2.0), 9),
    ],
)
def test_random_logits_always_give_decodable_segments(
    tokenizer: MioTokenizer, vocab: MediaVocabulary, prompt: list[int], stop_id: int,
    force: str | None, start_in_image: bool, budget: int, model: FakeModel, seed: int,
):
    force_first = {"image": vocab.image_begin, "speech": vocab.speech_begin, None: None}[force]
    constraint = SegmentConstraint(vocab, len(prompt), budget, force_first=force_first,
                                   start_in_image=start_in_image)
    logits = base_logits(tokenizer, vocab, model, stop_id)
    rows = simulate(constraint, prompt, 6, budget, logits, stop_id=stop_id, pad_id=tokenizer.pad_id, seed=seed)
    for ids in rows:
        assert len(ids) <= budget
        if force_first is not None:
            assert ids[0] == force_first
        check_row(tokenizer, vocab, ids, start_in_image=start_in_image)
    opened = sum(ids.count(vocab.image_begin) + ids.count(vocab.speech_begin) for ids in rows)
    if model.open_bias:
        # The biased runs must really have exercised several segments per row.
        assert opened >= 2 * len(rows)


@pytest.mark.parametrize("seed", range(6))
def test_budget_never_ends_inside_a_segment(
    tokenizer: MioTokenizer, vocab: MediaVocabulary, prompt: list[int], stop_id: int, seed: int
):
    # Budgets that end at every possible point of a segment; the pretend model opens a segment
    # whenever it can and keeps speech content going, so only the constraint can close in time.
    budget = 34 + 7 * seed
    model = FakeModel(open_bias=8.0, content_bias=3.0, stop_bias=float("-inf"))
    logits = base_logits(tokenizer, vocab, model, stop_id)
    constraint = SegmentConstraint(vocab, len(prompt), budget)
    rows = simulate(constraint, prompt, 4, budget, logits, stop_id=stop_id, pad_id=tokenizer.pad_id, seed=seed)
    for ids in rows:
        assert len(ids) == budget  # no stop: the budget is what ends the row
        check_row(tokenizer, vocab, ids)


def test_max_content_tokens_caps_speech_length(
    tokenizer: MioTokenizer, vocab: MediaVocabulary, prompt: list[int], stop_id: int
):
    model = FakeModel(open_bias=8.0, content_bias=5.0, stop_bias=float("-inf"))
    constraint = SegmentConstraint(vocab, len(prompt), 120, force_first=vocab.speech_begin, allow_images=False,
                                   max_content_tokens=5)
    logits = base_logits(tokenizer, vocab, model, stop_id)
    rows = simulate(constraint, prompt, 3, 120, logits, stop_id=stop_id, pad_id=tokenizer.pad_id, seed=11)
    for ids in rows:
        parsed = check_row(tokenizer, vocab, ids, max_content=5)
        assert parsed.speeches and max(len(s.codes[0]) for s in parsed.speeches) == 5


@pytest.mark.parametrize("allow", ["images", "speech"])
def test_disallowed_segment_kind_is_never_opened(
    tokenizer: MioTokenizer, vocab: MediaVocabulary, prompt: list[int], stop_id: int, allow: str
):
    constraint = SegmentConstraint(vocab, len(prompt), 150, allow_images=allow == "images",
                                   allow_speech=allow == "speech")
    logits = base_logits(tokenizer, vocab, FakeModel(open_bias=6.0), stop_id)
    rows = simulate(constraint, prompt, 4, 150, logits, stop_id=stop_id, pad_id=tokenizer.pad_id, seed=12)
    for ids in rows:
        check_row(tokenizer, vocab, ids)
        banned = vocab.speech_begin if allow == "images" else vocab.image_begin
        wanted = vocab.image_begin if allow == "images" else vocab.speech_begin
        assert banned not in ids
        assert wanted in ids


def test_constraint_handles_left_padded_batches_and_rows_of_other_lengths(
    tokenizer: MioTokenizer, vocab: MediaVocabulary, stop_id: int
):
    # prompt_length is the padded width of the batch: rows differ only before it.
    short = tokenizer.encode("Hi")
    long = tokenizer.encode("Please generate an image according to the caption.")
    width = len(long)
    padded = [[tokenizer.pad_id] * (width - len(short)) + short, long]
    constraint = SegmentConstraint(vocab, width, 40, force_first=vocab.image_begin)
    logits = base_logits(tokenizer, vocab, FakeModel(stop_bias=float("-inf")), stop_id)
    rows = simulate(constraint, padded[0], 1, 0, logits, stop_id=stop_id, pad_id=tokenizer.pad_id, seed=0)
    assert rows == [[]]
    ids = torch.tensor(padded)
    generator = torch.Generator().manual_seed(13)
    for _ in range(40):
        scores = constraint(ids.clone(), logits + torch.randn(2, vocab.vocab_size, generator=generator))
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    for row in ids[:, width:].tolist():
        assert len(check_row(tokenizer, vocab, row).images) == 1


# ---- the real tiny LLM ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine(Runtime(RuntimeOptions(model=str(tiny_model), device="cpu")))


def imagine_prompt() -> Prompt:
    return Prompt(task_prompt_text(TASKS["imagine"], "instruct", {"caption": "a red kite over a green hill"}))


def test_tiny_llm_imagine_with_constraint_gives_one_image(engine: Engine):
    [result] = engine.run(TASKS["imagine"], [imagine_prompt()], overrides=GenerationOverrides(max_new_tokens=40),
                          seed=0, constrain=True)
    vocab = MediaVocabulary(engine.runtime.tokenizer)
    assert result.token_ids[0] == vocab.image_begin
    assert len(result.token_ids) <= 40
    assert len(result.parsed.images) == 1
    assert len(result.parsed.images[0].ids) == protocol.IMAGE_TOKENS_PER_IMAGE
    assert result.parsed.problems == []


def test_tiny_llm_imagine_without_constraint_reports_instead_of_raising(engine: Engine):
    # Random weights produce stray media tokens; the run must still hand back every token and
    # a parse in which nothing undecodable passes for an image.
    [result] = engine.run(TASKS["imagine"], [imagine_prompt()], overrides=GenerationOverrides(max_new_tokens=40),
                          seed=0, constrain=False)
    assert 0 < len(result.token_ids) <= 40
    assert result.raw_text == engine.runtime.tokenizer.decode(result.token_ids)
    # Whatever it produced, only whole 32-id images are taken; anything else is a problem.
    assert all(len(i.ids) == protocol.IMAGE_TOKENS_PER_IMAGE for i in result.parsed.images)
    for problem in result.parsed.problems:
        assert problem.kind in ("image", "speech") and problem.reason
    # The stray tokens stay visible in the text rather than being dropped silently.
    assert MEDIA_LEFT_IN_TEXT.search(result.parsed.text)


# ---- --max-new-tokens too small for the one segment a media task must produce ----------------------
MEDIA_TASK_MINIMUMS = [("imagine", 34), ("video-gen", 34), ("edit", 33), ("tts", 6), ("speak", 6),
                       ("speech2speech", 6)]


@pytest.mark.parametrize(("output", "prefill", "expected"), [
    ("image", "", 34), ("image", protocol.IMAGE_BEGIN, 33), ("speech", "", 6), ("text", "", 1), ("mixed", "", 1),
])
def test_minimum_new_tokens(output: str, prefill: str, expected: int):
    assert minimum_new_tokens(output, prefill=prefill) == expected


@pytest.mark.parametrize(("kind", "start_in_image", "minimum"), [("image", False, 34), ("image", True, 33),
                                                                 ("speech", False, 6)])
def test_the_minimum_is_what_the_constraint_needs(
    tokenizer: MioTokenizer, vocab: MediaVocabulary, prompt: list[int], stop_id: int,
    kind: str, start_in_image: bool, minimum: int,
):
    # With exactly the minimum a forced segment always completes; one token less never can.
    prefill = protocol.IMAGE_BEGIN if start_in_image else ""
    assert minimum_new_tokens(kind, prefill=prefill) == minimum
    force = None if start_in_image else {"image": vocab.image_begin, "speech": vocab.speech_begin}[kind]
    logits = base_logits(tokenizer, vocab, FakeModel(stop_bias=float("-inf")), stop_id)
    for budget, whole in ((minimum, True), (minimum - 1, False)):
        constraint = SegmentConstraint(vocab, len(prompt), budget, force_first=force, start_in_image=start_in_image)
        rows = simulate(constraint, prompt, 3, budget, logits, stop_id=stop_id, pad_id=tokenizer.pad_id, seed=budget)
        for ids in rows:
            text = (prefill + tokenizer.decode(ids))
            parsed = protocol.parse_output(text, extract=False)
            found = parsed.images if kind == "image" else parsed.speeches
            assert len(found) == int(whole), text


def offline_engine() -> Engine:
    # No model folder at all: the check must come before anything is loaded.
    return Engine(Runtime(RuntimeOptions(model="/no/such/mio/model", device="cpu")))


@pytest.mark.parametrize(("task", "minimum"), MEDIA_TASK_MINIMUMS)
def test_too_few_new_tokens_for_a_media_task_is_a_usage_error(task: str, minimum: int):
    engine = offline_engine()
    with pytest.raises(UsageError, match=re.escape("--max-new-tokens")) as caught:
        engine.settings_for(TASKS[task], GenerationOverrides(max_new_tokens=minimum - 1))
    assert f"at least {minimum} new tokens" in caught.value.message
    assert f"--max-new-tokens {minimum}" in (caught.value.hint or "")
    assert engine.settings_for(TASKS[task], GenerationOverrides(max_new_tokens=minimum)).max_new_tokens == minimum
    # The presets themselves leave room.
    assert engine.settings_for(TASKS[task], None).max_new_tokens >= minimum
    assert engine.runtime.loaded() == []


@pytest.mark.parametrize("task", ["chat", "caption", "asr", "interleave"])
def test_text_and_mixed_tasks_take_any_budget(task: str):
    assert offline_engine().settings_for(TASKS[task], GenerationOverrides(max_new_tokens=1)).max_new_tokens == 1


def test_api_refuses_a_too_small_budget_before_loading(tiny_model: Path):
    mio = Mio(model=str(tiny_model), device="cpu")
    prompt = Prompt(mio.task_prompt("imagine", {"caption": "a red kite"}))
    with pytest.raises(UsageError, match="at least 34 new tokens"):
        mio.run("imagine", [prompt], GenerationOptions(max_new_tokens=33))
    assert mio.runtime.loaded() == []


def test_cli_refuses_a_too_small_budget_with_exit_code_2(tiny_model: Path, tmp_path: Path):
    done = run_mio("tts", "hello there", "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu",
                   "--max-new-tokens", "5", "--verbose")
    assert done.returncode == 2, done.stderr
    assert "--max-new-tokens 5 is too small" in done.stderr and "at least 6 new tokens" in done.stderr
    assert "produced no" not in done.stderr
    assert "loaded llm" not in done.stderr


def test_settings_used_by_the_engine_are_preset_plus_overrides(engine: Engine):
    settings = engine.settings_for(TASKS["tts"], GenerationOverrides(max_new_tokens=12))
    assert settings == GenerationSettings(num_beams=1, do_sample=True, repetition_penalty=1.15, top_p=0.7,
                                          max_new_tokens=12)
    with pytest.raises(UsageError):
        engine.settings_for(TASKS["tts"], GenerationOverrides(top_p=2.0))


# ---- prompts: user text, raw prompts --------------------------------------------------------------
def test_marking_user_text_changes_no_id_of_a_plain_prompt(engine: Engine):
    text = task_prompt_text(TASKS["imagine"], "instruct", {"caption": "a red kite over a green hill"})
    assert text.plain  # the caption is user text
    assert engine.encode([Prompt(text)]) == [engine.runtime.tokenizer.encode(str(text))]


def test_a_bare_str_prompt_is_a_raw_prompt_of_user_text(engine: Engine):
    tokenizer = engine.runtime.tokenizer
    [ids] = engine.encode([Prompt("<|im_start|>user")])
    assert ids[0] == tokenizer.bos_id and tokenizer.token_to_id(protocol.IM_START) not in ids
    assert engine.encode([Prompt(protocol.BOS + "hi")]) == engine.encode([Prompt("hi")])
    trusted = protocol.PromptText.trusted("<|im_start|>user")
    assert engine.encode([Prompt(trusted)]) == [tokenizer.encode(protocol.BOS + "<|im_start|>user")]


def test_a_template_field_the_input_lacks_is_a_usage_error():
    with pytest.raises(UsageError, match="no 'question' field"):
        task_prompt_text(TASKS["chat"], "instruct", {})
    with pytest.raises(UsageError, match="should be text"):
        task_prompt_text(TASKS["chat"], "instruct", {"question": 3})
