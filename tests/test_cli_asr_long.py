"""Recordings longer than one prompt: `mio asr` splits them, other audio tasks refuse them clearly.

The tiny LLM's context is 4096 tokens (80 s of speech); a copy of the tiny checkpoint whose
config.json says 256 makes "too long" a few seconds, so these tests stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mio_testing import run_mio
from miocli import protocol
from miocli.core import mediatokens
from miocli.core.api import GenerationOptions, Mio
from miocli.core.pipeline import SPEECH_HOP, Generated, PromptBudget
from miocli.core.prompts import Prompt, task_prompt_text
from miocli.core.steps import joined_result
from miocli.core.tasks import TASKS
from miocli.errors import InputError
from miocli.media.audio import read_audio

RATE = 16000
CONTEXT = 256
ASR = ["--max-new-tokens", "8", "--beams", "1"]
TONE_S, GAP_S = 0.5, 0.4


@pytest.fixture(scope="module")
def short_context_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a 256-token context: links to its files, its own config.json."""
    folder = tmp_path_factory.mktemp("tiny-context-256")
    for entry in tiny_model.iterdir():
        if entry.name != "config.json":
            (folder / entry.name).symlink_to(entry)
    config = json.loads((tiny_model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _tones_and_gaps(count: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """`count` tones of 0.5 s, each followed by 0.4 s of silence; returns the samples and the silences."""
    pieces, silences, pos = [], [], 0
    t = np.arange(int(TONE_S * RATE)) / RATE
    for i in range(count):
        tone = (0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32)
        gap = np.zeros(int(GAP_S * RATE), np.float32)
        pieces += [tone, gap]
        pos += len(tone)
        silences.append((pos, pos + len(gap)))
        pos += len(gap)
    return np.concatenate(pieces), silences


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[tuple[int, int]]]:
    folder = tmp_path_factory.mktemp("long-audio")
    samples, silences = _tones_and_gaps(12)  # 10.8 s: about three prompts' worth at a 256-token context
    long_path, short_path = folder / "long.wav", folder / "short.wav"
    # Float samples: read back bit for bit, so the parts written below encode exactly as in the split.
    soundfile.write(long_path, samples, RATE, subtype="FLOAT")
    soundfile.write(short_path, _tones_and_gaps(1)[0], RATE, subtype="FLOAT")  # 0.9 s
    return long_path, short_path, silences


def _records(stdout: str) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in (json.loads(line) for line in stdout.splitlines())}


def test_budget_parts_fit_the_context_and_cover_the_recording(short_context_model, recordings):
    long_path, short_path, silences = recordings
    mio = Mio(str(short_context_model), device="cpu")
    task = TASKS["asr"]
    budget = PromptBudget.for_task(mio.engine, task, GenerationOptions(max_new_tokens=8, beams=1).overrides())
    assert budget.context == CONTEXT and budget.answer_tokens == 8
    wave = read_audio(long_path)
    parts = budget.fit(str(long_path), {}, [wave], 1)
    assert len(parts) >= 3
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), wave)
    lengths = []
    for (part,) in parts:
        speeches = [mediatokens.speech_string(mio.runtime, part, False)]
        lengths.append(len(mio.prompt_ids(Prompt(task_prompt_text(task, mio.variant, {}, 1), [], speeches))))
    # Every part leaves the answer its room: the prompt is the overhead plus one token per frame.
    overhead = budget.overhead({}, 1)
    assert lengths == [overhead + -(-len(part) // SPEECH_HOP) for (part,) in parts]
    assert max(lengths) <= CONTEXT - 8
    # Cuts go in the last 30% of a full window, so no part but the last is much shorter than it.
    window = (CONTEXT - 8 - overhead) * SPEECH_HOP
    assert all(0.7 * window <= len(part) <= window for (part,) in parts[:-1])
    # The cuts fall in silences.
    ends = np.cumsum([len(p[0]) for p in parts])[:-1]
    assert all(any(a <= end <= b for a, b in silences) for end in ends), ends
    assert len(budget.fit(str(short_path), {}, [read_audio(short_path)], 1)) == 1
    assert "llm" not in mio.runtime.loaded()  # the context came from config.json


def test_asr_splits_a_long_recording_and_joins_the_parts(short_context_model, recordings, tmp_path):
    long_path, short_path, silences = recordings
    # The parts the split makes, as files of their own: transcribed alone they must give the
    # same texts that the long recording's joined result is made of, in order.
    mio = Mio(str(short_context_model), device="cpu")
    budget = PromptBudget.for_task(mio.engine, TASKS["asr"], GenerationOptions(max_new_tokens=8, beams=1).overrides())
    parts = budget.fit(str(long_path), {}, [read_audio(long_path)], 1)
    part_paths = []
    for n, (part,) in enumerate(parts):
        path = tmp_path / f"part{n}.wav"
        soundfile.write(path, part, RATE, subtype="FLOAT")
        part_paths.append(str(path))

    out = tmp_path / "out"
    done = run_mio("asr", str(long_path), str(short_path), *part_paths, "--model", str(short_context_model), *ASR,
                   "--json", "-o", str(out))
    assert done.returncode == 0, done.stderr
    records = _records(done.stdout)
    long_record = records["long.wav"]
    assert long_record["chunks"] == len(parts)
    assert "chunks" not in records["short.wav"]  # a short file's record is as it always was
    part_texts = [records[Path(p).name]["text"].strip() for p in part_paths]
    assert long_record["text"] == " ".join(t for t in part_texts if t)
    assert f"in {len(parts)} parts cut at" in done.stderr and "long.wav" in done.stderr
    # One result per input: one .txt and one manifest record for the long file.
    assert (out / "long.asr.txt").read_text() == long_record["text"] + "\n"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["chunks"] for r in manifest if r["input"] == str(long_path)] == [len(parts)]
    assert len(manifest) == 2 + len(parts)
    # Each part is a segment with its times: consecutive, covering the recording, with the part's own text.
    ends = np.cumsum([len(part) for (part,) in parts]) / RATE
    assert [s["end"] for s in long_record["segments"]] == pytest.approx(list(ends), abs=1e-3)
    assert [s["start"] for s in long_record["segments"]] == pytest.approx([0.0, *ends[:-1]], abs=1e-3)
    assert [s["text"] for s in long_record["segments"]] == part_texts
    short_seconds = len(read_audio(short_path)) / RATE
    assert records["short.wav"]["segments"] == [{"start": 0.0, "end": pytest.approx(short_seconds, abs=1e-3),
                                                  "text": records["short.wav"]["text"].strip()}]


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_asr_writes_subtitles_timed_by_its_parts(short_context_model, recordings, tmp_path):
    long_path, short_path, _ = recordings
    out = tmp_path / "subs"
    done = run_mio("asr", str(long_path), str(short_path), "--model", str(short_context_model), *ASR,
                   "--format", "srt", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(out / "long.asr.srt"), str(out / "short.asr.srt")]
    cues = (out / "long.asr.srt").read_text(encoding="utf-8").strip().split("\n\n")
    assert len(cues) > 1
    times = [cue.splitlines()[1] for cue in cues]
    assert [cue.splitlines()[0] for cue in cues] == [str(n) for n in range(1, len(cues) + 1)]
    assert times[0].startswith("00:00:00,000 --> 00:00:0")
    # Each cue starts where the one before it ended.
    assert all(a.split(" --> ")[1] == b.split(" --> ")[0] for a, b in zip(times, times[1:]))
    vtt = run_mio("asr", str(short_path), "--model", str(short_context_model), *ASR, "--format", "vtt")
    assert vtt.returncode == 0, vtt.stderr
    assert vtt.stdout.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:0")
    whisper_like = run_mio("asr", str(short_path), "--model", str(short_context_model), *ASR, "--format", "json")
    document = json.loads(whisper_like.stdout)
    assert set(document) == {"text", "segments"} and document["segments"][0]["id"] == 0
    several = run_mio("asr", str(long_path), str(short_path), "--model", str(short_context_model), "--format", "srt")
    assert several.returncode == 2 and "pass -o DIR" in several.stderr


def test_speech2speech_refuses_a_too_long_recording_and_runs_the_rest(short_context_model, recordings, tmp_path):
    long_path, short_path, _ = recordings
    out = tmp_path / "s2s"
    done = run_mio("speech2speech", str(long_path), str(short_path), "--model", str(short_context_model), "-o",
                   str(out), "--max-new-tokens", "60", "--beams", "1", "--seed", "0")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    error = next(line for line in done.stderr.splitlines() if line.startswith("mio: error:"))
    assert str(long_path) in error and "10.80 s long" in error and "holds at most" in error
    assert "mio asr" in done.stderr and "trim" in done.stderr
    assert (out / "short.speech2speech.wav").is_file()
    assert not (out / "long.speech2speech.wav").exists()


def test_ask_audio_refuses_a_too_long_recording(short_context_model, recordings):
    long_path, _, _ = recordings
    done = run_mio("ask", str(long_path), "What is this?", "--model", str(short_context_model), *ASR)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert f"mio: error: {long_path}: the recording is 10.80 s long" in done.stderr
    assert "`ask-audio` prompt holds at most" in done.stderr and "mio asr" in done.stderr


def test_no_room_left_for_speech_asks_for_fewer_new_tokens(short_context_model, recordings):
    _, short_path, _ = recordings
    mio = Mio(str(short_context_model), device="cpu")
    # speech2speech keeps 2048 new tokens by default: more than the whole 256-token context.
    budget = PromptBudget.for_task(mio.engine, TASKS["speech2speech"], GenerationOptions(beams=1).overrides())
    with pytest.raises(InputError, match=r"0\.90 s long and one `speech2speech` prompt leaves only 0\.00 s") as info:
        budget.fit(str(short_path), {}, [read_audio(short_path)], 1)
    assert info.value.hint is not None and "--max-new-tokens" in info.value.hint
    assert info.value.source == str(short_path)


def _generated(text: str, ids: list[int], problems: tuple[str, ...] = ()) -> Generated:
    parsed = protocol.ParsedOutput(text, problems=[protocol.BadSegment("speech", "", p) for p in problems])
    return Generated(Prompt(""), ids, text, parsed)


def test_joined_result_keeps_order_and_names_the_part_of_each_problem():
    replies = [_generated("first", [1, 2]), _generated("  ", [3]), _generated("third ", [4], ("bad spch",))]
    joined = joined_result("asr", "long.wav", 0, replies)
    assert joined.text == "first third"
    assert joined.token_ids == [1, 2, 3, 4]
    assert joined.problems == ["part 3 of 3: malformed speech segment: bad spch"]
    assert joined.chunks == 3
    single = joined_result("asr", "short.wav", 0, [_generated("only ", [5])])
    assert single.text == "only " and single.chunks == 1


def test_asr_loads_only_the_speech_encoder_tokenizer_and_llm(tiny_model, recordings):
    _, short_path, _ = recordings
    mio = Mio(str(tiny_model), device="cpu")
    assert mio.asr(short_path, max_new_tokens=2, beams=1).ok
    # No image codec, no diffusion, and of the speech codec only the encoder.
    assert sorted(mio.runtime.loaded()) == ["llm", "speech", "tokenizer"]
    assert mio.runtime._components["speech"][0] == frozenset({"encoder"})
    assert mio.runtime._components["speech"][1].parts == frozenset({"encoder"})


def test_tokenize_audio_imports_nothing_for_the_llm_or_images(tiny_model, recordings):
    """`mio tokenize AUDIO` needs torch and the speech codec only (its fresh-process time is a target)."""
    import subprocess
    import sys

    _, short_path, _ = recordings
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "miocli", "tokenize", str(short_path),
                           "--model", str(tiny_model)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("<spch>")
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "miocli.codecs.speech" in imported
    unwanted = {"transformers", "diffusers", "cv2", "scenedetect", "sentencepiece", "PIL", "psutil",
                "miocli.model.tokenizer", "miocli.codecs.seed"}
    assert not unwanted & imported, sorted(unwanted & imported)


def test_print_prompt_shows_every_part_of_a_long_recording(short_context_model, recordings):
    long_path, short_path, _ = recordings
    done = run_mio("asr", str(long_path), str(short_path), "--model", str(short_context_model), *ASR,
                   "--print-prompt", "--json")
    assert done.returncode == 0, done.stderr
    prompts = [json.loads(line) for line in done.stdout.splitlines()]
    mio = Mio(str(short_context_model), device="cpu")
    budget = PromptBudget.for_task(mio.engine, TASKS["asr"], GenerationOptions(max_new_tokens=8, beams=1).overrides())
    parts = budget.fit(str(long_path), {}, [read_audio(long_path)], 1)
    assert len(prompts) == len(parts) + 1
    assert all(len(p["input_ids"]) <= CONTEXT - 8 for p in prompts)
