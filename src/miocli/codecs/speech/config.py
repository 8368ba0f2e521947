"""SpeechTokenizer `config.json`: parsing and validation.

Only the keys the reference constructor reads matter; the published file also carries
training settings (learning rate, mel parameters, ...), which are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from miocli.errors import ModelError

_CONFIG_HINT = "re-download the model's SpeechTokenizer folder (`mio download`) or restore its config.json"

# The published MIO / SpeechTokenizer configuration, used by the tiny builder and benchmarks.
REAL_CONFIG: dict[str, Any] = {
    "n_filters": 64,
    "strides": [8, 5, 4, 2],
    "dimension": 1024,
    "semantic_dimension": 768,
    "bidirectional": True,
    "dilation_base": 2,
    "residual_kernel_size": 3,
    "n_residual_layers": 1,
    "lstm_layers": 2,
    "activation": "ELU",
    "codebook_size": 1024,
    "n_q": 8,
    "sample_rate": 16000,
}


@dataclass(frozen=True)
class SpeechConfig:
    n_filters: int
    strides: tuple[int, ...]
    dimension: int
    semantic_dimension: int
    bidirectional: bool
    dilation_base: int
    residual_kernel_size: int
    n_residual_layers: int
    lstm_layers: int
    activation: str
    codebook_size: int
    n_q: int
    sample_rate: int

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["strides"] = list(self.strides)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "config.json") -> SpeechConfig:
        """Validate a decoded config; every problem names `source` and the offending key."""
        if not isinstance(data, dict):
            raise ModelError(f"{source} must contain a JSON object, found {type(data).__name__}", _CONFIG_HINT)
        missing = [name for name in _FIELDS if name not in data]
        if missing:
            raise ModelError(f"{source} lacks required key(s): {', '.join(missing)}", _CONFIG_HINT)

        def positive_int(name: str, minimum: int = 1) -> int:
            value = data[name]
            # bool is an int subclass; `true` where a width is expected is a broken file
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ModelError(f"{source}: '{name}' must be an integer >= {minimum}, found {value!r}", _CONFIG_HINT)
            return value

        strides = data["strides"]
        if (
            not isinstance(strides, list)
            or not strides
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides)
        ):
            raise ModelError(
                f"{source}: 'strides' must be a non-empty list of positive integers, found {strides!r}",
                _CONFIG_HINT,
            )
        bidirectional = data["bidirectional"]
        if not isinstance(bidirectional, bool):
            raise ModelError(f"{source}: 'bidirectional' must be true or false, found {bidirectional!r}", _CONFIG_HINT)
        activation = data["activation"]
        if activation != "ELU":
            raise ModelError(
                f'{source}: activation {activation!r} is not supported (SpeechTokenizer uses "ELU")',
                _CONFIG_HINT,
            )
        config = cls(
            n_filters=positive_int("n_filters"),
            strides=tuple(strides),
            dimension=positive_int("dimension"),
            semantic_dimension=positive_int("semantic_dimension"),
            bidirectional=bidirectional,
            dilation_base=positive_int("dilation_base"),
            residual_kernel_size=positive_int("residual_kernel_size"),
            n_residual_layers=positive_int("n_residual_layers", 0),
            lstm_layers=positive_int("lstm_layers", 0),
            activation=activation,
            codebook_size=positive_int("codebook_size"),
            n_q=positive_int("n_q"),
            sample_rate=positive_int("sample_rate"),
        )
        if config.bidirectional and config.lstm_layers == 0:
            # The encoder's last conv expects the doubled width a bidirectional LSTM produces.
            raise ModelError(f"{source}: 'bidirectional' is true but 'lstm_layers' is 0", _CONFIG_HINT)
        return config

    @classmethod
    def from_file(cls, path: Path) -> SpeechConfig:
        if not path.is_file():
            raise ModelError(f"SpeechTokenizer config not found: {path}", _CONFIG_HINT)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read {path}: {exc}", _CONFIG_HINT) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path} is not valid JSON ({exc})", _CONFIG_HINT) from exc
        return cls.from_dict(data, source=str(path))


_FIELDS = tuple(SpeechConfig.__dataclass_fields__)
