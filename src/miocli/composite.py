"""Tasks whose answer mixes modalities or takes more than one generation.

- `interleave`: a story of text and images; `story.md` holds the text with links to the images.
- `cot-visual`: chain of visual thought in two stages: draw an illustrating image (with the
  user's image in context when there is one), then answer with both images in context.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miocli import mediatokens, protocol
from miocli.errors import ModelError
from miocli.outputs import OutputDir, atomic_write, atomic_write_text, print_record, relative_to, slug
from miocli.pipeline import Prompt, task_prompt_text
from miocli.tasks import TASKS

STORY = "story.md"


# ---- interleave --------------------------------------------------------------------------------
def story_markdown(text: str, image_files: list[str], speech_files: list[str]) -> str:
    """The story text with each media placeholder replaced by a link to its file."""
    for index, name in enumerate(image_files):
        text = text.replace(protocol.image_placeholder(index), f"\n\n![image {index + 1}]({name})\n\n", 1)
    for index, name in enumerate(speech_files):
        text = text.replace(protocol.speech_placeholder(index), f"[speech {index + 1}]({name})", 1)
    # Collapse the blank lines the image blocks add next to the model's own line breaks.
    lines = [line.rstrip() for line in text.strip().splitlines()]
    kept: list[str] = []
    for line in lines:
        if line or (kept and kept[-1]):
            kept.append(line)
    return "\n".join(kept).strip() + "\n"


class ImageStream:
    """Watches streamed token ids and writes each image as soon as its segment closes.

    The story's images then appear (and can be looked at) while the rest is still being
    generated, instead of all at the end.
    """

    def __init__(self, mio: Any, out: OutputDir, pixel: mediatokens.PixelOptions, source: str) -> None:
        tokenizer = mio.runtime.tokenizer
        self.mio, self.out, self.pixel, self.source = mio, out, pixel, source
        self.tokenizer = tokenizer
        self.begin = tokenizer.token_to_id(protocol.IMAGE_BEGIN)
        self.end = tokenizer.token_to_id(protocol.IMAGE_END)
        self.current: list[int] | None = None
        self.written: list[tuple[list[int], str]] = []  # (image ids, file) in order

    def __call__(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if token == self.begin:
                self.current = []
            elif token == self.end and self.current is not None:
                ids = protocol.image_ids_from_string(self.tokenizer.decode(self.current))
                self.current = None
                # The parser drops segments of another length too, so the numbering stays in step.
                if len(ids) == protocol.IMAGE_TOKENS_PER_IMAGE:
                    self.write(ids)
            elif self.current is not None:
                self.current.append(token)

    def write(self, ids: list[int]) -> str:
        path = self.out.target(f"story-{len(self.written) + 1:02d}.png", source=self.source)
        image = mediatokens.images_from_ids(self.mio.runtime, [ids], self.pixel)[0]
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        name = relative_to(path, self.out.path)
        self.written.append((ids, name))
        print(f"mio: image {len(self.written)} written to {path}", file=sys.stderr)
        return name

    def files_for(self, images: list[list[int]]) -> list[str]:
        """The files of the final answer's images: those already written, then any not streamed."""
        files = []
        for index, ids in enumerate(images):
            if index < len(self.written) and self.written[index][0] == ids:
                files.append(self.written[index][1])
            else:
                files.append(self.write(ids))
        return files


