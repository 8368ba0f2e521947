"""What a task gives back in memory: plain objects a script can use without parsing text.

A `Result` is one input's answer: its text, decoded images (`PIL.Image`s) and audio, the
token ids behind them, problems found in the output, and, for an input that could not be
processed, the error instead. Writers at the edges (the CLI's files and manifest, a server's
responses) turn results into bytes; nothing here writes unless asked (`Audio.save`).

No torch here: results travel to processes that never load a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli.errors import MioError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

SAMPLE_RATE = 16000


@dataclass
class Audio:
    """Mono float32 samples in [-1, 1] at `rate` Hz."""

    samples: np.ndarray
    rate: int = SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    def save(self, path: str | Path, format: str | None = None) -> Path:
        """Write a wav or flac file (the format follows the suffix unless given); returns the path."""
        from miocli.media.audio import write_audio

        path = Path(path)
        write_audio(path, self.samples, self.rate, format=format)
        return path

    def to_bytes(self, format: str = "wav") -> bytes:
        """The recording as a wav or flac file's bytes (for a response body, not a path)."""
        from miocli.media.audio import audio_bytes

        return audio_bytes(self.samples, self.rate, format)


@dataclass
class StoryPart:
    """One piece of an interleaved answer, in reading order: text, an image or a recording."""

    kind: str  # "text", "image" or "audio"
    text: str = ""
    image: Image.Image | None = None
    audio: Audio | None = None


@dataclass
class Segment:
    """A stretch of a transcribed recording: `start` and `end` in seconds from its beginning.

    MIO's transcripts carry no times of their own, so a segment is one prompt's worth of the
    recording (the parts a long one is split into at quiet points), not a sentence or a word.
    """

    start: float
    end: float
    text: str

    def to_record(self) -> dict[str, Any]:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


@dataclass
class Step:
    """One stage of a multi-stage task (cot_visual: "illustrate", then "answer")."""

    stage: str
    text: str
    image: Image.Image | None = None


@dataclass
class Result:
    """One input's answer, or its error (`error` set, everything else empty)."""

    task: str
    input: str
    index: int = 0
    text: str = ""
    raw: str = ""
    token_ids: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    audio: list[Audio] = field(default_factory=list)
    # The media as the model wrote them: 32 SEED ids per image, 4 layers of codes per recording.
    image_ids: list[list[int]] = field(default_factory=list)
    speech_codes: list[list[list[int]]] = field(default_factory=list)
    parts: list[StoryPart] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    # detokenize with embeddings only: the (n, 1024) float32 unCLIP embeddings, no pixels.
    embeddings: Any = None
    # How many prompts the input took (a long recording is transcribed in parts).
    chunks: int = 1
    # asr: the times of each part and its text (one segment for a recording that fits one prompt).
    segments: list[Segment] = field(default_factory=list)
    error: MioError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> Result:
        if self.error is not None:
            raise self.error
        return self

    def __str__(self) -> str:
        return self.text

    def to_record(self) -> dict[str, Any]:
        """The JSON-able summary (no pixels or samples): what `--json` prints, before files are added."""
        record: dict[str, Any] = {"task": self.task, "input": self.input, "text": self.text, "problems": self.problems}
        if self.chunks > 1:
            record["chunks"] = self.chunks
        if self.segments:
            record["segments"] = [segment.to_record() for segment in self.segments]
        if self.error is not None:
            record["error"] = self.error.message
            if self.error.hint:
                record["hint"] = self.error.hint
        return record

    def save_video(self, path: str | Path, fps: float = 2.0) -> Path:
        """Assemble the images (video_gen's frames) into an mp4 at `fps`."""
        from miocli.media.video import assemble_video

        path = Path(path)
        assemble_video(self.images, path, fps)
        return path
