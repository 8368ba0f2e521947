"""Reading codec checkpoints: `torch.load` with `weights_only`, memory-mapped, checked to be a state dict.

Both codecs (SEED-Tokenizer-2 and SpeechTokenizer) ship PyTorch checkpoints. `weights_only=True`
refuses pickled code, and `mmap=True` maps the file instead of reading it, so tensors that need no
conversion stay the file's pages. Every way a file can be unusable becomes one ModelError that
names it.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from miocli.errors import ModelError

# What every hint about a damaged codec file ends with.
CHECK_HINT = "`mio doctor` checks every component"
# Some releases wrap the weights: {"model": {...}}, {"state_dict": {...}}, {"module": {...}}.
_WRAPPERS = ("model", "state_dict", "module")
_SHOW = 5  # how many offending keys a message lists


def format_keys(keys: list[str]) -> str:
    """The first few keys, and how many more there are."""
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(path: Path, hint: str) -> Any:
    """`torch.load(weights_only=True)` of `path` onto the CPU, memory-mapped when its format allows."""
    try:
        # torch warns about pickle details of files it then refuses or reads: the error line says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                # Files written with the legacy (pre-1.6, non-zip) serialisation cannot be mapped: read them whole.
                if "mmap" not in str(exc) and "zipfile" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's first line is advice about weights_only=False, which mio never does: say what it refused.
        detail = _first_line(exc)
        reason = str(exc).split("WeightsUnpickler error:", 1)
        if len(reason) == 2 and reason[1].strip():
            detail = reason[1].strip().splitlines()[0].split(" Please use", 1)[0]
        raise ModelError(
            f"{path} cannot be read as a plain tensor checkpoint (refused by torch.load(weights_only=True): "
            f"{detail})",
            hint,
        ) from exc
    except Exception as exc:  # torch.load on garbage fails in many ways (EOFError, IndexError, KeyError, ...)
        raise ModelError(f"{path} cannot be read as a PyTorch checkpoint, it is corrupt or incomplete "
                         f"({_first_line(exc)})", hint) from exc


def read_tensor_file(path: Path, hint: str) -> dict[str, torch.Tensor]:
    """The state dict (name -> tensor) in a checkpoint file, unwrapped from {"model": ...} and the like."""
    obj = load_checkpoint(path, hint)
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in _WRAPPERS:
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path} holds a {type(obj).__name__}, expected a state dict of tensors", hint)
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{path} holds non-tensor entries: {format_keys(bad)}", hint)
    return dict(obj)
