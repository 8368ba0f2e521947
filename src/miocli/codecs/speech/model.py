"""SpeechCodec: waveform <-> SpeechTokenizer codes, loading only the parts a task needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from miocli.codecs.speech.checkpoint import CONFIG_NAME, WEIGHTS_NAME, build_meta, inference_weights, read_folder
from miocli.codecs.speech.config import SpeechConfig
from miocli.codecs.speech.layers import SpeechTokenizerNet
from miocli.errors import InputError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "SpeechCodec"]

_PARTS = frozenset({"encoder", "decoder"})


class SpeechCodec:
    """Inference-only SpeechTokenizer, checkpoint-compatible with the reference.

    `encode` returns codes (n_q, batch, frames) as CPU int64; `decode` returns CPU float32
    waveforms (batch, 1, frames * hop_length). Both run without autograd.
    """

    def __init__(self, config: SpeechConfig, net: SpeechTokenizerNet, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.net = net
        self.device = device
        self.dtype = dtype
        self.sample_rate = config.sample_rate
        self.hop_length = config.hop_length
        self.n_q = config.n_q
        self.codebook_size = config.codebook_size

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        parts: frozenset[str] = _PARTS,
    ) -> SpeechCodec:
        """Load `<model dir>/SpeechTokenizer` (config.json + SpeechTokenizer.pt).

        The whole file is checked strictly against the config, but only the requested parts
        are materialised: an ASR run never holds decoder weights, a TTS run no encoder.
        """
        parts = frozenset(parts)
        if not parts or not parts <= _PARTS:
            raise ValueError(f"parts must be a non-empty subset of {sorted(_PARTS)}, got {sorted(parts)}")
        config, state = read_folder(Path(folder))
        return cls.from_state_dict(config, state, device=device, dtype=dtype, parts=parts)

    @classmethod
    def from_state_dict(
        cls,
        config: SpeechConfig,
        state: dict[str, torch.Tensor],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        parts: frozenset[str] = _PARTS,
    ) -> SpeechCodec:
        """Build from an already validated reference-layout state dict."""
        device = torch.device(device)
        net = build_meta(config, encoder="encoder" in parts, decoder="decoder" in parts)
        weights = inference_weights(state, net, device, dtype)
        # assign=True adopts our tensors as the parameters: no random init, no second copy.
        net.load_state_dict(weights, strict=True, assign=True)
        net.requires_grad_(False)
        net.eval()
        return cls(config, net, device, dtype)

    @property
    def parts(self) -> frozenset[str]:
        return frozenset(p for p in _PARTS if getattr(self.net, p) is not None)

    def num_parameters(self) -> int:
        """Elements actually held in memory (parameters and codebooks)."""
        return sum(t.numel() for t in self.net.state_dict().values())

    def _waveform(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(wav)) if not isinstance(wav, torch.Tensor) else wav
        if x.ndim == 3 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2:
            raise InputError(
                f"audio must have shape (samples,) or (batch, samples), got {tuple(x.shape)}",
                "downmix to mono first",
            )
        if x.shape[-1] == 0:
            raise InputError("audio has no samples", "give a recording at least a few milliseconds long")
        if not x.is_floating_point():
            raise InputError(f"audio samples must be floats in [-1, 1], got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise InputError("audio contains NaN or infinite samples")
        return x.to(device=self.device, dtype=self.dtype).unsqueeze(1)

    def encoder_output(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The latent the quantizer sees, (batch, dimension, frames) float32 on CPU."""
        encoder = self._require("encoder")
        with torch.no_grad():
            return encoder(self._waveform(wav)).float().cpu()

    def encode(self, wav: np.ndarray | torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """16 kHz mono float wave (samples,) or (batch, samples) -> codes (n_q, batch, frames)."""
        encoder = self._require("encoder")
        n_q = self.n_q if n_q is None else n_q
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q must be between 1 and {self.n_q}, got {n_q}")
        with torch.no_grad():
            latent = encoder(self._waveform(wav))
            return self.net.quantizer.encode(latent, n_q).cpu()

    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """codes (k, batch, frames) of the first k RVQ layers -> float32 (batch, 1, frames * hop)."""
        decoder = self._require("decoder")
        c = torch.as_tensor(codes)
        if c.ndim != 3 or c.shape[0] == 0 or c.shape[2] == 0:
            raise InputError(f"speech codes must have shape (layers, batch, frames), got {tuple(c.shape)}")
        if c.shape[0] > self.n_q:
            raise InputError(f"speech codes have {c.shape[0]} layers, the codec has only {self.n_q}")
        if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise InputError(f"speech codes must be integers, got {c.dtype}")
        low, high = int(c.min()), int(c.max())
        if low < 0 or high >= self.codebook_size:
            raise InputError(
                f"speech codes must lie in 0..{self.codebook_size - 1}, found {low}..{high}",
                "subtract the per-layer token offsets (1024 * layer) before decoding",
            )
        with torch.no_grad():
            latent = self.net.quantizer.decode(c.to(device=self.device, dtype=torch.long))
            return decoder(latent).float().cpu()

    def _require(self, part: str) -> torch.nn.Module:
        module = getattr(self.net, part)
        if module is None:
            raise RuntimeError(f"this SpeechCodec was loaded without the {part}; load it with parts including {part!r}")
        return module
