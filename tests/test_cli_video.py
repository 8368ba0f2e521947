"""Video and composite commands through the real `mio` entry point on the tiny checkpoint.

Videos are written here with OpenCV: solid-colour scenes with noise, so the cuts are known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from mio_testing import run_mio
from miocli.cli.app import join_example_values
from miocli.cli.run import EXAMPLE_SEPARATOR

FPS = 10
SIZE = (160, 120)
# Dark and bright colours alternate so every cut changes brightness as well as hue.
SCENES = [(120, 20, 20), (30, 230, 230), (20, 20, 140)]
FAST = ["--device", "cpu", "--seed", "0"]
PIXELS = ["--steps", "2", "--size", "64"]


def write_video(path: Path, colours: list[tuple[int, int, int]], frames_per_scene: int = 2 * FPS) -> Path:
    """Scenes of two seconds: longer than PySceneDetect's (and the reference's) 15-frame minimum."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    for colour in colours:
        base = np.full((SIZE[1], SIZE[0], 3), colour, np.int16)
        for _ in range(frames_per_scene):
            writer.write(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))
    writer.release()
    return path


def count_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    return frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    not_video = root / "notes.mp4"
    not_video.write_text("this is not a video\n")
    picture = root / "still.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(picture)
    return {
        "three": write_video(root / "three.mp4", SCENES),
        "other": write_video(root / "other.mp4", SCENES[::-1]),
        "static": write_video(root / "static.mp4", [SCENES[1]], frames_per_scene=3 * FPS),
        "bad": not_video,
        "image": picture,
    }


def model(tiny_model: Path) -> list[str]:
    return ["--model", str(tiny_model), *FAST]


# ---- keyframes (no model) ----------------------------------------------------------------------------
def test_keyframes_writes_frames_and_index_in_order(clips, tmp_path):
    out = tmp_path / "kf"
    done = run_mio("keyframes", str(clips["three"]), "-o", str(out))
    assert done.returncode == 0, done.stderr
    entries = json.loads((out / "keyframes.json").read_text())
    assert [e["scene"] for e in entries] == [0, 1, 2]
    # The reference's frame of each two-second scene: start + max(1, end - start) // 2.
    assert [e["frame_index"] for e in entries] == [10, 30, 50]
    assert [e["time_s"] for e in entries] == pytest.approx([1.0, 3.0, 5.0], abs=0.05)
    for entry, colour in zip(entries, SCENES):
        assert set(entry) >= {"file", "frame_index", "time_s", "scene"}
        pixels = np.asarray(Image.open(out / entry["file"]), dtype=float).reshape(-1, 3).mean(axis=0)
        assert np.abs(pixels - np.array(colour[::-1])).max() < 12
    # stdout: the path of each file written, the index last.
    assert done.stdout.splitlines() == [str(out / e["file"]) for e in entries] + [str(out / "keyframes.json")]

    listed = run_mio("keyframes", str(clips["three"]), "-o", str(tmp_path / "again"), "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == json.loads((tmp_path / "again" / "keyframes.json").read_text())


def test_keyframes_cap_uniform_and_several_videos(clips, tmp_path):
    capped = run_mio("keyframes", str(clips["three"]), "-o", str(tmp_path / "cap"), "--max-frames", "2", "--json")
    assert capped.returncode == 0, capped.stderr
    frames = json.loads(capped.stdout)
    assert len(frames) == 2 and frames[0]["frame_index"] < frames[1]["frame_index"]

    uniform = run_mio("keyframes", str(clips["three"]), "-o", str(tmp_path / "uni"), "--uniform", "--json")
    times = [e["time_s"] for e in json.loads(uniform.stdout)]
    assert len(times) == 10 and times == sorted(times)

    # No cut at all: evenly spaced frames instead of one.
    static = run_mio("keyframes", str(clips["static"]), "-o", str(tmp_path / "static"), "--json")
    assert len(json.loads(static.stdout)) == 10

    both = run_mio("keyframes", str(clips["three"]), str(clips["other"]), "-o", str(tmp_path / "both"), "--json")
    entries = json.loads(both.stdout)
    assert [Path(e["video"]).name for e in entries] == ["three.mp4"] * 3 + ["other.mp4"] * 3
    assert all((tmp_path / "both" / e["file"]).is_file() for e in entries)


def test_keyframes_bad_inputs(clips, tmp_path):
    out = tmp_path / "out"
    done = run_mio("keyframes", str(clips["bad"]), str(clips["three"]), "-o", str(out))
    assert done.returncode == 1
    assert "notes.mp4" in done.stderr and "Traceback" not in done.stderr
    # The good video of the batch is still written and indexed.
    assert len(json.loads((out / "keyframes.json").read_text())) == 3

    still = run_mio("keyframes", str(clips["image"]), "-o", str(tmp_path / "still"))
    assert still.returncode == 1 and "still.png" in still.stderr

    again = run_mio("keyframes", str(clips["three"]), "-o", str(out))
    assert again.returncode != 0 and "already exists" in again.stderr
    assert "--skip-existing" not in again.stderr  # keyframes has no such option to offer

    missing_out = run_mio("keyframes", str(clips["three"]))
    assert missing_out.returncode == 2 and "-o DIR" in missing_out.stderr
    zero = run_mio("keyframes", str(clips["three"]), "-o", str(tmp_path / "z"), "--max-frames", "0")
    assert zero.returncode == 2 and "--max-frames" in zero.stderr


# ---- understanding ----------------------------------------------------------------------------------
def test_video_caption_prompts_instruct_and_base(clips, tiny_model):
    instruct = run_mio("video-caption", str(clips["three"]), *model(tiny_model), "--print-prompt")
    assert instruct.returncode == 0, instruct.stderr
    assert "Please describe the following video.\n" in instruct.stdout
    assert re.findall(r"<image_placeholder_(\d+)>", instruct.stdout) == ["0", "1", "2"]
    base = run_mio("video-caption", str(clips["three"]), *model(tiny_model), "--variant", "base", "--print-prompt")
    assert base.returncode == 0, base.stderr
    assert base.stdout.startswith("Please describe the following video: <image_placeholder_0>")
    capped = run_mio("video-caption", str(clips["three"]), *model(tiny_model), "--max-frames", "1",
                     "--print-prompt")
    assert re.findall(r"<image_placeholder_(\d+)>", capped.stdout) == ["0"]


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_video_caption_runs_and_writes_text(clips, tiny_model, tmp_path):
    out = tmp_path / "captions"
    done = run_mio("video-caption", str(clips["three"]), str(clips["other"]), *model(tiny_model),
                   "--max-new-tokens", "6", "--beams", "1", "--json", "-o", str(out))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["input"]).name for r in records] == ["three.mp4", "other.mp4"]
    assert (out / "three.video-caption.txt").is_file() and (out / "other.video-caption.txt").is_file()

    base = run_mio("video-caption", str(clips["three"]), *model(tiny_model), "--variant", "base",
                   "--max-new-tokens", "4", "--beams", "1")
    assert base.returncode == 0, base.stderr


