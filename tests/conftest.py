"""Shared fixtures: one tiny checkpoint per test session, and a runner for the real `mio` app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mio_testing import quantization_logits
from miocli.engines.rules import MediaVocabulary
from miocli.model.tiny import default_cache_dir, ensure_tiny_checkpoint
from miocli.model.tokenizer import MioTokenizer

GOLDEN = Path(__file__).parent / "golden"
# mio's CPU kernel is built once for the whole session (and kept between sessions), whatever cache a test uses
os.environ.setdefault("MIO_KERNEL_CACHE", str(default_cache_dir() / "kernels"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mio-cache")


@pytest.fixture(scope="session")
def tiny_model(tiny_cache: Path) -> Path:
    """A tiny Instruct checkpoint with every component the project can build."""
    return ensure_tiny_checkpoint("instruct", cache_dir=tiny_cache)




@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> MioTokenizer:
    """The tiny checkpoint's tokenizer (a module may define its own `tokenizer` instead)."""
    return MioTokenizer.from_dir(tiny_model)


@pytest.fixture(scope="module")
def vocab(tokenizer: MioTokenizer) -> MediaVocabulary:
    return MediaVocabulary(tokenizer)


@pytest.fixture(scope="module")
def reference_logits(tiny_model: Path) -> Any:
    """The unquantized tiny LLM's logits (mio_testing.quantization_logits)."""
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    return quantization_logits(Runtime(RuntimeOptions(model=str(tiny_model), quantize="none")))
