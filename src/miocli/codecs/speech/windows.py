"""Speech decoding of any length in bounded memory: windows of frames, seams hidden by context.

The decoder is `conv7 → LSTM → (ELU, transposed conv, residual units)… → ELU → conv7`. Every layer but
the LSTM sees only a few neighbours, so a window decoded with `context` extra frames on each side gives the
same samples in its middle as the whole signal would; the LSTM looks back without limit, so its state is
carried from one window to the next instead. Memory then grows with the window, not with the recording.

What comes out equals one-piece decoding up to the float rounding of the kernels on a different length
(oneDNN blocks a convolution by its length): tests/codecs/test_speech_windows.py measures both the need for
the context (one frame less and the seams differ by far more) and that noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from miocli.codecs.speech.layers import PaddedConv1d, ResidualUnit, SkipLSTM, TrimmedConvTranspose1d

# 1024 frames are 20 s of speech; on the real decoder a window peaks near 0.5 GB of activations.
WINDOW_FRAMES = 1024


@dataclass(frozen=True)
class DecoderParts:
    """The decoder cut around its LSTM; `post_context` frames of neighbours decide a frame of `post`."""

    pre: nn.Module
    lstm: SkipLSTM | None
    post: nn.Module
    pre_context: int
    post_context: int


def split_decoder(decoder: nn.Module) -> DecoderParts:
    layers = list(decoder.model)
    at = next((i for i, layer in enumerate(layers) if isinstance(layer, SkipLSTM)), None)
    pre, lstm, post = (layers[:1], None, layers[1:]) if at is None else (layers[:at], layers[at], layers[at + 1:])
    return DecoderParts(nn.Sequential(*pre), lstm, nn.Sequential(*post), context_frames(pre), context_frames(post))


def context_frames(layers: Iterable[nn.Module]) -> int:
    """Frames on each side that can change a frame's output: each layer's reach at its own rate, summed."""
    rate = 1  # samples per frame at the current layer's input
    reach = 0.0
    for layer in _leaves(layers):
        if isinstance(layer, PaddedConv1d):
            reach += max(layer.padding_total - layer.padding_total // 2, layer.padding_total // 2) / rate
        elif isinstance(layer, TrimmedConvTranspose1d):
            reach += 1.0 / rate  # an output sample mixes two neighbouring input frames
            rate *= layer.convtr.convtr.stride[0]
    return int(np.ceil(reach)) + 1


def _leaves(layers: Iterable[nn.Module]) -> Iterator[nn.Module]:
    for layer in layers:
        if isinstance(layer, (PaddedConv1d, TrimmedConvTranspose1d)):
            yield layer
        elif isinstance(layer, ResidualUnit):
            yield from _leaves(layer.block)  # the shortcut is a 1x1 conv: no reach
        elif isinstance(layer, nn.Sequential):
            yield from _leaves(layer)


class _Frames:
    """Code frames read forward from blocks, with the look-back a window needs kept and older ones dropped."""

    def __init__(self, blocks: Iterable[np.ndarray]) -> None:
        self._blocks = iter(blocks)
        self._buffer = np.zeros((0, 0), dtype=np.int64)
        self._start = 0  # global index of the buffer's first frame

    def take(self, low: int, high: int) -> np.ndarray:
        """Frames [low, high) as (layers, n); `low` never goes back before an earlier call's `low`."""
        while self._start + self._buffer.shape[1] < high:
            block = np.asarray(next(self._blocks), dtype=np.int64)
            self._buffer = block if self._buffer.size == 0 else np.concatenate([self._buffer, block], axis=1)
        drop = low - self._start
        self._buffer, self._start = self._buffer[:, drop:], low
        return self._buffer[:, : high - low]


def decode_windows(
    codec: object,
    blocks: Iterable[np.ndarray],
    frames: int,
    *,
    window: int = WINDOW_FRAMES,
    context: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[np.ndarray]:
    """float32 samples of `frames` code frames given as (layers, n) blocks, a window at a time.

    `context` overrides the measured reach of the layers after the LSTM (tests use it to show it is needed).
    """
    parts = split_decoder(codec._require("decoder"))  # type: ignore[attr-defined]
    quantizer, device, hop = codec.net.quantizer, codec.device, codec.hop_length  # type: ignore[attr-defined]
    post_context = parts.post_context if context is None else context
    window = max(1, window)
    source = _Frames(blocks)
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    done_lstm = emitted = 0
    kept = torch.zeros(0)  # LSTM outputs from frame `kept_start` to `done_lstm`
    kept_start = 0
    with torch.no_grad():
        while emitted < frames:
            end = min(frames, done_lstm + window)
            low, high = max(0, done_lstm - parts.pre_context), min(frames, end + parts.pre_context)
            codes = torch.from_numpy(source.take(low, high)).to(device).unsqueeze(1)
            x = parts.pre(quantizer.decode(codes))[..., done_lstm - low : end - low]
            if parts.lstm is not None:
                x, state = _lstm_step(parts.lstm, x, state)
            kept = x if kept.numel() == 0 else torch.cat([kept, x], dim=-1)
            done_lstm = end
            ready = frames if end == frames else end - post_context
            if ready <= emitted:
                continue
            first = max(0, emitted - post_context)
            last = min(frames, ready + post_context)
            out = parts.post(kept[..., first - kept_start : last - kept_start])
            yield out[0, 0, (emitted - first) * hop : (ready - first) * hop].float().cpu().numpy()
            emitted = ready
            if progress is not None:
                progress(emitted, frames)
            drop = max(0, emitted - post_context) - kept_start
            kept, kept_start = kept[..., drop:], kept_start + drop


def _lstm_step(
    skip: SkipLSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """SkipLSTM.forward on one window, starting from the state the previous window ended in."""
    seq = x.permute(2, 0, 1)
    y, state = skip.lstm(seq, state)
    if skip.bidirectional:
        seq = torch.cat([seq, seq], dim=-1)
    return (y + seq).permute(1, 2, 0), state