def test_ask_video(clips, tiny_model):
    prompt = run_mio("ask", str(clips["three"]), "What colour comes last?", *model(tiny_model), "--print-prompt")
    assert prompt.returncode == 0, prompt.stderr
    assert "What colour comes last?\n<image_placeholder_0><image_placeholder_1><image_placeholder_2>" in prompt.stdout
    done = run_mio("ask", str(clips["three"]), "What colour comes last?", *model(tiny_model),
                   "--max-new-tokens", "5", "--beams", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["task"] == "ask-video"
    bad = run_mio("ask", str(clips["bad"]), "What is it?", *model(tiny_model))
    assert bad.returncode == 1 and "notes.mp4" in bad.stderr and "Traceback" not in bad.stderr


# ---- in-context examples -----------------------------------------------------------------------------
@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_examples_build_a_few_shot_prompt(clips, tiny_model, tmp_path):
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (220, 0, 0)).save(red)
    Image.new("RGB", (32, 32), (0, 0, 220)).save(blue)
    done = run_mio("caption", str(clips["image"]), *model(tiny_model), "--example", str(red), "A red square.",
                   "--example", str(blue), "A blue square.", "--print-prompt")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    # Two solved turns, then the question, with the placeholders numbered through the whole prompt.
    assert text.count("<|im_start|>user\n") == 2 + 1
    assert "<image_placeholder_0><|im_end|>\n<|im_start|>assistant\nA red square.<|im_end|>" in text
    assert "<image_placeholder_1><|im_end|>\n<|im_start|>assistant\nA blue square.<|im_end|>" in text
    assert text.rstrip().endswith("<image_placeholder_2><|im_end|>\n<|im_start|>assistant")

    base = run_mio("caption", str(clips["image"]), *model(tiny_model), "--variant", "base", "--example", str(red),
                   "A red square.", "--print-prompt")
    assert base.stdout.startswith("<image_placeholder_0> The caption of this image is A red square.\n"
                                  "<image_placeholder_1> The caption of this image is")

    ask = run_mio("ask", str(clips["image"]), "What colour?", *model(tiny_model), "--example", str(red), "Red.",
                  "--max-new-tokens", "4", "--beams", "1", "--json")
    assert ask.returncode == 0, ask.stderr

    video = run_mio("ask", str(clips["three"]), "First colour?", *model(tiny_model), "--example",
                    str(clips["other"]), "Dark red.", "--max-frames", "2", "--print-prompt")
    assert video.returncode == 0, video.stderr
    assert re.findall(r"<image_placeholder_(\d+)>", video.stdout) == ["0", "1", "2", "3"]


def test_bad_examples_are_usage_errors(clips, tiny_model, tmp_path):
    wrong_kind = run_mio("caption", str(clips["image"]), *model(tiny_model), "--example", str(clips["three"]),
                         "A video.")
    assert wrong_kind.returncode == 2 and "video" in wrong_kind.stderr
    incomplete = run_mio("caption", str(clips["image"]), *model(tiny_model), "--example", str(clips["image"]))
    assert incomplete.returncode == 2 and "two values" in incomplete.stderr
    missing = run_mio("caption", str(clips["image"]), *model(tiny_model), "--example", str(tmp_path / "no.png"),
                      "Nothing.", "--max-new-tokens", "2")
    assert missing.returncode == 1 and "no.png" in missing.stderr