def run_interleave(mio: Any, topic: str, out: OutputDir, options: Any, pixel: mediatokens.PixelOptions,
                   as_json: bool) -> int:
    """Generate the story (images written as they complete), then story.md, speech and the record."""
    task = TASKS["interleave"]
    story_path = out.target(STORY, source=topic)
    prompt = Prompt(task_prompt_text(task, mio.variant, {"topic": topic}))
    stream = ImageStream(mio, out, pixel, topic)
    reply = mio.run(task, [prompt], options, on_tokens=stream)[0]
    for problem in reply.problems:
        print(f"mio: warning: story: {problem}", file=sys.stderr)
    image_files = stream.files_for(reply.images)
    speech_files: list[str] = []
    if reply.speeches:
        from miocli.media.audio import write_audio

        for number, codes in enumerate(reply.speeches, start=1):
            wave = mediatokens.speech_from_codes(mio.runtime, codes)
            path = out.target(f"story-{number:02d}.wav", source=topic)
            atomic_write(path, lambda tmp, wave=wave: write_audio(tmp, wave, 16000, format="wav"))
            speech_files.append(relative_to(path, out.path))
    # Links are relative to story.md, which sits in the output folder with its media.
    atomic_write_text(story_path, story_markdown(reply.text, image_files, speech_files))
    files = [relative_to(story_path, out.path), *image_files, *speech_files]
    record = {"task": "interleave", "input": topic, "text": reply.text, "problems": reply.problems,
              "images": len(image_files), "speeches": len(speech_files), "files": files}
    out.add_record(record)
    if as_json:
        print_record(record)
    else:
        print(story_path)
    return 0


# ---- chain of visual thought -------------------------------------------------------------------
@dataclass
class CotResult:
    answer: str
    drawing_text: str
    image_file: str | None
    problems: list[str] = field(default_factory=list)


def run_cot_visual(mio: Any, question: str, image_path: Path | None, out: OutputDir, options: Any,
                   pixel: mediatokens.PixelOptions, as_json: bool, show_steps: bool) -> int:
    from miocli.media.image import load_image

    runtime = mio.runtime
    given = [load_image(image_path)] if image_path is not None else []
    given_strings = mediatokens.image_strings(runtime, given) if given else []
    stem = slug(question, 40)
    image_target = out.target(f"{stem}.cot-visual.png", source=question)

    # Stage 1: the illustrating image (the answer turn is pre-filled with <image>).
    draw_task = TASKS["cot-draw" if given else "cot-draw-text"]
    draw_text = task_prompt_text(draw_task, mio.variant, {"question": question}, len(given))
    drawing = mio.run(draw_task, [Prompt(draw_text, given_strings)], options)[0]
    problems = list(drawing.problems)
    if not drawing.images:
        raise ModelError(
            "the model drew no illustrating image in the first stage",
            hint="run again with --constrain (the default) or a larger --max-new-tokens",
        )
    ids = drawing.images[0]
    picture = mediatokens.images_from_ids(runtime, [ids], pixel)[0]
    atomic_write(image_target, lambda tmp: picture.save(tmp, format="PNG"))

    # Stage 2: answer with the given image (if any) and the drawing in context. The drawing goes
    # in as the tokens the model wrote, not re-encoded pixels: that is exactly what it "thought".
    answer_task = TASKS["cot-answer"]
    strings = [*given_strings, protocol.image_ids_to_string(ids)]
    answer_text = task_prompt_text(answer_task, mio.variant, {"question": question}, len(strings))
    answer = mio.run(answer_task, [Prompt(answer_text, strings)], options)[0]
    problems += answer.problems
    for problem in problems:
        print(f"mio: warning: {problem}", file=sys.stderr)

    image_file = relative_to(image_target, out.path)
    drawing_words = _without_placeholders(drawing.text)
    record = {
        "task": "cot-visual", "input": question, "image": str(image_path) if image_path else None,
        "text": answer.text, "problems": problems, "files": [image_file],
        "steps": [
            {"stage": "illustrate", "text": drawing_words, "file": image_file},
            {"stage": "answer", "text": answer.text},
        ],
    }
    out.add_record(record)
    if as_json:
        print_record(record)
        return 0
    if show_steps:
        print(f"step 1 (illustrate): {out.path / image_file}")
        if drawing_words:
            print(f"  {drawing_words}")
        print("step 2 (answer):")
    print(answer.text)
    return 0


def _without_placeholders(text: str) -> str:
    import re

    return re.sub(r"<(image|speech)_placeholder_\d+>", "", text).strip()
