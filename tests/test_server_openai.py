"""The OpenAI-compatible endpoints of `mio serve`: a real server process, driven by the official client.

Every answer is checked against what the in-process API gives for the same input, seed and
settings: the server is a translation layer and must not change a token or a pixel.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from mio_testing import Server, one_torch_thread  # noqa: F401 (autouse fixture)
from miocli import Mio
from miocli.core.prompts import Prompt

openai = pytest.importorskip("openai")

# Small enough for a second per request on the tiny model; image tasks need 34 new tokens, speech 6.
TEXT = {"max_new_tokens": 8, "beams": 1, "seed": 0}
PIXELS = {"max_new_tokens": 40, "beams": 1, "seed": 0, "steps": 2}
SPEECH = {"max_new_tokens": 12, "seed": 0}


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[str]:
    """`mio serve` on the tiny model, on a free loopback port, stopped with SIGTERM at the end."""
    # One torch thread: the tiny model's ops are too small to gain from more on a shared machine.
    running = Server(tiny_model, env={"OMP_NUM_THREADS": "1"})
    try:
        yield running.url
    finally:
        log = running.stop()
    # After the yield, so that a failing test still stops the server first.
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def mio(tiny_model: Path) -> Mio:
    return Mio(str(tiny_model), device="cpu")


def png_bytes(seed: int = 0) -> bytes:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decoded_png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def chat(client: Any, messages: Any, **kwargs: Any) -> Any:
    extra = {"beams": TEXT["beams"], **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(model="mio", messages=messages, max_tokens=TEXT["max_new_tokens"],
                                          seed=TEXT["seed"], extra_body=extra, **kwargs)


def post(server: str, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    request = urllib.request.Request(f"{server}{path}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---- models and chat ----------------------------------------------------------------------------------
def test_models_lists_the_served_model(client: Any):
    assert [model.id for model in client.models.list()] == ["mio"]


def test_chat_completion_is_the_in_process_chat(client: Any, mio: Mio):
    completion = chat(client, [{"role": "user", "content": "Hello there"}])
    expected = mio.chat("Hello there", **TEXT)
    [choice] = completion.choices
    assert completion.object == "chat.completion" and completion.model == "mio"
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    # Random weights never stop early: the answer fills its 8 tokens.
    assert choice.finish_reason == "length"
    prompt_tokens = len(mio.prompt_ids(Prompt(mio.chat_prompt("Hello there"))))
    assert completion.usage.completion_tokens == len(expected.token_ids) == 8
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.total_tokens == prompt_tokens + 8


def test_chat_keeps_conversation_system_message_and_sampling(client: Any, mio: Mio):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "a kite?"}]}]
    completion = chat(client, messages, temperature=0.8, top_p=0.9, extra_body={"repetition_penalty": 1.1})
    expected = mio.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "What is\na kite?"}], mode="custom", system="You are terse.",
                        sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1, **TEXT)
    assert completion.choices[0].message.content == expected.text


def test_chat_stream_sends_role_first_then_the_text_then_finish_reason(client: Any, mio: Mio):
    chunks = list(chat(client, [{"role": "user", "content": "Hello there"}], stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == mio.chat("Hello there", **TEXT).text
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_concurrent_chats_each_get_their_in_process_answer(client: Any, mio: Mio):
    questions = ["Hello there", "What is in this picture?", "The quick brown fox"]
    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(lambda q: chat(client, [{"role": "user", "content": q}]), questions))
    assert [a.choices[0].message.content for a in answers] == [mio.chat(q, **TEXT).text for q in questions]


def test_chat_with_an_image_data_url_asks_about_it(client: Any, mio: Mio):
    image = png_bytes(1)
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    completion = chat(client, [{"role": "user", "content": parts}])
    assert completion.choices[0].message.content == mio.ask(image, "What is this?", **TEXT).text
    alone = chat(client, [{"role": "user", "content": parts[1:]}])
    assert alone.choices[0].message.content == mio.caption(image, **TEXT).text


def test_chat_with_input_audio_asks_about_it_or_transcribes_it(client: Any, mio: Mio):
    recording = wav_bytes()
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(recording).decode(),
                                                         "format": "wav"}}
    completion = chat(client, [{"role": "user", "content": [audio_part, {"type": "text", "text": "Who speaks?"}]}])
    assert completion.choices[0].message.content == mio.ask(recording, "Who speaks?", **TEXT).text
    alone = chat(client, [{"role": "user", "content": [audio_part]}])
    assert alone.choices[0].message.content == mio.asr(recording, **TEXT).text


def test_spoken_answer_comes_as_message_audio(client: Any, mio: Mio):
    completion = client.chat.completions.create(
        model="mio", messages=[{"role": "user", "content": "Hello there"}], modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"}, max_tokens=SPEECH["max_new_tokens"], seed=SPEECH["seed"])
    expected = mio.speak("Hello there", **SPEECH)
    message = completion.choices[0].message
    assert message.content is None and message.audio.id.startswith("audio_")
    assert base64.b64decode(message.audio.data) == expected.audio[0].to_bytes("wav")
    assert message.audio.transcript == expected.text.replace("<speech_placeholder_0>", "").strip()
    assert message.audio.expires_at > time.time()

    recording = wav_bytes(0.5)
    answer = client.chat.completions.create(
        model="mio", modalities=["text", "audio"], audio={"voice": "alloy", "format": "flac"},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(recording).decode(), "format": "wav"}}]}],
        max_tokens=SPEECH["max_new_tokens"], seed=SPEECH["seed"])
    spoken = base64.b64decode(answer.choices[0].message.audio.data)
    assert spoken == mio.speech2speech(recording, **SPEECH).audio[0].to_bytes("flac")


# ---- images -----------------------------------------------------------------------------------------
def test_images_generate_gives_the_in_process_pixels(client: Any, mio: Mio):
    response = client.images.generate(model="mio", prompt="a red kite", size="64x64", response_format="b64_json",
                                      extra_body=PIXELS)
    expected = mio.imagine("a red kite", size=64, **PIXELS).images[0]
    [image] = response.data
    assert np.array_equal(decoded_png(image.b64_json), np.asarray(expected))
    two = client.images.generate(model="mio", prompt="a red kite", size="64x64", n=2, extra_body=PIXELS)
    # The server decodes a request's images in one batch; a batch's float rounding differs from
    # one-by-one decoding by a unit in a few pixels, so the same batch is compared.
    samples = mio.imagine("a red kite", n=2, size=64, batch_size=2, **PIXELS)
    assert [r.image_ids for r in samples] == [r.image_ids for r in mio.imagine("a red kite", n=2, size=64, **PIXELS)]
    assert [decoded_png(d.b64_json).tobytes() for d in two.data] == [np.asarray(r.images[0]).tobytes()
                                                                      for r in samples]


def test_images_edit_gives_the_in_process_pixels(client: Any, mio: Mio):
    picture = png_bytes(2)
    response = client.images.edit(model="mio", image=("picture.png", picture, "image/png"), prompt="make it red",
                                  size="64x64", extra_body=PIXELS)
    expected = mio.edit(picture, "make it red", size=64, **PIXELS).images[0]
    assert np.array_equal(decoded_png(response.data[0].b64_json), np.asarray(expected))


# ---- audio ------------------------------------------------------------------------------------------
def test_transcriptions_in_every_response_format(client: Any, mio: Mio):
    recording = wav_bytes()
    expected = mio.asr(recording, **TEXT).text
    upload = ("talk.wav", recording, "audio/wav")
    as_json = client.audio.transcriptions.create(model="mio", file=upload, extra_body=TEXT)
    as_text = client.audio.transcriptions.create(model="mio", file=upload, response_format="text", extra_body=TEXT)
    verbose = client.audio.transcriptions.create(model="mio", file=upload, response_format="verbose_json",
                                                 language="en", extra_body=TEXT)
    assert as_json.text == verbose.text == expected
    assert as_text == expected
    assert verbose.duration == pytest.approx(1.0) and verbose.language == "en"
    # One segment: the recording fits one prompt, and MIO's transcripts carry no finer times.
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, pytest.approx(1.0), expected.strip())]
    srt = client.audio.transcriptions.create(model="mio", file=upload, response_format="srt", extra_body=TEXT)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,000\n")
    vtt = client.audio.transcriptions.create(model="mio", file=upload, response_format="vtt", extra_body=TEXT)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n")


def test_speech_is_the_in_process_recording(client: Any, mio: Mio):
    expected = mio.tts("hello there", **SPEECH).audio[0]
    wav = client.audio.speech.create(model="mio", voice="alloy", input="hello there", response_format="wav",
                                     extra_body=SPEECH)
    assert wav.response.headers["content-type"] == "audio/wav" and wav.content == expected.to_bytes("wav")
    flac = client.audio.speech.create(model="mio", voice="alloy", input="hello there", response_format="flac",
                                      extra_body=SPEECH)
    assert flac.response.headers["content-type"] == "audio/flac" and flac.content == expected.to_bytes("flac")


# ---- errors -----------------------------------------------------------------------------------------
def chat_body(**changes: Any) -> bytes:
    return json.dumps({"model": "mio", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                       **changes}).encode()


def image_part(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", b'{"model": "mio", "messages": [', 400, "not valid JSON"),
    "a JSON list": ("/v1/chat/completions", b"[]", 400, "JSON object"),
    "no messages": ("/v1/chat/completions", b'{"model": "mio"}', 400, "'messages'"),
    "no model": ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode(),
                 400, "'model'"),
    "n above 1": ("/v1/chat/completions", chat_body(n=2), 400, "'n' must be 1"),
    "an http image": ("/v1/chat/completions", chat_body(messages=image_part("https://example.com/a.png")), 400,
                      "downloads nothing"),
    "a corrupt image": ("/v1/chat/completions", chat_body(messages=image_part(data_url(b"not a picture"))), 400,
                        "image 1"),
    "an image in a system message": ("/v1/chat/completions", chat_body(messages=[
        {"role": "system", "content": image_part(data_url(png_bytes()))[0]["content"]},
        {"role": "user", "content": "Hi"}]), 400, "system message holds text only"),
    "an earlier spoken answer by id": ("/v1/chat/completions", chat_body(messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "audio": {"id": "audio_1"}},
        {"role": "user", "content": "And?"}]), 400, "keeps no audio"),
    "bad base64": ("/v1/chat/completions", chat_body(messages=image_part("data:image/png;base64,@@@")), 400,
                   "not valid base64"),
    "a tool role": ("/v1/chat/completions", chat_body(messages=[{"role": "tool", "content": "x"}]), 400, "role"),
    "tools": ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
              "'tools'"),
    "an unknown argument": ("/v1/chat/completions", chat_body(frobnicate=1), 400, "frobnicate"),
    "a negative seed": ("/v1/chat/completions", chat_body(seed=-1), 400, "seed must be a whole number from 0"),
    "a text seed": ("/v1/chat/completions", chat_body(seed="zero"), 400, "'seed'"),
    "zero max_tokens": ("/v1/chat/completions", chat_body(max_tokens=0), 400, "'max_tokens': integer below minimum"),
    "a text max_tokens": ("/v1/chat/completions", chat_body(max_tokens="5"), 400,
                          "invalid type for 'max_tokens': expected an integer"),
    "a text seed number": ("/v1/chat/completions", chat_body(seed="7"), 400, "invalid type for 'seed'"),
    "temperature above 2": ("/v1/chat/completions", chat_body(temperature=3.5), 400,
                            "'temperature': decimal above maximum value"),
    "max_tokens past the context": ("/v1/chat/completions", chat_body(max_tokens=10_000_000), 400,
                                    "the model's context"),
    # Refused from its size alone, before it is templated or tokenized.
    "a conversation past the context": ("/v1/chat/completions", chat_body(messages=[
        {"role": "user", "content": "word " * 20_000}]), 400, "the model reads at most"),
    "a text image count": ("/v1/images/generations", b'{"prompt": "a kite", "n": "2"}', 400, "invalid type for 'n'"),
    "huge beams": ("/v1/chat/completions", chat_body(beams=500), 400, "'beams': integer above maximum"),
    "top_p above 1": ("/v1/chat/completions", chat_body(top_p=1.5), 400, "'top_p': decimal above maximum"),
    "too few tokens to speak": ("/v1/chat/completions", chat_body(modalities=["text", "audio"], max_tokens=2), 400,
                                "max_tokens 2 is too small"),
    "a non-square size": ("/v1/images/generations", b'{"prompt": "a kite", "size": "64x32"}', 400, "not square"),
    "an odd size": ("/v1/images/generations", b'{"prompt": "a kite", "size": "72x72"}', 400, "multiple of 64"),
    "url images": ("/v1/images/generations", b'{"prompt": "a kite", "response_format": "url"}', 400, "b64_json"),
    "too few image tokens": ("/v1/images/generations", b'{"prompt": "a kite", "max_new_tokens": 8}', 400,
                             "too small"),
    "odd modalities": ("/v1/chat/completions", chat_body(modalities=[{"text": 1}]), 400, "'modalities[0]'"),
    "a text part without text": ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": ["Hi"]}]}]), 400, "needs its text"),
    "a listed speech format": ("/v1/audio/speech", b'{"model": "mio", "input": "hi", "response_format": []}', 400,
                               "supported values"),
    "mp3 speech": ("/v1/audio/speech", b'{"model": "mio", "input": "hi", "response_format": "mp3"}', 400,
                   "'wav'"),
    "empty speech": ("/v1/audio/speech", b'{"model": "mio", "input": " "}', 400, "empty"),
    "a JSON upload": ("/v1/audio/transcriptions", b'{"model": "mio"}', 415, "multipart"),
    "an unknown route": ("/v1/embeddings", b"{}", 404, "Not Found"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_openai_shaped_4xx_errors(server: str, case: str):
    path, body, status, words = BAD_REQUESTS[case]
    got, raw = post(server, path, body)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
    assert error["type"] == "invalid_request_error" and "Traceback" not in raw.decode()


ERROR_CODES = {"a text max_tokens": "invalid_type", "temperature above 2": "decimal_above_max_value",
               "max_tokens past the context": "integer_above_max_value", "an unknown argument": "unknown_parameter",
               "no model": "missing_required_parameter", "a negative seed": "invalid_value",
               "a conversation past the context": "context_length_exceeded"}


@pytest.mark.parametrize("case", ERROR_CODES, ids=list(ERROR_CODES))
def test_errors_carry_openai_codes_not_class_names(server: str, case: str):
    path, body, _status, _words = BAD_REQUESTS[case]
    assert json.loads(post(server, path, body)[1])["error"]["code"] == ERROR_CODES[case]


def test_models_retrieve_names_the_served_model_and_404s_others(client: Any):
    assert client.models.retrieve("mio").id == "mio"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_the_client_sees_bad_uploads_as_bad_requests(client: Any):
    with pytest.raises(openai.BadRequestError, match="not square"):
        client.images.generate(model="mio", prompt="a kite", size="64x32")
    # A streamed answer is awaited before the stream starts, so a bad input is still a plain 400.
    with pytest.raises(openai.BadRequestError, match="image 1"):
        chat(client, image_part(data_url(b"not a picture")), stream=True)
    with pytest.raises(openai.BadRequestError, match="talk.wav"):
        client.audio.transcriptions.create(model="mio", file=("talk.wav", b"RIFF0000WAVEjunk", "audio/wav"))
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.transcriptions.create(model="mio", file=("talk.wav", wav_bytes(), "audio/wav"),
                                           response_format="diarized_json")
    with pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(model="mio", image=("p.png", png_bytes(), "image/png"), mask=("m.png", png_bytes()),
                           prompt="red")


def test_finish_reason_is_length_when_the_limit_or_the_context_is_reached():
    from miocli.core.results import Result
    from miocli.serve.openai.chat import _finish_reason
    from miocli.serve.openai.plans import Plan

    plan = Plan("chat", "chat", [], {}, max_new_tokens=100)
    answer = Result("chat", "q", token_ids=list(range(90)))
    assert _finish_reason(plan, answer, prompt_tokens=10, context=4096) == "stop"
    assert _finish_reason(plan, answer, prompt_tokens=10, context=100) == "length"
    # Without the prompt's length (it held media) only the token limit tells.
    assert _finish_reason(plan, answer, prompt_tokens=0, context=100) == "stop"
    assert _finish_reason(Plan("chat", "chat", [], {}, max_new_tokens=90), answer, 0, None) == "length"
