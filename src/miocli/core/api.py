"""The Python API: one method per task, inputs and results in memory.

    from miocli import Mio
    mio = Mio("path/to/MIO-7B-Instruct", device="cpu")
    print(mio.caption("photo.jpg").text)
    mio.imagine("a red kite", seed=0).images[0].save("kite.png")
    print(mio.asr("talk.flac").text)
    for result in mio.stream("caption", paths, batch_size=8):   # each result as its batch is done
        print(result.input, result.text)

One input gives one `Result` (an unusable input raises its error); a list gives a list, in
which an unusable input is that result's `error`. Media may be paths, file bytes, PIL images,
numpy arrays (audio as `(samples, rate)` or with `rate=`). Components load on first use and
stay loaded for the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from miocli import protocol
from miocli.core.generation import GenerationOptions
from miocli.core.inputs import Example, Item, to_media
from miocli.core.mediatokens import PixelOptions
from miocli.core.pipeline import Engine
from miocli.core.prompts import Prompt, task_prompt_text
from miocli.core.results import Audio, Result, Step, StoryPart
from miocli.core.tasks import AUDIO, IMAGE, TASKS, VIDEO, Task
from miocli.errors import UsageError
from miocli.media.video import FrameOptions
from miocli.model.devices import RuntimeOptions
from miocli.model.runtime import Runtime

__all__ = ["Audio", "GenerationOptions", "Item", "Mio", "Result", "Step", "StoryPart"]


_OPTION_NAMES = {f.name for f in fields(GenerationOptions)}
_PIXEL_NAMES = {"steps", "guidance", "size"}
_FRAME_NAMES = {"max_frames", "uniform", "threshold"}


def _is_many(value: Any) -> bool:
    """A list of inputs (rather than one input that happens to be a sequence)."""
    if isinstance(value, (list, Iterator)):
        return True
    if isinstance(value, tuple):
        # (samples, rate) is one recording.
        return not (len(value) == 2 and isinstance(value[1], int) and hasattr(value[0], "shape"))
    return False


class Mio:
    """A MIO model folder plus device choices; components load on first use."""

    def __init__(
        self,
        model: str | None = None,
        *,
        variant: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "auto",
        verbose: bool = False,
        engine: str = "transformers",
        engine_url: str | None = None,
    ) -> None:
        """`engine`: "transformers" (default, reference-exact) or "vllm" (vLLM in this process); `engine_url`:
        a running `vllm serve` of the same checkpoint (docs/engines.md)."""
        self.runtime = Runtime(
            RuntimeOptions(model=model, variant=variant, device=device, dtype=dtype, quantize=quantize, verbose=verbose,
                           engine=engine, engine_url=engine_url)
        )
        self.engine = Engine(self.runtime)

    @property
    def variant(self) -> str:
        return self.runtime.variant

    # ---- the stream every task goes through -----------------------------------------------
    def stream(
        self,
        task: str,
        inputs: Iterable[Any],
        *,
        question: str | None = None,
        image: Any = None,
        rate: int | None = None,
        with_timbre: bool = False,
        examples: Sequence[tuple[Any, str]] = (),
        template: str | None = None,
        embeddings_only: bool = False,
        on_part: Callable[[int, StoryPart], None] | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        on_step: Callable[[str, int, int], None] | None = None,
        options: GenerationOptions | None = None,
        **settings: Any,
    ) -> Iterator[Result]:
        """Yield each input's Result as soon as its batch is generated and decoded, in input order.

        `task` is one of caption, ask, imagine, edit, asr, tts, speak, speech2speech, video_caption,
        video_gen, interleave, cot_visual, tokenize, detokenize, chat, generate. `inputs` may be any
        iterable, read lazily (memory holds one batch): media for the media tasks, text for the
        others, or `Item`s. `question` is the question of ask and the instruction of edit; `image`
        the picture a cot_visual question is about; `rate` the sample rate of bare audio arrays.
        Other keywords: generation options (seed, batch_size, max_new_tokens, beams, sample,
        temperature, top_p, repetition_penalty, constrain), pixels (steps, guidance, size) and
        video frames (max_frames, uniform, threshold).

        `on_tokens(index, ids)` sees an input's answer ids as they are generated (inputs of one prompt,
        without beam search); `cancelled(index)` is asked at every step and stops that input's
        generation once it says True. When every input of a batch is cancelled the stream raises
        `miocli.engines.base.Cancelled`. `on_step(label, done, total)` follows long work inside an
        input, e.g. ("denoising", 5, 20) for an image's diffusion steps.
        """
        from miocli.core import stream
        from miocli.core.steps import StreamSettings

        task = task.replace("-", "_")
        if task not in stream.API_TASKS:
            raise UsageError(f"unknown task {task!r}", hint=f"use one of {', '.join(stream.API_TASKS)}")
        options, pixel, frames = _settings(options, settings)
        if task == "interleave":
            # Images are decoded while the story is written: that needs one story at a time.
            options = _replace_options(options, batch_size=1)
        shots = [Example(to_media(media, f"example {n + 1}"), answer) for n, (media, answer) in enumerate(examples)]
        context = _ItemContext(question, image, rate, with_timbre)
        items = (self._item(task, value, n, context) for n, value in enumerate(inputs))
        run_settings = StreamSettings(options, pixel, frames, shots, template, on_part, embeddings_only,
                                      on_tokens, cancelled, on_step)
        return stream.run(self, task, items, run_settings)

    def check_settings(self, task: str, settings: dict[str, Any], template: str | None = None) -> None:
        """UsageError for an unknown task or setting, or a bad value, without loading or running anything."""
        from miocli.core import stream

        task = task.replace("-", "_")
        if task not in stream.API_TASKS:
            raise UsageError(f"unknown task {task!r}", hint=f"use one of {', '.join(stream.API_TASKS)}")
        try:
            _settings(None, dict(settings))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"a setting has the wrong type ({exc})") from None
        if template is not None and ("{media}" not in template or "{instruction}" not in template):
            raise UsageError("the template needs both {media} and {instruction}")

    def _item(self, task: str, value: Any, index: int, context: _ItemContext) -> Item:
        if isinstance(value, Item):
            return value
        if task in _TEXT_TASKS:
            field = _TEXT_TASKS[task]
            if not isinstance(value, str):
                raise UsageError(f"input {index + 1}: `{task}` takes text, not {type(value).__name__}")
            if task == "generate":
                return Item(value, prompt=self.raw_prompt(value))
            _require_text(value, field)
            media = [to_media(context.image, "image", IMAGE)] if task == "cot_visual" and context.image is not None \
                else []
            return Item(value, {field: value}, media)
        media = to_media(value, f"input {index + 1}", _MEDIA_KIND.get(task), context.rate)
        fields = {}
        if context.question is not None:
            # ask's image and video templates say {question}, its audio template {instruction}.
            fields = {"question": context.question, "instruction": context.question}
        return Item(media.name, fields, [media], with_timbre=context.with_timbre)

    # ---- one method per task ----------------------------------------------------------------
    def _one_or_many(self, task: str, inputs: Any, **settings: Any) -> Result | list[Result]:
        if _is_many(inputs):
            return list(self.stream(task, inputs, **settings))
        [result] = list(self.stream(task, [inputs], **settings))
        return result.raise_for_error()

    def caption(self, images: Any, **settings: Any) -> Any:
        """Describe image(s). `examples=[(image, answer), …]` adds solved examples first."""
        return self._one_or_many("caption", images, **settings)

    def ask(self, media: Any, question: str, **settings: Any) -> Any:
        """Ask about an image, a recording or a video (by extension, or by the bytes' signature)."""
        _require_text(question, "question")
        return self._one_or_many("ask", media, question=question, **settings)

    def imagine(self, prompts: Any, *, n: int = 1, **settings: Any) -> Any:
        """Image(s) from text: each result's `.images[0]` is a PIL image. With `n` > 1, n samples per
        prompt (sampling on unless `sample=False`), as one list in prompt order."""
        if n < 1:
            raise UsageError("n must be at least 1")
        if n > 1:
            settings.setdefault("sample", True)
            texts = list(prompts) if _is_many(prompts) else [prompts]
            items = [Item(t, {"caption": t}, sample=k) for t in texts for k in range(n)]
            return list(self.stream("imagine", items, **settings))
        return self._one_or_many("imagine", prompts, **settings)

    def edit(self, images: Any, instruction: str, **settings: Any) -> Any:
        _require_text(instruction, "instruction")
        return self._one_or_many("edit", images, question=instruction, **settings)

    def asr(self, audio: Any, **settings: Any) -> Any:
        """Transcribe recording(s); long ones are split on silences and the texts joined."""
        return self._one_or_many("asr", audio, **settings)

    def tts(self, texts: Any, **settings: Any) -> Any:
        """Speech for text: each result's `.audio[0]` has `.samples`, `.rate` and `.save(path)`."""
        return self._one_or_many("tts", texts, **settings)

    def speak(self, questions: Any, **settings: Any) -> Any:
        """A spoken answer (voice mode)."""
        return self._one_or_many("speak", questions, **settings)

    def speech2speech(self, audio: Any, **settings: Any) -> Any:
        return self._one_or_many("speech2speech", audio, **settings)

    def video_caption(self, videos: Any, **settings: Any) -> Any:
        return self._one_or_many("video_caption", videos, **settings)

    def video_gen(self, descriptions: Any, **settings: Any) -> Any:
        """Keyframes from a description: `.images` are the frames; `.save_video(path, fps)` makes an mp4."""
        return self._one_or_many("video_gen", descriptions, **settings)

    def interleave(self, topics: Any, **settings: Any) -> Any:
        """A visual story: `.parts` are text, images and recordings in reading order."""
        return self._one_or_many("interleave", topics, **settings)

    def cot_visual(self, questions: Any, image: Any = None, **settings: Any) -> Any:
        """Chain of visual thought: `.steps` are the drawing and the answer; `.text` is the answer."""
        return self._one_or_many("cot_visual", questions, image=image, **settings)

    def tokenize(self, media: Any, *, with_timbre: bool = False, **settings: Any) -> Any:
        """Media as token strings (`.text`) and ids (`.image_ids` / `.speech_codes`); no LLM."""
        return self._one_or_many("tokenize", media, with_timbre=with_timbre, **settings)

    def detokenize(self, tokens: Any, **settings: Any) -> Any:
        """Token strings back to `.images` and `.audio` (or `.embeddings` with embeddings_only=True)."""
        return self._one_or_many("detokenize", tokens, **settings)

    def chat(
        self,
        messages: Any,
        *,
        mode: str = "std",
        system: str | None = None,
        add_generation_prompt: bool = True,
        options: GenerationOptions | None = None,
        on_text: Callable[[str], None] | None = None,
        max_history: int | None = None,
        **settings: Any,
    ) -> Result:
        """Answer a question or continue a conversation (Instruct model).

        `messages`: a question, or `[{"role", "content"}, …]` whose contents are text or parts in order:
        text (a str is always text), `Path`s, PIL images, `(samples, rate)`, file bytes, OpenAI parts
        (`image_url`, `input_audio`) or `{"type": "image" | "audio" | "video", "path": …}`
        (miocli.core.conversation). Pass
        `conversation.Turn`s to keep each turn's media tokens from one call to the next. The result's
        `text` has a placeholder where the answer holds a picture or speech, decoded in `.images` and
        `.audio`. `on_text` gets the answer's text in pieces as it is generated (with one beam); the
        pieces joined are the result's `text`. A conversation past the context is refused
        (UsageError), or with `max_history` loses its oldest turns (at most that many kept before the last).
        """
        from miocli.core import chatrun
        from miocli.core.deltas import TextDeltas
        from miocli.core.steps import encode_conversation

        self._require_instruct("chat")
        turns = self.conversation(messages, mode=mode, system=system)
        options, _, frames = _settings(options, dict(settings))
        encode_conversation(self, turns, frames)
        deltas = TextDeltas(self.runtime.tokenizer.decode) if on_text is not None else None

        def watch(_index: int, ids: list[int]) -> None:
            if deltas is not None and on_text is not None and (piece := deltas.push(ids)):
                on_text(piece)

        result, _ = chatrun.answer(self, turns, mode, add_generation_prompt=add_generation_prompt, options=options,
                                   max_history=max_history,
                                   on_tokens=watch if deltas is not None else None,
                                   settings={k: v for k, v in settings.items() if k not in _OPTION_NAMES})
        if deltas is not None and on_text is not None and result.error is None and (rest := deltas.finish(result.text)):
            on_text(rest)
        return result.raise_for_error()

    def conversation(self, messages: Any, *, mode: str = "std", system: str | None = None,
                     base: Any = None, files: bool = True) -> list[Any]:
        """The conversation as `conversation.Turn`s (Turns given stay the same objects, their tokens kept);
        relative paths in it are read from the folder `base`; without `files` no part may name a file."""
        from miocli.core.conversation import Part, Turn, parse_messages

        if mode not in protocol.MODES:
            raise UsageError(f"unknown mode {mode!r}", hint="use std, voice or custom")
        if isinstance(messages, str) and not messages.strip():
            raise UsageError("the question is empty", hint="give the text to ask, or --messages FILE")
        turns = parse_messages(messages, base, files=files)
        if system is not None:
            if mode != "custom":
                raise UsageError("--system needs --mode custom")
            turns = [Turn("system", [Part("text", text=system)]), *[t for t in turns if t.role != "system"]]
        if not any(t.role == "user" for t in turns):
            raise UsageError("the conversation has no user turn")
        return turns

    def generate(self, prompts: str | Sequence[str], options: GenerationOptions | None = None,
                 **settings: Any) -> list[Result]:
        """Continue raw text prompts (no chat template; meant for the Base model)."""
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        return list(self.stream("generate", items, options=options, **settings))

    # ---- prompts ---------------------------------------------------------------------------
    def chat_prompt(
        self,
        messages: Any,
        *,
        mode: str = "std",
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The exact prompt text of a conversation (BOS and chat template included, media as placeholders)."""
        return self.conversation_prompt(messages, mode=mode, system=system,
                                        add_generation_prompt=add_generation_prompt).text

    def conversation_prompt(self, messages: Any, *, mode: str = "std", system: str | None = None,
                            add_generation_prompt: bool = True, **settings: Any) -> Prompt:
        """The conversation's prompt, placeholders kept, with the token strings of its media (encoded here,
        no LLM loaded)."""
        from miocli.core import conversation
        from miocli.core.steps import encode_conversation

        turns = self.conversation(messages, mode=mode, system=system)
        _, _, frames = _settings(None, dict(settings))
        encode_conversation(self, turns, frames)
        text, images, speeches = conversation.prompt_text(turns, mode, add_generation_prompt)
        return Prompt(text, images, speeches)

    def raw_prompt(self, text: str) -> str:
        if not text.strip():
            raise UsageError("the prompt is empty", hint="give the text to continue")
        return text if text.startswith(protocol.BOS) else protocol.BOS + text

    def task_prompt(self, task: str | Task, fields: dict[str, str], media_count: int = 0) -> str:
        task = TASKS[task] if isinstance(task, str) else task
        return task_prompt_text(task, self.variant, fields, media_count)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.engine.encode([prompt])[0]

    def prompts(self, task: str, inputs: Iterable[Any], *, question: str | None = None, image: Any = None,
                examples: Sequence[tuple[Any, str]] = (), template: str | None = None,
                options: GenerationOptions | None = None, **settings: Any) -> Iterator[Prompt]:
        """The exact prompt(s) each input would get, media encoded, without loading the LLM
        (`--print-prompt`). A recording too long for one prompt gives one prompt per part."""
        from miocli.core.steps import Run, StreamSettings

        task = task.replace("-", "_")
        options, pixel, frames = _settings(options, settings)
        shots = [Example(to_media(media, f"example {n + 1}"), answer) for n, (media, answer) in enumerate(examples)]
        run = Run(self, task, StreamSettings(options, pixel, frames, shots, template))
        context = _ItemContext(question, image, None, False)
        for index, value in enumerate(inputs):
            yield from run.prompts_of(index, self._item(task, value, index, context))

    # ---- generation without media decoding ---------------------------------------------------
    def run(
        self,
        task: str | Task,
        prompts: Sequence[Prompt],
        options: GenerationOptions | None = None,
        on_batch_done: Callable[[int], None] | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Result]:
        """Generate for ready prompts; `on_tokens(n, ids)` watches prompt n's ids as they come (without
        beam search).

        The results carry text and media ids (`image_ids`, `speech_codes`), not decoded media.
        """
        task = TASKS[task] if isinstance(task, str) else task
        options = options or GenerationOptions()
        generated = self.engine.run(
            task, prompts, overrides=options.overrides(), batch_size=options.batch_size, seed=options.seed,
            constrain=options.constrain, on_batch_done=on_batch_done, on_tokens=on_tokens,
        )
        from miocli.core.steps import joined_result

        return [joined_result(task.name, f"prompt {n + 1}", n, [g]) for n, g in enumerate(generated)]

    def _require_instruct(self, command: str) -> None:
        if self.variant == "base":
            from miocli.core.tasks import raise_variant_error

            raise_variant_error(command, "Instruct")


# The prompt field each text task's input fills.
_TEXT_TASKS = {"imagine": "caption", "tts": "text", "speak": "question", "video_gen": "description",
               "interleave": "topic", "cot_visual": "question", "detokenize": "tokens", "chat": "question",
               "generate": "question"}
_MEDIA_KIND = {"caption": IMAGE, "edit": IMAGE, "asr": AUDIO, "speech2speech": AUDIO, "video_caption": VIDEO}


@dataclass(frozen=True)
class _ItemContext:
    """What every input of one call shares."""

    question: str | None
    image: Any
    rate: int | None
    with_timbre: bool


def _settings(options: GenerationOptions | None, settings: dict[str, Any]) -> tuple[
        GenerationOptions, PixelOptions, FrameOptions]:
    """Generation options, pixel and frame settings from keyword arguments (unknown ones refused)."""
    unknown = sorted(set(settings) - _OPTION_NAMES - _PIXEL_NAMES - _FRAME_NAMES)
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(unknown)}")
    options = _replace_options(options or GenerationOptions(), **{k: v for k, v in settings.items()
                                                                 if k in _OPTION_NAMES})
    options.overrides().validate()
    pixel = PixelOptions(**{k: v for k, v in settings.items() if k in _PIXEL_NAMES}, seed=options.seed)
    frames = FrameOptions(**{k: v for k, v in settings.items() if k in _FRAME_NAMES})
    return options, pixel, frames


def _replace_options(options: GenerationOptions, **changes: Any) -> GenerationOptions:
    from dataclasses import replace

    return replace(options, **changes) if changes else options


def _require_text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"the {what} is empty")
