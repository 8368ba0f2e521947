"""A conversation's media answers as files: `turn-N-K.png` / `turn-N-K.wav` in one folder, never overwriting.

The folder is the one given, or a new `mio-chat-YYYYMMDD-HHMMSS` in the working folder, made when the first
picture or recording arrives. A name already taken gets a number (`turn-2-1.2.png`): files are created
exclusively, so a file that exists, or appears meanwhile, is never replaced.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from miocli.output.files import OutputWriteError

_PLACEHOLDER = re.compile(r"<(image|speech)_placeholder_(\d+)>")


class AnswerFiles:
    def __init__(self, folder: Path | None) -> None:
        self.given = folder
        self.folder: Path | None = None

    def _ready(self) -> Path:
        if self.folder is None:
            if self.given is not None:
                self.folder = self.given
            else:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                folder = Path(f"mio-chat-{stamp}")
                number = 1
                while folder.exists():
                    number += 1
                    folder = Path(f"mio-chat-{stamp}-{number}")
                self.folder = folder
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputWriteError(self.folder, exc) from None
        return self.folder

    def _create(self, stem: str, suffix: str, data: bytes) -> str:
        folder = self._ready()
        for number in range(1, 10_000):
            path = folder / (f"{stem}{suffix}" if number == 1 else f"{stem}.{number}{suffix}")
            try:
                with open(path, "xb") as handle:
                    handle.write(data)
                return str(path)
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputWriteError(path, exc) from None
        raise OutputWriteError(folder / f"{stem}{suffix}", FileExistsError(17, "too many files of that name"))

    def write(self, answer: int, result: Any) -> dict[str, list[str]]:
        """The answer's pictures and recordings written; their paths by kind ("image", "speech")."""
        import io

        written: dict[str, list[str]] = {"image": [], "speech": []}
        for k, image in enumerate(result.images, start=1):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            written["image"].append(self._create(f"turn-{answer}-{k}", ".png", buffer.getvalue()))
        for k, audio in enumerate(result.audio, start=1):
            written["speech"].append(self._create(f"turn-{answer}-{k}", ".wav", audio.to_bytes("wav")))
        return written


def shown_text(text: str, written: dict[str, list[str]]) -> str:
    """The answer's text with each picture and recording replaced by where it went (`[image: path]`)."""
    def where(match: re.Match[str]) -> str:
        kind, number = match.group(1), int(match.group(2))
        paths = written.get(kind, [])
        label = "image" if kind == "image" else "audio"
        return f"[{label}: {paths[number]}]" if number < len(paths) else f"[{label}]"

    return _PLACEHOLDER.sub(where, text)
