"""The in-memory task API (`from miocli import Mio`) and its stream, on the tiny checkpoint."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mio_testing import one_torch_thread  # noqa: F401 (autouse fixture)
from miocli import Audio, Item, Mio, Result
from miocli.errors import InputError, UsageError

FAST = {"max_new_tokens": 8, "beams": 1, "seed": 0}
PIXELS = {"steps": 2, "size": 64}


@pytest.fixture(scope="module")
def mio(tiny_model: Path) -> Mio:
    return Mio(str(tiny_model), device="cpu")


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tone(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def test_one_input_gives_one_result_and_a_list_gives_a_list(mio: Mio, tmp_path: Path):
    path = tmp_path / "p.png"
    picture(0).save(path)
    one = mio.caption(path, **FAST)
    assert isinstance(one, Result) and one.ok and one.input == str(path) and one.task == "caption"
    many = mio.caption([path, picture(0), png_bytes(picture(0))], **FAST)
    assert [type(r) for r in many] == [Result] * 3
    # A path, a PIL image and PNG bytes of the same picture are the same input to the model.
    assert many[0].text == many[1].text == many[2].text == one.text
    assert [r.input for r in many] == [str(path), "input 2", "input 3"]


def test_a_bad_input_in_a_list_is_that_results_error_and_alone_it_raises(mio: Mio, tmp_path: Path):
    results = mio.caption([picture(1), b"not an image", tmp_path / "missing.png", picture(2)], batch_size=2, **FAST)
    assert [r.ok for r in results] == [True, False, False, True]
    assert isinstance(results[1].error, InputError) and "not an image" in results[1].error.message
    assert "not found" in results[2].error.message
    assert results[1].to_record()["error"] == results[1].error.message
    with pytest.raises(InputError, match="not found"):
        mio.caption(tmp_path / "missing.png", **FAST)


def test_stream_reads_inputs_lazily_and_yields_in_order_batch_by_batch(mio: Mio):
    taken: list[int] = []

    def inputs() -> Iterator[Image.Image]:
        for n in range(7):
            taken.append(n)
            yield picture(n)

    stream = mio.stream("caption", inputs(), batch_size=3, **FAST)
    first = next(stream)
    # Only the first batch was read to give the first result.
    assert first.index == 0 and taken == [0, 1, 2]
    rest = list(stream)
    assert [r.index for r in rest] == [1, 2, 3, 4, 5, 6] and taken == list(range(7))


def test_audio_as_path_bytes_array_and_samples_with_rate(mio: Mio, tmp_path: Path):
    wave = tone()
    path = tmp_path / "t.wav"
    soundfile.write(path, wave, 16000)
    by_path = mio.asr(path, **FAST)
    by_bytes = mio.asr(path.read_bytes(), **FAST)
    by_tuple = mio.asr((wave, 16000), **FAST)
    by_rate = mio.asr([wave], rate=16000, **FAST)[0]
    assert by_path.text == by_bytes.text == by_tuple.text == by_rate.text
    resampled = mio.asr((np.interp(np.arange(0, 16000, 16000 / 8000), np.arange(16000), wave).astype("float32"),
                         8000), **FAST)
    assert resampled.ok
    with pytest.raises(InputError, match="rate"):
        mio.asr(wave, **FAST)


def test_imagine_gives_pil_images_and_tts_gives_audio_that_saves(mio: Mio, tmp_path: Path):
    image = mio.imagine("a red kite", max_new_tokens=40, beams=1, seed=0, **PIXELS)
    assert image.images[0].size == (64, 64) and len(image.image_ids[0]) == 32
    image.images[0].save(tmp_path / "kite.png")
    speech = mio.tts("hello there", max_new_tokens=60, seed=0)
    audio = speech.audio[0]
    assert isinstance(audio, Audio) and audio.rate == 16000 and audio.samples.dtype == np.float32
    saved = audio.save(tmp_path / "hello.wav")
    samples, rate = soundfile.read(saved)
    assert rate == 16000 and len(samples) == len(audio.samples)
    assert audio.to_bytes("flac")[:4] == b"fLaC"


def test_interleave_parts_cot_steps_and_video_frames(mio: Mio, tmp_path: Path):
    seen: list[int] = []
    story = mio.interleave("a fox", max_new_tokens=120, seed=0, on_part=lambda i, part: seen.append(i), **PIXELS)
    kinds = [part.kind for part in story.parts]
    assert set(kinds) <= {"text", "image", "audio"} and kinds.count("image") == len(story.images)
    assert seen == [0] * len(story.images)  # each image was handed over as soon as it was decoded
    cot = mio.cot_visual("How many legs?", image=picture(3), max_new_tokens=40, beams=1, seed=0, **PIXELS)
    assert [s.stage for s in cot.steps] == ["illustrate", "answer"] and cot.steps[0].image is cot.images[0]
    video = mio.video_gen("a kite", max_new_tokens=80, seed=0, **PIXELS)
    assert video.images and video.save_video(tmp_path / "kite.mp4").stat().st_size > 0


def test_tokenize_then_detokenize_round_trip_without_the_llm(tiny_model: Path):
    fresh = Mio(str(tiny_model), device="cpu")
    tokens = fresh.tokenize(picture(4))
    assert tokens.text.startswith("<image>") and len(tokens.image_ids[0]) == 32
    back = fresh.detokenize(tokens.text + tokens.text, seed=0, **PIXELS)
    assert len(back.images) == 2
    # Two identical segments decoded together start from the same noise: identical pixels.
    assert np.array_equal(np.asarray(back.images[0]), np.asarray(back.images[1]))
    embeddings = fresh.detokenize(tokens.text, embeddings_only=True)
    assert embeddings.embeddings.shape == (1, 1024)
    assert "llm" not in fresh.runtime.loaded()


def test_sampled_answers_do_not_depend_on_the_batch(mio: Mio):
    texts = ["hello", "a much longer sentence to say out loud", "hi", "three words here", "five"]
    settings = {"max_new_tokens": 40, "seed": 7, "sample": True, "beams": 1}
    alone = [mio.tts(t, **settings).speech_codes for t in texts]
    for size in (2, 5):
        batched = [r.speech_codes for r in mio.tts(texts, batch_size=size, **settings)]
        assert batched == alone
    # Another seed, other answers (the seed is really used).
    assert [r.speech_codes for r in mio.tts(texts, **{**settings, "seed": 8})] != alone


def test_items_carry_fields_and_sample_numbers(mio: Mio):
    same = [Item("kite", {"caption": "a kite"}, sample=0), Item("kite", {"caption": "a kite"}, sample=0)]
    other = Item("kite", {"caption": "a kite"}, sample=1)
    ids = [r.image_ids for r in mio.stream("imagine", [*same, other], max_new_tokens=40, sample=True, beams=1,
                                             seed=1, **PIXELS)]
    assert ids[0] == ids[1] and ids[2] != ids[0]


def test_usage_errors_raise_before_any_work(mio: Mio):
    with pytest.raises(UsageError, match="unknown task"):
        mio.stream("paint", ["x"])
    with pytest.raises(UsageError, match="unknown setting"):
        mio.caption(picture(0), colour="red")
    with pytest.raises(UsageError, match="takes text"):
        mio.imagine([b"bytes"])
