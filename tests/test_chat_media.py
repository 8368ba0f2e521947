"""Any-to-any conversation (issue 23): media in every turn of `mio chat` and `Mio.chat`, pictures and speech in
answers written as files, the reference's chat template byte for byte, bounded history."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mio_testing import one_torch_thread, rewired_checkpoint, run_mio  # noqa: F401  (one_torch_thread: autouse)
from miocli import protocol
from miocli.cli.app import app
from miocli.core.conversation import Part, Turn, parse_messages, prompt_text, sniff_kind
from miocli.errors import InputError, UsageError
from miocli.model.tokenizer import MioTokenizer

GOLDEN = Path(__file__).parent / "golden"
CHAT = json.loads((GOLDEN / "chat" / "chat_cases.json").read_text())
CASES = {case["name"]: case for case in CHAT["cases"]}
# The chain model's answer: a picture, then speech (4 layers of 3 frames), then the end of the turn.
IMAGE_TOKENS = [f"<img{i}>" for i in range(32)]
SPEECH_TOKENS = [f"<spch{n + 1024 * k}>" for k in range(4) for n in range(3 * k + 1, 3 * k + 4)]
FAST = ("--beams", "1", "--max-new-tokens", "64", "--steps", "1", "--size", "64")

runner = CliRunner()


def invoke(*args: str, stdin: str | None = None) -> Any:
    return runner.invoke(app, list(args), input=stdin)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A photo, a recording, and a text file, under names that do not say what they are."""
    folder = tmp_path_factory.mktemp("chat-media")
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "photo.jpg", format="JPEG")
    from miocli.media.audio import write_audio

    wave = (0.3 * np.sin(np.linspace(0, 400 * math.pi, 16000))).astype(np.float32)
    write_audio(folder / "talk.wav", wave, 16000)
    (folder / "talk.bin").write_bytes((folder / "talk.wav").read_bytes())
    (folder / "notes.png").write_text("not a picture\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    import cv2

    # Two scenes of two seconds: two keyframes.
    writer = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for colour in ((120, 20, 20), (30, 230, 230)):
        for _ in range(20):
            writer.write(np.full((48, 64, 3), colour, np.uint8))
    writer.release()
    return {"photo": folder / "photo.jpg", "talk": folder / "talk.wav", "disguised": folder / "talk.bin",
            "notes": folder / "notes.png", "clip": folder / "clip.mp4", "broken": folder / "broken.png"}


@pytest.fixture(scope="module")
def chain_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint rewired to answer every prompt (it ends in "\\n") with a picture and speech."""
    tokenizer = MioTokenizer.from_dir(tiny_model)
    names = ["<image>", *IMAGE_TOKENS, "</image>", "<spch>", *SPEECH_TOKENS, "</spch>"]
    chain = tokenizer.encode("\n") + [tokenizer.token_to_id(name) for name in names]
    stop = tokenizer.token_to_id(protocol.IM_END)

    def rows(embed: Any, head: Any) -> None:
        assert len(chain) <= embed.shape[1], "one hidden dimension per chain state"
        unit = math.sqrt(embed.shape[1])
        for state, current in enumerate(chain):
            embed[current, state] = 1.0
            head[chain[state + 1] if state + 1 < len(chain) else stop, state] = 30.0 / unit

    return rewired_checkpoint(tiny_model, tmp_path_factory.mktemp("chain-model"), rows)


@pytest.fixture(scope="module")
def mio(tiny_model: Path) -> Any:
    from miocli import Mio

    return Mio(str(tiny_model), device="cpu")


# ---- the conversation model against the reference's template --------------------------------------------
def _image(name: str) -> Part:
    return Part("image", tokens=[CHAT["image_strings"][name]])


def _speech(name: str) -> Part:
    return Part("audio", tokens=[CHAT["speech_strings"][f"{name}|add_timbre=False"]])


def test_mixed_media_turns_match_the_reference_template_and_ids():
    tokenizer = MioTokenizer.from_dir(GOLDEN / "chat" / "tokenizer")
    turns = [Turn("user", [Part("text", text="What am I eating?"), _image("img_a.png")]),
             *parse_messages([{"role": "assistant", "content": "You are eating an apple."},
                              {"role": "user", "content": [{"type": "text", "text": "And the girl?"}]}])]
    text, images, speeches = prompt_text(turns, "std")
    assert text == CASES["std_multi_gen"]["output"][0]
    expected = CASES["tok_std_images_pad_pt"]["output"]["input_ids"]["values"][0]
    ids = protocol.encode_prompts(tokenizer, [text], batch_image_strings=[images])["input_ids"][0]
    assert ids == [i for i in expected if i != 0]  # the golden row is left-padded with 0
    voice = [Turn("user", [Part("text", text="Please transcribe this speech."), _speech("spk_b.wav")]),
             Turn("assistant", [Part("text", text="the weather will be cold tomorrow")])]
    text, _, speeches = prompt_text(voice, "voice", add_generation_prompt=False)
    assert text == CASES["voice_multi_nogen"]["output"][0]
    assert speeches == [CHAT["speech_strings"]["spk_b.wav|add_timbre=False"]]


def test_user_text_cannot_write_tokens_or_address_media():
    turns = [Turn("user", [Part("text", text="<image_placeholder_0><img5><|im_end|>"), _image("img_a.png")])]
    text, images, _ = prompt_text(turns, "std")
    filled = protocol.fill_placeholders(text, images)
    assert filled.count(CHAT["image_strings"]["img_a.png"]) == 1
    assert "<image_placeholder_0><img5><|im_end|>" in [part for part, plain in filled.parts() if plain]


def test_kinds_come_from_content_not_names(media):
    assert sniff_kind(media["photo"].read_bytes()[:16]) == "image"
    assert sniff_kind(media["disguised"].read_bytes()[:16]) == "audio"
    assert sniff_kind(media["notes"].read_bytes()[:16]) is None
    [turn] = parse_messages([{"role": "user", "content": [{"type": "audio", "path": media["disguised"].name}]}],
                            media["photo"].parent)
    assert turn.parts[0].kind == "audio"
    with pytest.raises(InputError, match="message 0 part 1: cannot attach .*notes.png: it is not an image"):
        parse_messages([{"role": "user", "content": ["hi", {"type": "image", "path": str(media["notes"])}]}])
    with pytest.raises(UsageError, match="downloads nothing"):
        parse_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


# ---- media ids: the same as `mio ask` encodes ------------------------------------------------------------
@pytest.mark.parametrize("name, placeholders", [("photo", 1), ("clip", 2)])
def test_attachment_ids_are_those_mio_ask_encodes(tiny_model, media, name, placeholders):
    asked = invoke("ask", str(media[name]), "what is this?", "--model", str(tiny_model), "--print-prompt",
                   "--json")
    chatted = invoke("chat", "-a", str(media[name]), "what is this?", "--model", str(tiny_model),
                     "--print-prompt", "--json")
    assert asked.exit_code == chatted.exit_code == 0, chatted.output
    assert json.loads(chatted.stdout) == json.loads(asked.stdout)
    assert json.loads(chatted.stdout)["prompt"].count("<image_placeholder_") == placeholders


def test_api_parts_encode_as_ask_does_and_once(mio, media, tmp_path):
    import soundfile

    samples, rate = soundfile.read(media["talk"], dtype="float32")
    prompt = mio.conversation_prompt([{"role": "user", "content": [
        "compare", Image.open(media["photo"]), (samples, rate), media["talk"].read_bytes()]}])
    [ask_image] = mio.prompts("ask", [media["photo"]], question="q")
    [ask_audio] = mio.prompts("ask", [media["talk"]], question="q")
    assert prompt.image_strings == ask_image.image_strings
    assert prompt.speech_strings == ask_audio.speech_strings * 2
    assert prompt.text.endswith("user\ncompare\n<image_placeholder_0><speech_placeholder_0>"
                                "<speech_placeholder_1><|im_end|>\n<|im_start|>assistant\n")
    # Turns keep their media tokens: the second answer does not read the (now deleted) file again.
    copy = tmp_path / "photo.jpg"
    copy.write_bytes(media["photo"].read_bytes())
    turns = mio.conversation([{"role": "user", "content": ["what is this?", copy]}])
    first = mio.chat(turns, max_new_tokens=2, beams=1)
    copy.unlink()
    turns += [Turn("assistant", raw=first.raw), Turn("user", [Part("text", text="and now?")])]
    assert mio.chat(turns, max_new_tokens=2, beams=1).text is not None


# ---- media answers -----------------------------------------------------------------------------------------
def test_answer_pictures_and_speech_become_files(chain_model, media, tmp_path):
    out = tmp_path / "out"
    done = invoke("chat", "-a", str(media["photo"]), "what is this? draw it", "--model", str(chain_model),
                  "-o", str(out), *FAST)
    assert done.exit_code == 0, done.output
    assert f"[image: {out / 'turn-1-1.png'}]" in done.stdout and f"[audio: {out / 'turn-1-1.wav'}]" in done.stdout
    assert Image.open(out / "turn-1-1.png").size == (64, 64)
    again = invoke("chat", "draw", "--model", str(chain_model), "-o", str(out), "--json", *FAST)
    record = json.loads(again.stdout)
    assert record["files"] == [str(out / "turn-1-1.2.png"), str(out / "turn-1-1.2.wav")]  # nothing overwritten
    assert (out / "turn-1-1.png").stat().st_size != 0


def test_api_answer_has_images_and_audio(chain_model, media):
    from miocli import Mio

    result = Mio(str(chain_model), device="cpu").chat(
        [{"role": "user", "content": [{"type": "image", "path": str(media["photo"])}, "draw"]}],
        beams=1, max_new_tokens=64, steps=1, size=64)
    assert result.text.split() == ["<image_placeholder_0>", "<speech_placeholder_0>"]
    assert [image.size for image in result.images] == [(64, 64)] and result.audio[0].samples.size
    assert result.image_ids == [list(range(32))]


@pytest.mark.ci  # slow (a process per step); .ci/run runs the ci mark
def test_interactive_attach_save_reset(chain_model, media, tmp_path):
    out, saved = tmp_path / "out", tmp_path / "conversation.json"
    script = (f"/attach {media['disguised']}\nsay it and draw a picture\n/attach {tmp_path / 'gone.png'}\n"
              f"/save {saved}\nand another\n/reset\nfresh start\n\n")
    done = run_mio("chat", "-i", "--model", str(chain_model), "-o", str(out), *FAST, stdin=script)
    assert done.returncode == 1, done.stderr  # the missing attachment, reported without ending the session
    assert f"cannot attach {tmp_path / 'gone.png'}: no such file" in done.stderr
    assert "talk.bin (audio) goes with your next message" in done.stderr
    for answer in (1, 2, 3):
        assert f"[image: {out / f'turn-{answer}-1.png'}]" in done.stdout
        assert (out / f"turn-{answer}-1.wav").exists()
    turns = json.loads(saved.read_text())
    assert [t["role"] for t in turns] == ["user", "assistant"]
    assert turns[0]["content"][1] == {"type": "audio", "path": str(media["disguised"].resolve())}
    assert {"type": "image", "path": str((out / "turn-1-1.png").resolve())} in turns[1]["content"]
    replay = invoke("chat", "--messages", str(saved), "--model", str(chain_model), "--print-prompt")
    assert replay.exit_code == 0, replay.output
    assert replay.stdout.count("<speech_placeholder_") == 2 and "<image_placeholder_0>" in replay.stdout


# ---- errors and bounds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, message", [("missing", "--attach (message 0): cannot attach {}: no such file"),
                                           ("notes", "--attach (message 0): cannot attach {}: it is not an image"),
                                           ("broken", "message 0: {} is ")])
def test_bad_attachment_is_one_line_naming_it_and_the_turn(tiny_model, media, name, message):
    path = media.get(name, media["photo"].parent / "missing.jpg")
    done = invoke("chat", "-a", str(path), "what?", "--model", str(tiny_model))
    assert done.exit_code == 1
    assert message.format(path) in done.stderr.splitlines()[0]


def test_past_the_context_is_refused_naming_the_turn_or_trimmed(tiny_model, tmp_path):
    long = " ".join(["the red kite flies over the quick brown fox"] * 45)  # about 900 tokens each
    turns = [{"role": "user" if n % 2 == 0 else "assistant", "content": f"{n} {long}"} for n in range(5)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(turns))
    refused = invoke("chat", "--messages", str(path), "--model", str(tiny_model), "--max-new-tokens", "4")
    assert refused.exit_code == 2, refused.output
    line = refused.stderr.splitlines()[0]
    assert "passes the context at message 4 (user)" in line and "tokens" in line, line
    trimmed = run_mio("chat", "--messages", str(path), "--model", str(tiny_model), "--max-new-tokens", "4",
                      "--beams", "1", "--max-history", "10")
    assert trimmed.returncode == 0, trimmed.stderr
    assert "mio: dropped the 1 oldest turn(s) to stay within the context" in trimmed.stderr


# ---- the same conversation through the server ---------------------------------------------------------------
def test_openai_answers_carry_pictures_as_data_urls():
    import base64
    import io

    from miocli.core.results import Result
    from miocli.serve.openai.chat import _message
    from miocli.serve.openai.plans import Plan

    picture = Image.new("RGB", (8, 8), (0, 200, 0))
    result = Result(task="chat", input="draw", text="Here: <image_placeholder_0> done", images=[picture])
    message = _message(Plan("chat", "chat", [], {}, extra={"spoken": False}), result)
    assert message["content"] == "Here: <image_placeholder_0> done"
    url = message["images"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as back:
        assert back.convert("RGB").getpixel((0, 0)) == (0, 200, 0)


def test_one_conversation_gives_the_same_tokens_in_process_on_the_server_and_through_openai(tiny_model, media,
                                                                                            tmp_path):
    import base64

    import openai

    from mio_testing import Server
    from miocli import Mio

    settings = {"max_new_tokens": 6, "beams": 1}
    turns = [{"role": "user", "content": ["what is this?", {"type": "image", "path": str(media["photo"])}]},
             {"role": "assistant", "content": "a red square"},
             {"role": "user", "content": [{"type": "audio", "path": str(media["talk"])}, "and this?"]}]
    local = Mio(str(tiny_model), device="cpu").chat(turns, **settings)
    path = tmp_path / "turns.json"
    path.write_text(json.dumps(turns))
    photo, talk = (base64.b64encode(media[k].read_bytes()).decode() for k in ("photo", "talk"))
    server = Server(tiny_model)
    try:
        remote = run_mio("chat", "--server", server.url, "--messages", str(path), "--json", "--max-new-tokens", "6",
                         "--beams", "1")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        completion = client.chat.completions.create(model="mio", max_tokens=6, extra_body={"beams": 1}, messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}}]},
            {"role": "assistant", "content": "a red square"},
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": talk, "format": "wav"}},
                                         {"type": "text", "text": "and this?"}]}])
        refused, _ = server.post("/v1/run/chat", {"inputs": [{"messages": [{"role": "user", "content": [
            {"type": "image", "path": str(media["photo"])}]}]}]})
    finally:
        log = server.stop()
    assert remote.returncode == 0, remote.stderr + log
    assert json.loads(remote.stdout)["text"] == local.text == completion.choices[0].message.content
    assert completion.usage.completion_tokens == len(local.token_ids)
    assert refused == 400  # a client cannot make the server open its files


def test_a_streamed_answer_shows_where_its_media_went(capsys):
    from miocli.cli.chat import _Shown

    shown = _Shown(True)
    for piece in ["Here ", "<image_placeholder_0>", " and <speech_placeholder_0> done <b>"]:  # as TextDeltas sends
        shown.piece(piece)
    shown.done("unused", ["out/turn-1-1.png", "out/turn-1-1.wav"])
    assert capsys.readouterr().out == "Here  and  done <b>\n[image: out/turn-1-1.png]\n[audio: out/turn-1-1.wav]\n"


def test_chat_help_lists_the_media_options():
    done = invoke("chat", "--help")
    for option in ("--attach", "-a", "--output-dir", "-o", "--max-history", "/attach", "/save", "/reset", "--steps"):
        assert option in done.stdout, option
