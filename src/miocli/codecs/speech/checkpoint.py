"""The on-disk layout of `SpeechTokenizer.pt` and how it becomes inference weights.

The file is the reference module's `state_dict()`: convolutions in old-style weight norm
(`weight_g`, `weight_v`), the training-only `transform` projection, and per VQ layer the
codebook plus its EMA statistics. We check the whole file against the layout the config
implies (so a wrong or truncated checkpoint fails loudly, like the reference's strict load),
then keep only what inference needs: folded conv weights, LSTM weights, codebooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from miocli.codecs.speech.config import SpeechConfig
from miocli.codecs.speech.layers import Codebook, SpeechTokenizerNet
from miocli.codecs.weights import CHECK_HINT, format_keys, read_tensor_file
from miocli.errors import ModelError

_CKPT_HINT = f"re-download the SpeechTokenizer folder of the model (`mio download`); {CHECK_HINT}"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "SpeechTokenizer.pt"


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    kind: str  # "parameter" or "buffer", as in the reference module


def build_meta(config: SpeechConfig, encoder: bool = True, decoder: bool = True) -> SpeechTokenizerNet:
    """Module skeleton with no storage: building it costs nothing at the real size."""
    with torch.device("meta"):
        return SpeechTokenizerNet(config, encoder=encoder, decoder=decoder)


def _module_entries(prefix: str, module: nn.Module) -> Iterable[Entry]:
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, nn.Conv1d | nn.ConvTranspose1d):
            weight = tuple(sub.weight.shape)
            # Weight norm over dim 0, so g has one value per leading channel (the *input*
            # channel for transposed convs); weight_norm re-registers weight after bias.
            yield Entry(
                f"{name}.bias",
                (weight[1] if isinstance(sub, nn.ConvTranspose1d) else weight[0],),
                "parameter",
            )
            yield Entry(f"{name}.weight_g", (weight[0],) + (1,) * (len(weight) - 1), "parameter")
            yield Entry(f"{name}.weight_v", weight, "parameter")
        elif isinstance(sub, nn.LSTM):
            for pname, param in sub.named_parameters(recurse=False):
                yield Entry(f"{name}.{pname}", tuple(param.shape), "parameter")
        elif isinstance(sub, Codebook):
            size, dim = sub.embed.shape
            yield Entry(f"{name}.inited", (1,), "buffer")
            yield Entry(f"{name}.cluster_size", (size,), "buffer")
            yield Entry(f"{name}.embed", (size, dim), "buffer")
            yield Entry(f"{name}.embed_avg", (size, dim), "buffer")


def checkpoint_layout(config: SpeechConfig) -> list[Entry]:
    """Keys, shapes and kinds of the reference state_dict, in the reference's order."""
    net = build_meta(config)
    assert net.encoder is not None and net.decoder is not None
    entries = list(_module_entries("encoder", net.encoder))
    if config.dimension != config.semantic_dimension:
        # Training-time projection to the HuBERT teacher's width (an Identity when equal).
        entries.append(Entry("transform.weight", (config.semantic_dimension, config.dimension), "parameter"))
        entries.append(Entry("transform.bias", (config.semantic_dimension,), "parameter"))
    entries += _module_entries("quantizer", net.quantizer)
    entries += _module_entries("decoder", net.decoder)
    return entries


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (memory-mapped when the format allows); ModelError when unusable."""
    if not path.is_file():
        raise ModelError(f"SpeechTokenizer weights not found: {path}", _CKPT_HINT)
    if path.stat().st_size == 0:
        raise ModelError(f"SpeechTokenizer weights file is empty (0 bytes): {path}", _CKPT_HINT)
    return read_tensor_file(path, _CKPT_HINT)


def read_folder(folder: Path) -> tuple[SpeechConfig, dict[str, torch.Tensor]]:
    """The config and the strictly checked state dict of `<model dir>/SpeechTokenizer`.

    The weights are memory-mapped, so checking them (what `mio doctor` does) reads keys, shapes
    and dtypes, not the data. Raises ModelError naming the file.
    """
    folder = Path(folder)
    config = SpeechConfig.from_file(folder / CONFIG_NAME)
    weights_path = folder / WEIGHTS_NAME
    state = read_state_dict(weights_path)
    validate(state, config, weights_path)
    return config, state


def validate(state: Mapping[str, torch.Tensor], config: SpeechConfig, path: Path) -> None:
    """Strict check of the file against the layout `config` implies; raises ModelError."""
    layout = checkpoint_layout(config)
    expected = {e.key: e.shape for e in layout}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    not_float = [f"{k} ({state[k].dtype})" for k in expected if k in state and not state[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"missing keys: {format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {format_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {format_keys(wrong)}")
    if not_float:
        problems.append(f"non-float tensors: {format_keys(not_float)}")
    if problems:
        raise ModelError(
            f"{path} does not match its config.json: " + "; ".join(problems),
            "the weights and config.json must come from the same SpeechTokenizer release; " + _CKPT_HINT,
        )
    for i in range(config.n_q):
        key = f"quantizer.vq.layers.{i}._codebook.inited"
        if not bool(state[key].item()):
            # An uninitialised codebook is all zeros: every frame would get code 0.
            raise ModelError(f"{path}: codebook layer {i} was never initialised ({key} = 0)", _CKPT_HINT)


def fold_weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, norms taken over every dim but 0 (torch weight_norm's default)."""
    # Never fold in half precision: the norm of a 1024x2048x7 kernel needs float32 at least.
    compute = torch.promote_types(weight_v.dtype, torch.float32)
    g = weight_g.to(compute)
    v = weight_v.to(compute)
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.ndim)), keepdim=True)
    return v * (g / norm)


def inference_weights(
    state: Mapping[str, torch.Tensor],
    net: SpeechTokenizerNet,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The tensors `net` (possibly encoder- or decoder-only) needs, keyed like its state_dict.

    Tensors that need no change stay the (memory-mapped) ones torch.load returned, so the
    CPU float32 case never copies them.
    """
    out: dict[str, torch.Tensor] = {}
    for key in net.state_dict():
        if key.endswith(".weight") and f"{key}_g" in state:
            stem = key[: -len("weight")]
            tensor = fold_weight_norm(state[f"{stem}weight_g"], state[f"{stem}weight_v"])
        else:
            tensor = state[key]
        out[key] = tensor.to(device=device, dtype=dtype)
    return out
