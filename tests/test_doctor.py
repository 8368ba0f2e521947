"""`mio doctor`: the checkpoint check catches files that are present but incomplete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mio_testing import run_mio
from miocli.cli import doctor


@pytest.fixture
def truncated(tiny_model: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint whose model.safetensors lost its last quarter (a cut download)."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 3 // 4])
    return model


def llm_entry(report: dict) -> dict:
    [entry] = [c for c in report["checkpoint"]["components"] if c["name"] == "llm"]
    return entry


def test_doctor_passes_the_tiny_checkpoint(tiny_model: Path):
    report = doctor.collect(str(tiny_model), None, "cpu")
    assert report["checkpoint"]["ok"], report["checkpoint"]
    assert llm_entry(report)["problems"] == []


def test_doctor_reports_a_truncated_weights_file_by_name(truncated: Path):
    report = doctor.collect(str(truncated), None, "cpu")
    assert report["checkpoint"]["ok"] is False
    entry = llm_entry(report)
    assert entry["ok"] is False
    [problem] = entry["problems"]
    assert problem.startswith("model.safetensors is truncated")
    assert "mio download" in problem
    # The other components are still checked and reported on their own.
    assert all(c["ok"] for c in report["checkpoint"]["components"] if c["name"] != "llm")


def test_mio_doctor_exits_3_on_a_truncated_checkpoint(truncated: Path):
    done = run_mio("doctor", "--model", str(truncated), "--device", "cpu", "--json")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    [problem] = llm_entry(report)["problems"]
    assert "model.safetensors is truncated" in problem and "mio download" in problem
