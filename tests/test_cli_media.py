"""Image and speech commands end to end on the tiny checkpoint, through the real `mio` app."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from PIL import Image
from typer.testing import CliRunner

from mio_testing import run_mio
from miocli import protocol
from miocli.cli.app import app

runner = CliRunner()
FAST = ["--max-new-tokens", "8", "--beams", "1"]
PIXELS = ["--size", "64", "--steps", "2", "--seed", "0"]


def invoke(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.RandomState(0)
    for name in ("red", "green", "noise"):
        array = rng.randint(0, 255, (90, 120, 3), dtype=np.uint8)
        if name == "red":
            array[..., 0] = 250
        Image.fromarray(array).save(folder / f"{name}.png")
    t = np.arange(16000) / 16000
    soundfile.write(folder / "tone.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype("float32"), 16000)
    soundfile.write(folder / "stereo44k.flac", np.stack([0.2 * np.sin(2 * np.pi * 200 * np.arange(44100) / 44100)] * 2,
                                                         axis=1).astype("float32"), 44100)
    (folder / "broken.png").write_text("this is not an image")
    return folder


def test_caption_folder_in_batches_with_one_bad_file(tiny_model, media, tmp_path):
    out = tmp_path / "captions"
    done = invoke("caption", str(media), "--model", str(tiny_model), *FAST, "-b", "2", "-o", str(out), "--json")
    assert done.exit_code == 1  # broken.png failed, the others were processed
    assert "broken.png" in done.stderr and "Traceback" not in done.stderr
    all_records = [json.loads(line) for line in done.stdout.splitlines()]
    # One record per input, in input order; the failed one says why.
    assert [r["input"].rsplit("/", 1)[-1] for r in all_records] == ["broken.png", "green.png", "noise.png", "red.png"]
    assert "not an image" in all_records[0]["error"] and all_records[0]["files"] == []
    assert sorted(p.name for p in out.glob("*.txt")) == ["green.caption.txt", "noise.caption.txt", "red.caption.txt"]


def test_caption_print_prompt_holds_image_tokens(tiny_model, media):
    done = invoke("caption", str(media / "red.png"), "--model", str(tiny_model), "--print-prompt", "--json")
    record = json.loads(done.stdout)
    assert "Please provide an accurate and detailed description of this image.\n<image_placeholder_0>" in (
        record["prompt"])
    tokenized = invoke("tokenize", str(media / "red.png"), "--model", str(tiny_model)).stdout.strip()
    assert tokenized.startswith("<image>") and len(protocol.image_ids_from_string(tokenized)) == 32
    from miocli.model.tokenizer import MioTokenizer

    expected = MioTokenizer.from_dir(tiny_model).encode(protocol.fill_placeholders(record["prompt"], [tokenized]))
    assert record["input_ids"] == expected


def test_base_caption_prompt(tiny_model, media):
    done = invoke("caption", str(media / "red.png"), "--model", str(tiny_model), "--variant", "base",
                  "--print-prompt")
    assert done.stdout == "<image_placeholder_0> The caption of this image is\n"


def test_ask_image_and_audio(tiny_model, media):
    image = run_mio("ask", str(media / "red.png"), "What colour?", "--model", str(tiny_model), *FAST)
    assert image.returncode == 0, image.stderr
    audio = invoke("ask", str(media / "tone.wav"), "What is this?", "--model", str(tiny_model), *FAST, "--json")
    assert audio.exit_code == 0, audio.output
    assert json.loads(audio.stdout)["task"] == "ask-audio"


def test_imagine_writes_pngs(tiny_model, tmp_path):
    out = tmp_path / "imgs"
    done = run_mio("imagine", "a red kite", "-n", "2", "--model", str(tiny_model), "-o", str(out), *PIXELS,
                   "--max-new-tokens", "40", "--beams", "1")
    assert done.returncode == 0, done.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    for path in files:
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["files"] for r in records)


def test_imagine_needs_output_dir(tiny_model):
    done = invoke("imagine", "a kite", "--model", str(tiny_model))
    assert done.exit_code == 2 and "-o DIR" in done.stderr


def test_edit_writes_an_image(tiny_model, media, tmp_path):
    done = invoke("edit", str(media / "red.png"), "make it blue", "--model", str(tiny_model), "-o",
                  str(tmp_path), *PIXELS, "--max-new-tokens", "40", "--beams", "1")
    assert done.exit_code == 0, done.output
    with Image.open(tmp_path / "red.edit.png") as image:
        assert image.size == (64, 64)
    prompt = invoke("edit", str(media / "red.png"), "make it blue", "--model", str(tiny_model), "--print-prompt")
    assert prompt.stdout.rstrip("\n").endswith("<|im_start|>assistant\n<image>")


def test_detokenize_image_and_embeddings(tiny_model, media, tmp_path):
    tokens = invoke("tokenize", str(media / "red.png"), "--model", str(tiny_model)).stdout.strip()
    png = tmp_path / "back.png"
    done = invoke("detokenize", tokens, "-o", str(png), "--model", str(tiny_model), *PIXELS)
    assert done.exit_code == 0, done.output
    assert Image.open(png).size == (64, 64)
    npy = tmp_path / "emb.npy"
    (tmp_path / "tokens.txt").write_text(tokens + tokens)
    done = invoke("detokenize", str(tmp_path / "tokens.txt"), "--embeddings-only", "-o", str(npy), "--model",
                  str(tiny_model))
    assert done.exit_code == 0, done.output
    embeds = np.load(npy)
    assert embeds.shape == (2, 1024) and embeds.dtype == np.float32
    again = invoke("detokenize", tokens, "--embeddings-only", "-o", str(npy), "--model", str(tiny_model))
    assert again.exit_code == 1 and "already exists" in again.stderr


def test_asr_and_speech_tokenize(tiny_model, media, tmp_path):
    done = invoke("asr", str(media / "tone.wav"), str(media / "stereo44k.flac"), "--model", str(tiny_model), *FAST,
                  "-o", str(tmp_path))
    assert done.exit_code == 0, done.output
    assert (tmp_path / "tone.asr.txt").is_file() and (tmp_path / "stereo44k.asr.txt").is_file()
    content = invoke("tokenize", str(media / "tone.wav"), "--model", str(tiny_model)).stdout.strip()
    assert content.startswith("<spch>") and len(protocol.speech_content_from_string(content)) == 50
    timbre = invoke("tokenize", str(media / "tone.wav"), "--with-timbre", "--model", str(tiny_model)).stdout.strip()
    assert protocol.check_speech_completeness(timbre)
    wav = tmp_path / "back.wav"
    done = invoke("detokenize", timbre, "-o", str(wav), "--model", str(tiny_model))
    assert done.exit_code == 0, done.output
    assert soundfile.info(wav).frames == 50 * 320 and soundfile.info(wav).samplerate == 16000


def _wav_frames(path) -> int:
    info = soundfile.info(path)
    assert info.samplerate == 16000 and info.channels == 1
    return info.frames


def test_tts_speak_speech2speech(tiny_model, media, tmp_path):
    for args in (["tts", "hello world", "good night"], ["speak", "Say hi."],
                 ["speech2speech", str(media / "tone.wav")]):
        out = tmp_path / args[0]
        done = invoke(*args, "--model", str(tiny_model), "-o", str(out), "--max-new-tokens", "60", "--beams", "1",
                      "--seed", "0", "--json")
        assert done.exit_code == 0, done.output
        records = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(records) == len(args) - 1
        for record in records:
            (name,) = record["files"]
            frames = _wav_frames(out / name)
            assert frames > 0 and frames % 320 == 0


def test_tts_text_file(tiny_model, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\n\nsecond line\n")
    done = invoke("tts", "--text-file", str(lines), "--model", str(tiny_model), "-o", str(tmp_path / "o"),
                  "--max-new-tokens", "30", "--beams", "1", "--seed", "0")
    assert done.exit_code == 0, done.output
    assert len(list((tmp_path / "o").glob("*.wav"))) == 2


@pytest.mark.parametrize("content, needle", [(b"", "empty"), (b"not audio at all", "wav")])
def test_bad_audio_through_entry_point(tiny_model, tmp_path, content, needle):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    done = run_mio("asr", str(bad), "--model", str(tiny_model), *FAST)
    assert done.returncode == 1 and "bad.wav" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("content", [b"", b"GIF89a not really", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_bad_images_through_entry_point(tiny_model, tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    done = run_mio("caption", str(bad), "--model", str(tiny_model), *FAST)
    assert done.returncode == 1 and "bad.png" in done.stderr and "Traceback" not in done.stderr


def test_caption_loads_neither_diffusion_nor_speech(tiny_model, media):
    from miocli.core.api import Mio

    mio = Mio(str(tiny_model), device="cpu")
    assert mio.caption(media / "red.png", max_new_tokens=2, beams=1).ok
    assert set(mio.runtime.loaded()) == {"seed", "tokenizer", "llm"}
    assert mio.runtime._components["seed"][0] == frozenset({"encoder"})
