"""The CLI's edge: each result written the moment it arrives, as files, a manifest line and stdout.

The task core (`miocli.core.stream`) yields results in memory; this module decides where they go:

- with `-o DIR`: the output files (`NAME.TASK.txt|png|wav`, frames and an mp4, story.md),
  then one manifest.jsonl line, each written atomically and never through a planted link;
- on stdout: one line per input (names first when there are several, newlines escaped so a
  line stays a line), or one JSON object per input with `--json`, flushed at once;
- per-input resume (`--skip-existing`): an input is skipped when its main output exists and
  the manifest does not give that file to another input.

A kill at any moment loses at most the batch in flight. A full disk stops the run with one
error that says what was written and what was not.

The results may come from this process (`Mio`), from `mio serve` (`RemoteMio`) or from a Ray
cluster's workers (`scale.ray.RayMio`, in input order as they finish, each input once): the
writer is the same, so the files, records and exit codes are too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from miocli.core.inputs import Item, input_label
from miocli.core.results import Result, StoryPart
from miocli.errors import EnvironmentProblem, MioError, UsageError, report
from miocli.output.files import OutputWriteError, display_name, json_line
from miocli.output.folder import OutputDir
from miocli.output.stdout import StdoutClosed, one_line, print_line, require_stdout, silence_stdout

TEXT, IMAGE, SPEECH, VIDEO, STORY, COT, GENERATE = "text", "image", "speech", "video", "story", "cot", "generate"


@dataclass
class Target:
    """One input as the command line knows it: the item for the core and its file stem."""

    item: Item
    stem: str

    @property
    def name(self) -> str:
        return self.item.name


@dataclass
class ResultWriter:
    """Writes results of one command as they arrive; counts failures for the exit code."""

    task: str  # the name in file names and records: caption, ask-image, video-caption, …
    kind: str  # TEXT, IMAGE, SPEECH, VIDEO, STORY, COT or GENERATE
    out: OutputDir | None
    as_json: bool = False
    show_names: bool = False
    audio_format: str = "wav"
    fps: float = 2.0
    show_steps: bool = False  # cot-visual: print the drawing stage before the answer
    label: str = ""  # `mio demo`: each file's line says which task wrote it ("caption: PATH"), no answer text
    text_format: str = "txt"  # asr --format: txt, json, srt or vtt (output/transcripts.py)
    failures: int = 0
    written: int = 0
    progress: Callable[[int], None] = lambda n: None
    _stdout_gone: bool = False
    # interleave: files of the images written while the story was generated
    _story_images: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in (TEXT, GENERATE) and self.out is None:
            raise UsageError(f"`mio {self.task}` writes files", hint="pass -o DIR")
        if self.out is None or self.as_json:
            require_stdout()

    # ---- before the core runs ----------------------------------------------------------------
    def main_name(self, target: Target) -> str:
        """The file that says an input is done (what --skip-existing looks for)."""
        return {
            TEXT: f"{target.stem}.{self.task}.{self.text_format}", IMAGE: f"{target.stem}.{self.task}.png",
            SPEECH: f"{target.stem}.{self.task}.{self.audio_format}", VIDEO: f"{target.stem}.{self.task}.mp4",
            STORY: "story.md", COT: f"{target.stem}.{self.task}.png", GENERATE: f"{target.stem}.txt",
        }[self.kind]

    def todo(self, targets: Iterable[Target]) -> Iterator[Target]:
        """The targets to run: resumed ones are skipped, ones whose output would clobber a file fail now,
        before any generation is spent on them."""
        for target in targets:
            if self.out is None:
                yield target
                continue
            name = self.main_name(target)
            try:
                if self.out.skip_existing and self._done(target, name):
                    print(f"mio: skipping {display_name(target.name)}: its output exists", file=sys.stderr)
                    self.progress(1)
                    continue
                # Claimed now: an existing file, or a second input with the same stem, fails here.
                self.out.target(name, source=target.name)
            except MioError as exc:
                self.fail(target, exc)
                continue
            yield target

    def _done(self, target: Target, name: str) -> bool:
        """Whether this input's main output is on disk and belongs to it (per input, not per file name)."""
        assert self.out is not None
        if not self.out.exists(name):
            return False
        owner = self.out.recorded_files().get(name)
        if owner is not None and owner != target.name:
            return False
        # Claimed for this input: another input deriving the same name is refused, not skipped.
        self.out.claim(name, source=target.name)
        if owner is None:
            # A kill between the file's rename and its manifest line: the file is whole (written
            # atomically), so the manifest gets the line it missed.
            record: dict[str, Any] = {"task": self.task, "input": target.name, "problems": [],
                                      "files": [name], "recovered": True}
            if self.kind in (TEXT, GENERATE):
                record["text"] = (self.out.path / name).read_text(encoding="utf-8", errors="replace").rstrip("\n")
            self._add_record(record, target)
        return True

    # ---- as results arrive ----------------------------------------------------------------------
    def write(self, target: Target, result: Result) -> None:
        """Files, manifest line and stdout line of one result."""
        self.progress(1)
        record = result.to_record()
        # Records keep the name as it is: json_line escapes bytes that are not UTF-8 so the name
        # reads back exactly (os.fsencode gives the file's bytes); messages show display_name.
        record.update(task=self.task, input=target.name)
        for problem in result.problems:
            print(f"mio: warning: {display_name(target.name)}: {problem}", file=sys.stderr)
        if result.error is not None:
            self._fail_record(target, result.error, record)
            return
        if self.out is not None:
            try:
                record["files"] = self._files(target, result, record)
            except OutputWriteError as exc:
                raise self._disk_error(exc, target) from exc
            except MioError as exc:
                self._fail_record(target, exc, record)
                return
            self._add_record(record, target)
        self.written += 1
        self._print(target, result, record)

    def fail(self, target: Target, exc: MioError) -> None:
        """An input that failed before reaching the core (its output would clobber a file)."""
        self.progress(1)
        record = {"task": self.task, "input": target.name, "text": "", "problems": [],
                  "error": exc.message}
        if exc.hint:
            record["hint"] = exc.hint
        self._fail_record(target, exc, record, to_manifest=False)

    def _fail_record(self, target: Target, exc: MioError, record: dict[str, Any], to_manifest: bool = True) -> None:
        report(exc, display_name(input_label(target.item)))
        self.failures += 1
        record.setdefault("files", [])
        record["error"] = exc.message
        # A rerun over the same bad file leaves its one error record, not a copy per run.
        if self.out is not None and to_manifest and not self.out.records_error(target.name, exc.message):
            self._add_record(record, target)
        if self.as_json:
            self._emit(json_line(record))

    def _add_record(self, record: dict[str, Any], target: Target) -> None:
        assert self.out is not None
        try:
            self.out.add_record(record)
        except OutputWriteError as exc:
            raise self._disk_error(exc, target) from exc

    def _files(self, target: Target, result: Result, record: dict[str, Any]) -> list[str]:
        out = self.out
        assert out is not None
        stem, task = target.stem, self.task
        if self.kind == TEXT:
            return [self._text_file(self.main_name(target), self._transcript(result), target)]
        if self.kind == GENERATE:
            return [self._text_file(f"{stem}.txt", result.text, target)]
        if self.kind == STORY:
            return self._story(target, result, record)
        if self.kind == VIDEO:
            return self._video(target, result, record)
        files = []
        if self.kind in (IMAGE, COT):
            for index, image in enumerate(result.images):
                files.append(self._image_file(f"{stem}.{task}{_number(index)}.png", image, target))
            if self.kind == COT:
                record["image"] = target.item.media[0].name if target.item.media else None
                record["steps"] = [{"stage": "illustrate", "text": result.steps[0].text, "file": files[0]},
                                   {"stage": "answer", "text": result.text}]
        for index, audio in enumerate(result.audio):
            files.append(self._audio_file(f"{stem}.{task}{_number(index)}.{self.audio_format}", audio, target))
        return files

    def _transcript(self, result: Result) -> str:
        from miocli.output.transcripts import render

        return render(result, self.text_format)

    def _text_file(self, name: str, text: str, target: Target) -> str:
        assert self.out is not None
        return self.out.write(name, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), target.name)

    def _image_file(self, name: str, image: Any, target: Target) -> str:
        assert self.out is not None
        return self.out.write(name, lambda tmp: image.save(tmp, format="PNG"), target.name)

    def _audio_file(self, name: str, audio: Any, target: Target) -> str:
        assert self.out is not None
        from miocli.media.audio import write_audio

        return self.out.write(name, lambda tmp: write_audio(tmp, audio.samples, audio.rate, format=self.audio_format),
                              target.name)

    def _video(self, target: Target, result: Result, record: dict[str, Any]) -> list[str]:
        from miocli.media.video import assemble_video

        assert self.out is not None
        # Every name first, so an existing file stops this input before anything is written.
        frame_names = [f"{target.stem}.{self.task}-{n:03d}.png" for n in range(1, len(result.images) + 1)]
        for name in frame_names:
            self.out.target(name, source=target.name)
        video_name = f"{target.stem}.{self.task}.mp4"
        video = self.out.target(video_name, source=target.name)
        files = [self._image_file(name, image, target) for name, image in zip(frame_names, result.images)]
        assemble_video(result.images, video, self.fps)
        files.append(video_name)
        record.update(frames=len(result.images), fps=self.fps)
        return files

    # ---- interleave: images as the story is written ---------------------------------------------
    def story_part(self, target: Target, part: StoryPart) -> None:
        """An image of the story, written as soon as the core decoded it."""
        if part.kind != "image" or self.out is None:
            return
        try:
            name = self._image_file(f"story-{len(self._story_images) + 1:02d}.png", part.image, target)
        except OutputWriteError as exc:
            raise self._disk_error(exc, target) from exc
        self._story_images.append(name)
        print(f"mio: image {len(self._story_images)} written to {self.out.path / name}", file=sys.stderr)

    def _story(self, target: Target, result: Result, record: dict[str, Any]) -> list[str]:
        from miocli import protocol

        assert self.out is not None
        self.out.target("story.md", source=target.name)  # claimed first: an existing story stops it here
        image_files = list(self._story_images)
        for index in range(len(image_files), len(result.images)):  # any the stream did not hand over
            image_files.append(self._image_file(f"story-{index + 1:02d}.png", result.images[index], target))
        speech_files = [self._audio_file(f"story-{n:02d}.wav", audio, target)
                        for n, audio in enumerate(result.audio, start=1)]
        text = result.text
        for index, name in enumerate(image_files):
            text = text.replace(protocol.image_placeholder(index), f"\n\n![image {index + 1}]({name})\n\n", 1)
        for index, name in enumerate(speech_files):
            text = text.replace(protocol.speech_placeholder(index), f"[speech {index + 1}]({name})", 1)
        # Links are relative to story.md, which sits in the output folder with its media.
        story = self.out.write("story.md", lambda tmp: tmp.write_text(_tidy_markdown(text), encoding="utf-8"),
                               target.name)
        self._story_images = []
        record.update(images=len(image_files), speeches=len(speech_files))
        return [story, *image_files, *speech_files]

    # ---- stdout ---------------------------------------------------------------------------------
    def _print(self, target: Target, result: Result, record: dict[str, Any]) -> None:
        """stdout's contract: a text answer per line, or with -o the path of each file written, one per line."""
        if self.as_json:
            self._emit(json_line(record))
            return
        if self.out is None:
            if self.text_format != "txt":
                self._emit(self._transcript(result))
                return
            text = one_line(result.text) if self.show_names else result.text
            self._emit(f"{display_name(target.name)}: {text}" if self.show_names else text)
            return
        files = [str(self.out.path / name) for name in record.get("files", [])]
        if self.label:
            for path in files:
                self._emit(f"{self.label}: {path}")
            return
        if self.kind == COT:
            # cot-visual's answer is text, not a file: its drawing's path comes first, then the answer.
            if self.show_steps:
                self._emit(f"step 1 (illustrate): {files[0]}")
                if result.steps[0].text:
                    self._emit(f"  {result.steps[0].text}")
                self._emit("step 2 (answer):")
            else:
                for path in files:
                    self._emit(path)
            self._emit(result.text)
            return
        for path in files:
            self._emit(path)

    def _emit(self, line: str) -> None:
        if self._stdout_gone or sys.stdout is None:  # closed before the start: the files are what counts
            return
        try:
            print_line(line)
        except BrokenPipeError:
            self._stdout_gone = True
            silence_stdout()
            if self.out is None:
                raise StdoutClosed from None
            print(f"mio: stdout was closed; results go on being written to {self.out.path}", file=sys.stderr)

    # ---- a full disk ----------------------------------------------------------------------------
    def _disk_error(self, exc: OutputWriteError, target: Target) -> EnvironmentProblem:
        written = f"{self.written} result(s) were written (each with its manifest line)" if self.written \
            else "no result was written"
        return EnvironmentProblem(
            f"{exc.message}; {written}; nothing from {display_name(target.name)} on was written (its result was "
            "lost and the inputs after it were not kept)",
            hint=exc.hint or "fix the cause, then run the same command with --skip-existing to finish the set",
        )


def _number(index: int) -> str:
    return "" if index == 0 else f"-{index + 1}"


def _tidy_markdown(text: str) -> str:
    """Collapse the blank lines the image blocks add next to the model's own line breaks."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    kept: list[str] = []
    for line in lines:
        if line or (kept and kept[-1]):
            kept.append(line)
    return "\n".join(kept).strip() + "\n"


def run_and_write(mio: Any, api_task: str, targets: list[Target], writer: ResultWriter, **settings: Any) -> int:
    """Stream the targets through the core and write each result as it arrives; returns the failure count.

    `on_step(label, done, total)` among the settings follows the long steps inside an input (see Mio.stream).
    """
    todo = list(writer.todo(targets))
    if not todo:
        return writer.failures

    def on_part(index: int, part: StoryPart) -> None:
        writer.story_part(todo[index], part)

    items = (target.item for target in todo)
    for result in mio.stream(api_task, items, on_part=on_part, **settings):
        writer.write(todo[result.index], result)
    return writer.failures