def test_example_values_are_joined_before_parsing():
    sep = EXAMPLE_SEPARATOR
    assert join_example_values(["ask", "a.png", "q", "--example", "b.png", "two words", "--json"]) == [
        "ask", "a.png", "q", "--example", f"b.png{sep}two words", "--json"]
    assert join_example_values(["--example=b.png", "ans"]) == ["--example", f"b.png{sep}ans"]
    # An incomplete pair is left for the command to reject; nothing after `--` is touched.
    assert join_example_values(["--example", "b.png", "--json"]) == ["--example", "b.png", "--json"]
    assert join_example_values(["--", "--example", "x", "y"]) == ["--", "--example", "x", "y"]


# ---- generation -------------------------------------------------------------------------------------
def test_video_gen_writes_frames_and_an_mp4(tiny_model, tmp_path):
    out = tmp_path / "vg"
    done = run_mio("video-gen", "a kite flying", *model(tiny_model), *PIXELS, "--max-new-tokens", "120",
                   "--fps", "4", "--json", "-o", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    frames = [out / f for f in record["files"] if f.endswith(".png")]
    video = out / next(f for f in record["files"] if f.endswith(".mp4"))
    assert frames and record["frames"] == len(frames)
    for frame in frames:
        with Image.open(frame) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    assert count_frames(video) == len(frames)
    capture = cv2.VideoCapture(str(video))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(4, abs=0.01)
    capture.release()
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])["task"] == "video-gen"

    again = run_mio("video-gen", "a kite flying", *model(tiny_model), *PIXELS, "--max-new-tokens", "120",
                    "-o", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert run_mio("video-gen", "x", *model(tiny_model), "--fps", "0", "-o", str(out)).returncode == 2


def test_interleave_story_links_resolve(tiny_model, tmp_path):
    out = tmp_path / "story"
    # With seed 2 the tiny random model happens to draw two images in its story.
    done = run_mio("interleave", "a red kite", *model(tiny_model), *PIXELS, "--max-new-tokens", "200",
                   "--seed", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "image 1 written" in done.stderr
    story = (out / "story.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", story)
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    assert len(links) == record["images"] >= 1
    for link in links:
        with Image.open(out / link) as image:
            assert image.size == (64, 64)
    assert "<image_placeholder" not in story


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_cot_visual_two_stages(tiny_model, tmp_path, clips):
    out = tmp_path / "cot"
    done = run_mio("cot-visual", "How many legs has a cat?", *model(tiny_model), *PIXELS, "--max-new-tokens", "50",
                   "--show-steps", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("step 1 (illustrate): ") and "step 2 (answer):" in done.stdout
    drawn = out / "how-many-legs-has-a-cat.cot-visual.png"
    with Image.open(drawn) as image:
        assert image.size == (64, 64)

    with_image = run_mio("cot-visual", "What is next to the square?", "--image", str(clips["image"]),
                         *model(tiny_model), *PIXELS, "--max-new-tokens", "50", "--json", "-o", str(out))
    assert with_image.returncode == 0, with_image.stderr
    record = json.loads(with_image.stdout)
    assert [step["stage"] for step in record["steps"]] == ["illustrate", "answer"]
    assert record["image"] == str(clips["image"]) and (out / record["files"][0]).is_file()

    prompt_check = run_mio("cot-visual", "Q?", "--image", str(tmp_path / "missing.png"), *model(tiny_model),
                           "-o", str(out))
    assert prompt_check.returncode == 1 and "missing.png" in prompt_check.stderr


@pytest.mark.parametrize("command", ["keyframes", "video-caption", "video-gen", "interleave", "cot-visual"])
def test_new_commands_have_help(command):
    done = run_mio(command, "--help")
    assert done.returncode == 0 and "Usage:" in done.stdout


def test_streamed_tokens_are_the_answer(tiny_model):
    from miocli.core.api import GenerationOptions, Mio
    from miocli.core.prompts import Prompt, task_prompt_text
    from miocli.core.tasks import TASKS

    mio = Mio(str(tiny_model), device="cpu")
    task = TASKS["interleave"]
    prompt = Prompt(task_prompt_text(task, mio.variant, {"topic": "a red kite"}))
    seen: list[int] = []
    reply = mio.run(task, [prompt], GenerationOptions(max_new_tokens=60, seed=0),
                    on_tokens=lambda _n, ids: seen.extend(ids))[0]
    assert seen[: len(reply.token_ids)] == reply.token_ids and len(seen) >= len(reply.token_ids)
    # Beam search only settles its tokens at the end: nothing is streamed then.
    beamed: list[int] = []
    mio.run(task, [prompt], GenerationOptions(max_new_tokens=8, beams=2),
            on_tokens=lambda _n, ids: beamed.extend(ids))
    assert beamed == []
