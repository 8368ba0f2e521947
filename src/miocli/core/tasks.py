"""The task table: each task is data — prompts, mode, preset, inputs, outputs (MIO_PROTOCOL §7–§8).

Prompt templates take named fields (`{question}`, `{text}`, …) and `{media}`, which becomes one
placeholder per input image, frame or recording. A Base template of None means the task has
no Base prompt in the reference and needs the Instruct model.
"""

from __future__ import annotations

from dataclasses import dataclass

from miocli import protocol
from miocli.model import checkpoint

IMAGE, AUDIO, VIDEO = "image", "audio", "video"
TEXT_OUT, IMAGE_OUT, SPEECH_OUT, MIXED_OUT = "text", "image", "speech", "mixed"


@dataclass(frozen=True)
class Task:
    name: str
    instruct: str | None
    base: str | None
    mode: str = "std"
    preset: str = "text"
    media: str | None = None
    output: str = TEXT_OUT
    force_open: str | None = None
    prefill: str = ""

    def components(self) -> set[str]:
        needed = {checkpoint.LLM}
        if self.media in (IMAGE, VIDEO):
            needed.add(checkpoint.SEED)
        if self.media == AUDIO:
            needed.add(checkpoint.SPEECH)
        if self.output in (IMAGE_OUT, MIXED_OUT):
            needed |= {checkpoint.SEED, checkpoint.UNCLIP}
        if self.output in (SPEECH_OUT, MIXED_OUT) and self.mode == "voice":
            needed.add(checkpoint.SPEECH)
        return needed

    def template(self, variant: str) -> str:
        template = self.base if variant == "base" else self.instruct
        if template is None:
            other = "Instruct" if variant == "base" else "Base"
            raise_variant_error(self.name, other)
        return template


def raise_variant_error(task: str, needed: str) -> None:
    from miocli.errors import ModelError

    model_id = checkpoint.INSTRUCT_ID if needed == "Instruct" else checkpoint.BASE_ID
    raise ModelError(
        f"`mio {task}` needs the {needed} model",
        hint=f"pass --model {model_id} (or a local {needed} folder), or --variant {needed.lower()} "
        "if the folder was detected wrongly",
    )


COT_DRAW_REQUEST = "Before answering, draw an image that illustrates the reasoning."

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("chat", "{question}", None),
        Task("generate", None, "{question}"),
        Task("base-text", None, "Question: {question} Answer:"),
        Task("caption", "Please provide an accurate and detailed description of this image.\n{media}",
             "{media} The caption of this image is", media=IMAGE),
        Task("ask-image", "{question}\n{media}", None, media=IMAGE),
        Task("imagine", "Please generate an image according to the caption.\n{caption}",
             "Please generate an image of ``{caption}''", preset="image", output=IMAGE_OUT,
             force_open=protocol.IMAGE_BEGIN),
        Task("edit", "{media}\n{instruction}", None, preset="image", media=IMAGE, output=IMAGE_OUT,
             prefill=protocol.IMAGE_BEGIN),
        Task("asr", "Please transcribe this speech.\n{media}", "{media} The transcription of this speech is",
             media=AUDIO),
        Task("ask-audio", "{media}\n{instruction}", None, media=AUDIO),
        Task("tts", "The transcription is ``{text}''. Please generate a speech according to the given "
             "transcription. Start with <spch>.", "Please generate a speech of ``{text}'': <spch>",
             mode="voice", preset="tts", output=SPEECH_OUT, force_open=protocol.SPEECH_BEGIN),
        Task("speak", "{question}", None, mode="voice", preset="spoken", output=SPEECH_OUT,
             force_open=protocol.SPEECH_BEGIN),
        Task("speech2speech", "{media}", None, mode="voice", preset="s2s", media=AUDIO, output=SPEECH_OUT,
             force_open=protocol.SPEECH_BEGIN),
        Task("video-caption", "Please describe the following video.\n{media}",
             "Please describe the following video: {media}", media=VIDEO),
        Task("ask-video", "{question}\n{media}", None, media=VIDEO),
        Task("video-gen", "Please generate a video for ``{description}''", None, preset="video_gen",
             output=IMAGE_OUT, force_open=protocol.IMAGE_BEGIN),
        Task("interleave", "Generate a visual story about {topic}.", None, preset="interleave", output=MIXED_OUT),
        # Chain of visual thought has no prompt in the reference. Stage one follows the lmms-eval
        # wrapper's shape (image first, then the text; the answer pre-filled with <image>); stage
        # two is the image question with the given and the drawn image in context.
        Task("cot-draw", f"{{media}}\n{{question}}\n{COT_DRAW_REQUEST}", None, preset="image", media=IMAGE,
             output=IMAGE_OUT, prefill=protocol.IMAGE_BEGIN),
        Task("cot-draw-text", f"{{question}}\n{COT_DRAW_REQUEST}", None, preset="image", output=IMAGE_OUT,
             prefill=protocol.IMAGE_BEGIN),
        Task("cot-answer", "{media}\n{question}", None, media=IMAGE),
    ]
}


def media_placeholders(kind: str | None, count: int, start: int = 0) -> str:
    """Placeholders number `start`..`start + count - 1`: earlier turns of a prompt may hold media too."""
    if kind == AUDIO:
        return "".join(protocol.speech_placeholder(i) for i in range(start, start + count))
    return "".join(protocol.image_placeholder(i) for i in range(start, start + count))
