"""A transcript in the formats whisper users reach for: plain text, JSON with segments, SRT and WebVTT.

The times are those of `Result.segments`: one per prompt the recording took (a long one is split at
quiet points into parts that fit the model's context), since MIO writes no timestamps of its own.
"""

from __future__ import annotations

import json
from typing import Any

from miocli.core.results import Result, Segment

FORMATS = ("txt", "json", "srt", "vtt")
# Formats whose document cannot share stdout with another input's.
WHOLE_DOCUMENTS = ("srt", "vtt")


def render(result: Result, fmt: str) -> str:
    """The transcript of one result as `fmt`'s document, without a final newline."""
    if fmt == "txt":
        return result.text
    segments = result.segments or [Segment(0.0, 0.0, result.text.strip())]
    if fmt == "json":
        record: dict[str, Any] = {"text": result.text,
                                  "segments": [{"id": n, **s.to_record()} for n, s in enumerate(segments)]}
        return json.dumps(record, ensure_ascii=False)
    if fmt == "srt":
        cues = [f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{_cue_text(s.text)}"
                for n, s in enumerate(segments, start=1)]
        return "\n\n".join(cues)
    if fmt == "vtt":
        cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_cue_text(s.text)}" for s in segments]
        return "\n\n".join(["WEBVTT", *cues])
    raise ValueError(f"unknown transcript format {fmt!r}")


def _clock(seconds: float, decimal: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{decimal}{rest % 1000:03d}"


def _cue_text(text: str) -> str:
    # A blank line ends a cue and "-->" starts a timing line in both formats: neither may appear in its text.
    lines = [line.strip() for line in text.replace("-->", "->").splitlines() if line.strip()]
    return "\n".join(lines) or "..."
