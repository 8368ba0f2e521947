"""Shared fixtures: one tiny checkpoint per test session, and a runner for the real `mio` app."""

from __future__ import annotations

from pathlib import Path

import pytest

from miocli.tiny import ensure_tiny_checkpoint

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mio-cache")


@pytest.fixture(scope="session")
def tiny_model(tiny_cache: Path) -> Path:
    """A tiny Instruct checkpoint with every component the project can build."""
    return ensure_tiny_checkpoint("instruct", cache_dir=tiny_cache)


