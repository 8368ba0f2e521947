"""Peak memory of decoding long speech: `mio detokenize FILE` of 1, 10 and 100 MB of speech tokens.

Two parts, both printing one row per size:

- `files` (default): writes token files of random 4-layer codes of about 1, 10 and 100 MB (one speech
  segment each, as `mio tokenize --with-timbre` writes them) and runs the real entry point
  (`python -m miocli detokenize FILE -o OUT.wav --model TINY`) on each, one process per file, reporting its
  wall time and peak RSS (`os.wait4`'s rusage of that process alone) and the wav's length. The tiny
  checkpoint's codec has the real layout (strides, LSTM, codebooks),
  only narrower, so the file reading, windows and writing are the real ones.
- `real`: the real-size SpeechTokenizer decoder (random weights, the published config) decodes N frames
  in windows in this process, for growing N: peak RSS stays at the window's, not the length's. It is about
  2.5x faster than real time on 2 cores, so a 10 MB file (1.5 h of speech) takes about 40 minutes; `--frames`
  chooses the lengths. `--one-piece` adds the codec's one-piece decode of the smallest N for comparison.

Run: python benchmarks/speech_decode.py [files] [--sizes-mb 1,10,100]
     python benchmarks/speech_decode.py real [--frames 2048,8192] [--one-piece]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIO = [sys.executable, "-m", "miocli"]
BYTES_PER_FRAME = 4 * 10  # four tokens of about ten characters ("<spch2817>")


def write_tokens(path: Path, megabytes: float, seed: int = 0) -> int:
    """A one-segment speech token file of about `megabytes` MB, written a layer and a block at a time."""
    import numpy as np

    frames = int(megabytes * 1e6 / BYTES_PER_FRAME)
    with open(path, "w") as handle:
        handle.write("<spch>")
        for layer in range(4):
            rng = np.random.default_rng(seed + layer)
            for start in range(0, frames, 100_000):
                codes = rng.integers(0, 1024, min(100_000, frames - start)) + 1024 * layer
                handle.write("".join(f"<spch{c}>" for c in codes.tolist()))
        handle.write("</spch>\n")
    return frames


def child_peak_mb(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(wall s, peak RSS MB, return code) of one fresh process: os.wait4 gives that child's own rusage."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, child.returncode


def files(sizes: list[float]) -> None:
    import soundfile

    from miocli.model.tiny import ensure_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="mio-speech-bench-") as folder:
        work = Path(folder)
        model = ensure_tiny_checkpoint("instruct", cache_dir=work / "cache")
        env = {**os.environ, "MIO_CACHE": str(work / "cache")}
        print("| token file | frames | speech | wall | peak RSS | wav |")
        print("|---|---|---|---|---|---|")
        for size in sorted(sizes):
            tokens = work / f"tokens-{size:g}MB.txt"
            frames = write_tokens(tokens, size)
            out = work / f"out-{size:g}MB.wav"
            wall, peak, code = child_peak_mb([*MIO, "detokenize", str(tokens), "-o", str(out), "--model", str(model)],
                                             env)
            info = soundfile.info(str(out)) if code == 0 else None
            wav = (f"{info.frames / info.samplerate / 3600:.2f} h, {out.stat().st_size / 1e6:.0f} MB" if info
                   else f"exit {code}")
            print(f"| {tokens.stat().st_size / 1e6:.1f} MB | {frames} | {frames / 50 / 3600:.2f} h | {wall:.0f} s | "
                  f"{peak:.0f} MB | {wav} |", flush=True)
            tokens.unlink()
            out.unlink(missing_ok=True)


def real(lengths: list[int], one_piece: bool) -> None:
    """Each length in a fresh process, so each peak is its own."""
    print("| frames | speech | how | wall | peak RSS |")
    print("|---|---|---|---|---|")
    runs = [(n, "windows") for n in sorted(lengths)]
    if one_piece:
        runs.insert(0, (min(lengths), "one piece"))
    for frames, how in runs:
        wall, peak, code = child_peak_mb([sys.executable, __file__, "_real_child", str(frames), how])
        result = f"{peak:.0f} MB" if code == 0 else f"exit {code} (killed?) at {peak:.0f} MB"
        print(f"| {frames} | {frames / 50:.0f} s | {how} | {wall:.0f} s | {result} |", flush=True)


def _real_child(frames: int, how: str) -> None:
    import numpy as np
    import torch

    from miocli.codecs.speech import SpeechCodec, SpeechConfig
    from miocli.codecs.speech.config import REAL_CONFIG
    from miocli.codecs.speech.layers import SpeechTokenizerNet
    from miocli.codecs.speech.windows import WINDOW_FRAMES, decode_windows

    config = SpeechConfig.from_dict(REAL_CONFIG)
    net = SpeechTokenizerNet(config, encoder=False).eval().requires_grad_(False)
    for book in net.quantizer.codebooks():
        book.embed.normal_()
    codec = SpeechCodec(config, net, torch.device("cpu"), torch.float32)
    codes = np.random.default_rng(0).integers(0, 1024, (4, frames))
    if how == "one piece":
        codec.decode(torch.from_numpy(codes).unsqueeze(1))
        return
    blocks = (codes[:, i : i + 4096] for i in range(0, frames, 4096))
    for _ in decode_windows(codec, blocks, frames, window=WINDOW_FRAMES):
        pass


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_real_child":
        _real_child(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", default="files", choices=["files", "real"])
    parser.add_argument("--sizes-mb", default="1,10,100")
    parser.add_argument("--frames", default="2048,8192")
    parser.add_argument("--one-piece", action="store_true")
    args = parser.parse_args()
    if args.part == "files":
        files([float(s) for s in args.sizes_mb.split(",")])
    else:
        real([int(n) for n in args.frames.split(",")], args.one_piece)


if __name__ == "__main__":
    main()
