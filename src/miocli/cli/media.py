"""The image and speech tasks: caption, ask, imagine, edit, asr, tts, speak, speech2speech.

Each command turns its arguments into targets (`run.py`) and streams them through the core into the
writer; no model code here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from miocli.cli.options import (
    Common,
    ExampleOpt,
    GuidanceOpt,
    MaxFramesOpt,
    RecursiveOpt,
    SizeOpt,
    StepsOpt,
    ThresholdOpt,
    UniformOpt,
    with_options,
)
from miocli.cli.run import (
    example_pairs,
    expand_text_inputs,
    frame_settings,
    media_targets,
    pixel_settings,
    read_file,
    read_text_argument,
    run_task,
    text_targets,
)
from miocli.errors import UsageError
from miocli.media.video import DEFAULT_MAX_FRAMES


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output", batch_size=8)
def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    example: ExampleOpt = None,
    *, opts: Common,
) -> int:
    """Describe images (folders are captioned in batches with one model load)."""
    from miocli.core.tasks import IMAGE
    from miocli.output.writer import TEXT

    examples = example_pairs(example, IMAGE)
    return run_task("caption", "caption", TEXT, media_targets(IMAGE, images, recursive, {}), opts,
                     examples=examples)


@with_options("runtime", "ray", "generation", "json", "prompt")
def ask(
    media: Annotated[str, typer.Argument(help="An image, audio or video file.")],
    question: Annotated[str, typer.Argument(help="The question or instruction.")],
    example: ExampleOpt = None,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Ask about an image, a recording or a video (--example adds solved examples first)."""
    from miocli.core.inputs import kind_of_path
    from miocli.core.tasks import AUDIO, VIDEO
    from miocli.output.writer import TEXT

    text = read_text_argument(question, "question")
    kind = kind_of_path(media)
    record_task = {AUDIO: "ask-audio", VIDEO: "ask-video"}.get(kind, "ask-image")
    frames = frame_settings(max_frames, uniform, threshold)
    # The image and video templates say {question}, the audio one {instruction}.
    targets = media_targets(kind, [media], False, {"question": text, "instruction": text})
    return run_task("ask", record_task, TEXT, targets, opts, options=opts.generation(batch_size=1),
                     examples=example_pairs(example, kind), **frames)


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def imagine(
    prompts: Annotated[list[str], typer.Argument(help="What to draw ('-' reads one per line from stdin).")],
    count: Annotated[int, typer.Option("-n", "--count", help="Images per prompt.")] = 1,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = None,
    *, opts: Common,
) -> int:
    """Generate images from text: SEED tokens from the LLM, pixels from unCLIP."""
    from miocli.output.writer import IMAGE

    if count < 1:
        raise UsageError("-n must be at least 1")
    texts = expand_text_inputs(prompts, "prompt")
    # Several images of one prompt need different samples: sampling is switched on unless told otherwise.
    options = opts.generation(sample=True if count > 1 and opts.sample is None else None)
    return run_task("imagine", "imagine", IMAGE, text_targets(texts, "caption", count), opts, options=options,
                     **pixel_settings(steps, guidance, size))


@with_options("runtime", "ray", "generation", "json", "prompt", "write")
def edit(
    image: Annotated[str, typer.Argument(help="The image to edit.")],
    instruction: Annotated[str, typer.Argument(help="What to change.")],
    template: Annotated[str | None, typer.Option("--template", help="User turn template with {media} and "
                                                    "{instruction} (its own text is plain text).")] = None,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = None,
    *, opts: Common,
) -> int:
    """Edit an image following an instruction (the answer is pre-filled with <image>)."""
    from miocli.core.tasks import IMAGE as IMAGE_INPUT
    from miocli.output.writer import IMAGE

    text = read_text_argument(instruction, "instruction")
    if template is not None:
        from miocli.core.validate import check_template

        check_template(template, ("media", "instruction"))
    targets = media_targets(IMAGE_INPUT, [image], False, {"instruction": text})
    return run_task("edit", "edit", IMAGE, targets, opts, options=opts.generation(batch_size=1), template=template,
                     **pixel_settings(steps, guidance, size))


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def asr(
    audio: Annotated[list[str], typer.Argument(help="Audio files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    output_format: Annotated[str, typer.Option(
        "--format", help="txt, json (text and segments), srt or vtt: subtitles timed by the parts a recording is "
        "transcribed in.", metavar="FORMAT")] = "txt",
    *, opts: Common,
) -> int:
    """Transcribe speech."""
    from miocli.core.tasks import AUDIO
    from miocli.output.transcripts import FORMATS, WHOLE_DOCUMENTS
    from miocli.output.writer import TEXT

    if output_format not in FORMATS:
        raise UsageError(f"--format {output_format} is not a transcript format",
                         hint=f"use one of {', '.join(FORMATS)}")
    targets = media_targets(AUDIO, audio, recursive, {})
    if output_format in WHOLE_DOCUMENTS and len(targets) > 1 and opts.output_dir is None and not opts.as_json:
        raise UsageError(f"--format {output_format} prints one document, and {len(targets)} recordings were given",
                         hint=f"pass -o DIR to write one .{output_format} file per recording")
    return run_task("asr", "asr", TEXT, targets, opts, text_format=output_format)


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def tts(
    texts: Annotated[list[str] | None, typer.Argument(help="Text to speak ('-' reads one per line).")] = None,
    text_file: Annotated[Path | None, typer.Option("--text-file", help="One utterance per line.")] = None,
    *, opts: Common,
) -> int:
    """Speak text: one wav per utterance."""
    from miocli.output.writer import SPEECH

    values = list(texts or [])
    if text_file is not None:
        values.extend(line for line in read_file(str(text_file)).splitlines() if line.strip())
    if not values:
        raise UsageError("nothing to say", hint="give text, '-' for stdin, or --text-file FILE")
    return run_task("tts", "tts", SPEECH, text_targets(expand_text_inputs(values, "text"), "text"), opts)


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def speak(
    questions: Annotated[list[str], typer.Argument(help="Questions to answer out loud.")],
    *, opts: Common,
) -> int:
    """Answer questions with speech (voice mode)."""
    from miocli.output.writer import SPEECH

    targets = text_targets(expand_text_inputs(questions, "question"), "question")
    return run_task("speak", "speak", SPEECH, targets, opts)


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def speech2speech(
    audio: Annotated[list[str], typer.Argument(help="Recordings to answer with speech.")],
    recursive: RecursiveOpt = False,
    *, opts: Common,
) -> int:
    """Answer spoken input with speech."""
    from miocli.core.tasks import AUDIO
    from miocli.output.writer import SPEECH

    return run_task("speech2speech", "speech2speech", SPEECH, media_targets(AUDIO, audio, recursive, {}), opts)
