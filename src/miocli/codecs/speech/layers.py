"""Inference-only building blocks of SpeechTokenizer (SEANet + LSTM + residual VQ).

Attribute names are chosen so that `state_dict()` keys equal the reference checkpoint's
keys once weight norm is folded (`x.conv.conv.weight_g/weight_v` -> `x.conv.conv.weight`);
that keeps loading a plain strict `load_state_dict` with no renaming table. The doubled
`conv.conv` / `convtr.convtr` levels exist only for that reason.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from miocli.codecs.speech.config import SpeechConfig


def _reflect_pad(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Reflect padding that also works when the signal is shorter than the pad.

    F.pad(mode="reflect") requires pad < length; like the reference we first extend with
    zeros, reflect, then drop the zeros again, so short clips give the same numbers.
    """
    if left == right == 0:
        return x
    length = x.shape[-1]
    widest = max(left, right)
    if length <= widest:
        zeros = widest - length + 1
        padded = F.pad(F.pad(x, (0, zeros)), (left, right), mode="reflect")
        return padded[..., : padded.shape[-1] - zeros]
    # Same values as F.pad(mode="reflect"), in about half the time: its CPU kernel is slow
    # on the (batch, 64, samples) activations of the first layers.
    out = x.new_empty(*x.shape[:-1], left + length + right)
    out[..., left : left + length] = x
    if left:
        out[..., :left] = x[..., 1 : left + 1].flip(-1)
    if right:
        out[..., left + length :] = x[..., length - 1 - right : length - 1].flip(-1)
    return out


class _Level(nn.Module):
    """An empty nesting level: only there to reproduce the reference key names."""


class PaddedConv1d(nn.Module):
    """Non-causal 'same' convolution with reflect padding (SEANet's SConv1d).

    Strided convs are padded on the right so the output has ceil(length / stride) frames,
    which is what makes 320 input samples map to exactly one token frame.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = _Level()
        self.conv.conv = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, dilation=dilation)
        self.stride = stride
        self.padding_total = (kernel - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = -x.shape[-1] % self.stride
        right = self.padding_total // 2
        left = self.padding_total - right
        return self.conv.conv(_reflect_pad(x, left, right + extra))


class TrimmedConvTranspose1d(nn.Module):
    """Transposed conv whose overhang is trimmed so the output is exactly length * stride."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.convtr = _Level()
        self.convtr.convtr = nn.ConvTranspose1d(in_ch, out_ch, kernel, stride=stride)
        total = kernel - stride
        self.trim_right = total // 2
        self.trim_left = total - self.trim_right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.convtr.convtr
        stride, kernel = conv.stride[0], conv.kernel_size[0]
        y = conv(x) if kernel % stride else _overlap_add_transpose(x, conv.weight, conv.bias, stride)
        return y[..., self.trim_left : y.shape[-1] - self.trim_right]


def _overlap_add_transpose(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int
) -> torch.Tensor:
    """conv_transpose1d for kernel = m * stride as one GEMM plus m shifted adds.

    Every input frame writes m blocks of `stride` samples; PyTorch's CPU transposed conv
    takes a generic col2im path that was about 1.7x slower on the decoder's long layers.
    """
    batch, _, frames = x.shape
    c_in, c_out, kernel = weight.shape
    taps = kernel // stride
    cols = torch.matmul(weight.permute(1, 2, 0).reshape(c_out * kernel, c_in), x)
    cols = cols.view(batch, c_out, taps, stride, frames)
    out = x.new_zeros(batch, c_out, frames + taps - 1, stride)
    for j in range(taps):
        out[:, :, j : j + frames] += cols[:, :, j].transpose(-1, -2)
    out = out.view(batch, c_out, (frames + taps - 1) * stride)
    return out if bias is None else out + bias[:, None]


class ResidualUnit(nn.Module):
    """ELU -> dilated conv (halving width) -> ELU -> 1x1 conv, plus a 1x1-conv shortcut."""

    def __init__(self, dim: int, kernel: int, dilation: int) -> None:
        super().__init__()
        hidden = dim // 2
        self.block = nn.Sequential(
            nn.ELU(),
            PaddedConv1d(dim, hidden, kernel, dilation=dilation),
            nn.ELU(),
            PaddedConv1d(hidden, dim, 1),
        )
        self.shortcut = PaddedConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SkipLSTM(nn.Module):
    """LSTM over time with a residual connection; a bidirectional LSTM doubles the width,
    so the input is duplicated along channels before the skip is added."""

    def __init__(self, dim: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers, bidirectional=bidirectional)
        self.bidirectional = bidirectional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # (time, batch, channels): nn.LSTM's default layout
        y, _ = self.lstm(seq)
        if self.bidirectional:
            seq = torch.cat([seq, seq], dim=-1)
        return (y + seq).permute(1, 2, 0)


