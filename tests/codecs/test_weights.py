"""The one checkpoint reader both codecs use: weights_only, memory-mapped, every failure a ModelError."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from miocli.codecs.seed import model as seed_model
from miocli.codecs.speech import checkpoint as speech_checkpoint
from miocli.codecs.weights import format_keys, read_tensor_file
from miocli.errors import ModelError

HINT = "download it again"
STATE = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}


def saved(path: Path, obj: object, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def assert_same(state: dict[str, torch.Tensor]) -> None:
    assert state.keys() == STATE.keys()
    for key, tensor in STATE.items():
        assert torch.equal(state[key], tensor)


def test_both_codecs_read_through_the_shared_helper():
    assert seed_model.read_tensor_file is read_tensor_file
    assert speech_checkpoint.read_tensor_file is read_tensor_file


def test_zip_checkpoint_is_memory_mapped(tmp_path: Path):
    path = saved(tmp_path / "w.pt", STATE)
    state = read_tensor_file(path, HINT)
    assert_same(state)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: mapped, not read, so the file shows among this process's mappings
        assert str(path) in maps.read_text()


def test_legacy_checkpoint_is_read_whole(tmp_path: Path):
    path = saved(tmp_path / "legacy.pt", STATE, _use_new_zipfile_serialization=False)
    assert_same(read_tensor_file(path, HINT))


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "module"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path: Path, wrapper: str):
    assert_same(read_tensor_file(saved(tmp_path / "w.pt", {wrapper: STATE, "epoch": 3}), HINT))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not a checkpoint", "cannot be read"),
        (b"", "cannot be read"),
        ("truncated", "cannot be read"),
    ],
    ids=["text", "empty", "truncated"],
)
def test_unreadable_files_are_model_errors_naming_the_file(tmp_path: Path, content: bytes | str, needle: str):
    path = tmp_path / "w.pt"
    if content == "truncated":
        data = saved(tmp_path / "whole.pt", STATE).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=needle) as caught:
        read_tensor_file(path, HINT)
    assert str(path) in caught.value.message and caught.value.hint == HINT


def test_pickled_code_is_refused(tmp_path: Path):
    class Payload:
        def __reduce__(self):
            return (print, ("never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"a": Payload()}, handle, protocol=2)
    with pytest.raises(ModelError, match="cannot be read") as caught:
        read_tensor_file(path, HINT)
    assert str(path) in caught.value.message


def test_not_a_state_dict(tmp_path: Path):
    with pytest.raises(ModelError, match="holds a list, expected a state dict"):
        read_tensor_file(saved(tmp_path / "w.pt", [torch.zeros(2)]), HINT)
    with pytest.raises(ModelError, match=r"non-tensor entries: step"):
        read_tensor_file(saved(tmp_path / "w.pt", {**STATE, "step": 5}), HINT)


def test_format_keys_shows_five_and_counts_the_rest():
    assert format_keys(["a", "b"]) == "a, b"
    assert format_keys([str(i) for i in range(8)]) == "0, 1, 2, 3, 4 (+3 more)"
