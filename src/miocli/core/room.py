"""Memory checks before work whose size the input decides: a video's keyframes (speech: core/speechfile.py).

Like the components' checks before they load (model/memory.py), a need above what is free stops the run with
exit 3 before anything is decoded, naming the input, its size, the need, what is free and the option that fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from miocli.errors import EnvironmentProblem, InputError

if TYPE_CHECKING:
    from miocli.media.video import FrameOptions

# The kept frames as decoded (BGR arrays), the frames read again for scenes, and their RGB images.
FRAME_COPIES = 3
VIDEO_FIXED = 100_000_000  # the decoder's own buffers


def free_ram() -> int | None:
    """RAM free for this run (MIO_MEMORY_LIMIT caps it), or None when the platform does not say."""
    from miocli.model import memory

    free, total = memory.ram()
    cap = memory.limit()
    if cap is not None:
        return min(free, cap) if total else cap
    return free if total else None


def check_video(path: Path, name: str, frames: FrameOptions, free: int | None) -> None:
    """EnvironmentProblem when the keyframes `frames` keeps of this video cannot fit in `free` bytes.

    A file that is not a readable video passes: reading it gives the real error.
    """
    from miocli.media.frames import probe_video
    from miocli.model.memory import format_bytes

    if free is None:
        return
    try:
        info = probe_video(path)
    except InputError:
        return
    per_frame = info.width * info.height * 3 * FRAME_COPIES
    kept = min(frames.max_frames, info.frames)
    need = kept * per_frame + VIDEO_FIXED
    if need <= free:
        return
    fitting = max((free - VIDEO_FIXED) // per_frame, 0)
    message = (f"{name} ({info.width}x{info.height}, {info.frames} frames) needs about {format_bytes(need)} for its "
               f"{kept} keyframes but {format_bytes(free)} of RAM is free")
    hint = (f"keep fewer frames: --max-frames {fitting} fits" if fitting >= 1
            else "nothing fits: free some memory, or scale the video down (e.g. `ffmpeg -i IN -vf scale=640:-2 OUT`)")
    raise EnvironmentProblem(message, hint=hint)
