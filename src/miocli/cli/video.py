"""The video and composite tasks: keyframes, video-caption, video-gen, interleave, cot-visual."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from miocli.cli.options import (
    Common,
    GuidanceOpt,
    MaxFramesOpt,
    RecursiveOpt,
    SizeOpt,
    StepsOpt,
    ThresholdOpt,
    UniformOpt,
    emit_json,
    with_options,
)
from miocli.cli.run import (
    expand_text_inputs,
    frame_settings,
    media_targets,
    pixel_settings,
    read_text_argument,
    run_task,
    text_targets,
    write_all,
)
from miocli.errors import UsageError
from miocli.media.video import DEFAULT_MAX_FRAMES


# ---- video and composite tasks ------------------------------------------------------------------
@with_options("json", "write")
def keyframes(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Write the keyframes MIO would see (one per scene, in order) and keyframes.json; no model needed."""
    from miocli.core.inputs import expand_inputs
    from miocli.core.tasks import VIDEO
    from miocli.media.video import FrameOptions
    from miocli.output.keyframes import write_keyframes
    from miocli.output.stdout import print_line

    frames = FrameOptions(**frame_settings(max_frames, uniform, threshold))
    if opts.output_dir is None:
        raise UsageError("`mio keyframes` writes files", hint="pass -o DIR")
    paths = expand_inputs(videos, VIDEO, recursive)
    entries, failures = write_keyframes(paths, opts.open_output(), frames)
    if opts.as_json:
        emit_json(entries)
    else:
        # stdout's contract: the path of each file written, one per line (times are in keyframes.json).
        for entry in entries:
            print_line(str(opts.output_dir / entry["file"]))
        print_line(str(opts.output_dir / "keyframes.json"))
    return 1 if failures else 0


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def video_caption(
    videos: Annotated[list[str], typer.Argument(help="Video files, folders, globs, or '-' (paths on stdin).")],
    recursive: RecursiveOpt = False,
    max_frames: MaxFramesOpt = DEFAULT_MAX_FRAMES, uniform: UniformOpt = False, threshold: ThresholdOpt = None,
    *, opts: Common,
) -> int:
    """Describe videos from their keyframes."""
    from miocli.core.tasks import VIDEO
    from miocli.output.writer import TEXT

    frames = frame_settings(max_frames, uniform, threshold)
    return run_task("video_caption", "video-caption", TEXT, media_targets(VIDEO, videos, recursive, {}), opts,
                     **frames)


@with_options("runtime", "ray", "generation", "json", "output")
def video_gen(
    descriptions: Annotated[list[str], typer.Argument(help="What happens in the video ('-' reads one per "
                                                      "line).")],
    fps: Annotated[float, typer.Option("--fps", help="Frame rate of the assembled mp4.")] = 2.0,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = None,
    *, opts: Common,
) -> int:
    """Generate a video as a sequence of keyframes: the frames as images plus an mp4."""

    from miocli.output.writer import VIDEO, ResultWriter

    if not (math.isfinite(fps) and fps > 0):
        raise UsageError(f"--fps must be a positive number (got {fps})")
    texts = expand_text_inputs(descriptions, "description")
    writer = ResultWriter("video-gen", VIDEO, opts.open_output(), as_json=opts.as_json, fps=fps)
    return write_all(opts.make_mio(), "video_gen", text_targets(texts, "description"), writer,
                     options=opts.generation(batch_size=1), **pixel_settings(steps, guidance, size))


@with_options("runtime", "generation", "json", "write")
def interleave(
    topic: Annotated[str, typer.Argument(help="What the story is about: the prompt is \"Generate a visual story "
                                          "about TOPIC.\" ('-' reads stdin).")],
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = None,
    *, opts: Common,
) -> int:
    """Generate interleaved text and images: story.md with the text and image links, and the images."""
    from miocli.core.inputs import Item
    from miocli.output.writer import STORY, ResultWriter, Target

    text = read_text_argument(topic, "topic").strip().rstrip(".")
    writer = ResultWriter("interleave", STORY, opts.open_output(), as_json=opts.as_json)
    return write_all(opts.make_mio(), "interleave", [Target(Item(text, {"topic": text}), "story")], writer,
                     options=opts.generation(batch_size=1), **pixel_settings(steps, guidance, size))


@with_options("runtime", "generation", "json", "write")
def cot_visual(
    question: Annotated[str, typer.Argument(help="The question ('-' reads stdin).")],
    image: Annotated[Path | None, typer.Option("--image", help="An image the question is about.")] = None,
    show_steps: Annotated[bool, typer.Option("--show-steps", help="Also print the first stage: the drawn "
                                             "image and any text written with it.")] = False,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = None,
    *, opts: Common,
) -> int:
    """Chain of visual thought: draw an illustrating image, then answer with it in context."""
    from miocli.core.inputs import Item, Media
    from miocli.core.tasks import IMAGE
    from miocli.output.files import slug
    from miocli.output.writer import COT, ResultWriter, Target

    text = read_text_argument(question, "question").strip()
    media = [Media(IMAGE, str(image), path=image)] if image is not None else []
    writer = ResultWriter("cot-visual", COT, opts.open_output(), as_json=opts.as_json, show_steps=show_steps)
    return write_all(opts.make_mio(), "cot_visual", [Target(Item(text, {"question": text}, media), slug(text, 40))],
                     writer, options=opts.generation(batch_size=1), **pixel_settings(steps, guidance, size))