def _residual_units(config: SpeechConfig, dim: int) -> list[nn.Module]:
    return [
        ResidualUnit(dim, config.residual_kernel_size, config.dilation_base**j) for j in range(config.n_residual_layers)
    ]


class SEANetEncoder(nn.Module):
    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        nf = config.n_filters
        mult = 1
        layers: list[nn.Module] = [PaddedConv1d(1, nf, 7)]
        # The encoder downsamples with the strides in reverse order (2, 4, 5, 8 for the real model).
        for stride in reversed(config.strides):
            layers += _residual_units(config, mult * nf)
            layers += [nn.ELU(), PaddedConv1d(mult * nf, mult * nf * 2, stride * 2, stride=stride)]
            mult *= 2
        if config.lstm_layers:
            layers.append(SkipLSTM(mult * nf, config.lstm_layers, config.bidirectional))
        width = mult * nf * (2 if config.bidirectional else 1)
        layers += [nn.ELU(), PaddedConv1d(width, config.dimension, 7)]
        self.model = nn.Sequential(*layers)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(wav)


class SEANetDecoder(nn.Module):
    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        nf = config.n_filters
        mult = 2 ** len(config.strides)
        layers: list[nn.Module] = [PaddedConv1d(config.dimension, mult * nf, 7)]
        if config.lstm_layers:
            # The reference always builds the decoder LSTM unidirectional.
            layers.append(SkipLSTM(mult * nf, config.lstm_layers, bidirectional=False))
        for stride in config.strides:
            layers += [nn.ELU(), TrimmedConvTranspose1d(mult * nf, mult * nf // 2, stride * 2, stride)]
            layers += _residual_units(config, mult * nf // 2)
            mult //= 2
        layers += [nn.ELU(), PaddedConv1d(nf, 1, 7)]
        self.model = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model(latent)


class Codebook(nn.Module):
    """One VQ layer's codebook; only `embed` is needed at inference (the EMA statistics
    of the file are validated but never materialised)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.empty(size, dim))

    embed: torch.Tensor

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of x (rows, dim)."""
        embed = self.embed
        if embed.dtype not in (torch.float32, torch.float64):
            # Half-precision distances would flip near-tied codes; the codebook is small.
            x, embed = x.float(), embed.float()
        embed_t = embed.t()
        # Same expansion and order of operations as the reference, so near-ties resolve alike.
        dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed_t + embed_t.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices


class _VQLayer(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(size, dim)


class ResidualVQ(nn.Module):
    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.vq = _Level()
        self.vq.layers = nn.ModuleList(_VQLayer(config.codebook_size, config.dimension) for _ in range(config.n_q))

    def codebooks(self) -> list[Codebook]:
        return [layer._codebook for layer in self.vq.layers]

    def encode(self, latent: torch.Tensor, n_q: int) -> torch.Tensor:
        """latent (batch, dim, frames) -> codes (n_q, batch, frames)."""
        batch, dim, frames = latent.shape
        residual = latent.transpose(1, 2).reshape(batch * frames, dim)
        codes = []
        for book in self.codebooks()[:n_q]:
            idx = book.nearest(residual)
            residual = residual - F.embedding(idx, book.embed)
            codes.append(idx.view(batch, frames))
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (k, batch, frames) -> summed code vectors (batch, dim, frames)."""
        total: torch.Tensor | None = None
        for book, layer_codes in zip(self.codebooks(), codes, strict=False):
            vectors = F.embedding(layer_codes, book.embed)
            total = vectors if total is None else total + vectors
        assert total is not None
        return total.transpose(1, 2)


class SpeechTokenizerNet(nn.Module):
    """The parts of SpeechTokenizer needed at inference; `encoder`/`decoder` may be absent."""

    def __init__(self, config: SpeechConfig, encoder: bool = True, decoder: bool = True) -> None:
        super().__init__()
        self.encoder = SEANetEncoder(config) if encoder else None
        self.quantizer = ResidualVQ(config)
        self.decoder = SEANetDecoder(config) if decoder else None
