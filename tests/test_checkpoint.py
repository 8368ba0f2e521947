"""Finding the model folder, telling Instruct from Base, and checking a folder's components (MIO_PROTOCOL §1)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from miocli.errors import ModelError, UsageError
from miocli.model import checkpoint
from miocli.model.checkpoint import (
    LLM,
    SEED,
    SPEECH,
    UNCLIP,
    UNCLIP_SUBFOLDERS,
    check_components,
    detect_variant,
    require_components,
    resolve_model,
)
from miocli.model.tiny import COMPONENT_BUILDERS

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MIO_MODEL, and a hub cache of our own (empty until a test fills it)."""
    monkeypatch.delenv("MIO_MODEL", raising=False)
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


def fake_snapshot(hub: Path, repo_id: str, sha: str = SHA, *, ref: str | None = SHA) -> Path:
    """A hub cache entry laid out as huggingface_hub writes it."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    # A real config without mio_variant: the variant must come from the repo name.
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(ref + "\n")
    return snapshot


# ---- resolve_model ---------------------------------------------------------------------------------
def test_local_folder_is_used_as_is(tiny_model: Path):
    assert resolve_model(str(tiny_model)) == tiny_model


def test_home_relative_folder(tiny_model: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tiny_model.parent))
    assert resolve_model(f"~/{tiny_model.name}") == tiny_model


def test_a_file_is_refused(tiny_model: Path):
    with pytest.raises(ModelError, match="is a file") as caught:
        resolve_model(str(tiny_model / "config.json"))
    assert "folder" in (caught.value.hint or "")


def test_missing_local_path_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="no model folder"):
        resolve_model(str(tmp_path / "nowhere" / "at" / "all"))


def test_mio_model_env_is_the_default(tiny_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MIO_MODEL", str(tiny_model))
    assert resolve_model(None) == tiny_model
    # An explicit --model wins over the variable.
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_model(str(other)) == other


def test_hub_id_resolves_to_the_cached_snapshot(clean_env: Path):
    snapshot = fake_snapshot(clean_env, "m-a-p/MIO-7B-Instruct")
    assert resolve_model("m-a-p/MIO-7B-Instruct") == snapshot
    # With no --model and no MIO_MODEL, the Instruct id is the default.
    assert resolve_model(None) == snapshot


def test_hub_cache_follows_hf_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = fake_snapshot(tmp_path / "hf" / "hub", "m-a-p/MIO-7B-Base")
    assert resolve_model("m-a-p/MIO-7B-Base") == snapshot


def test_stale_ref_falls_back_to_the_newest_snapshot(clean_env: Path):
    old = fake_snapshot(clean_env, "m-a-p/MIO-7B-Instruct", "a" * 40, ref="f" * 40)
    new = fake_snapshot(clean_env, "m-a-p/MIO-7B-Instruct", "b" * 40, ref="f" * 40)
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    assert resolve_model("m-a-p/MIO-7B-Instruct") == new


@pytest.mark.parametrize("repo_id", ["m-a-p/MIO-7B-Instruct", "m-a-p/MIO-7B-Base"])
def test_uncached_hub_id_points_to_mio_download_and_the_tiny_model(clean_env: Path, repo_id: str):
    with pytest.raises(ModelError) as caught:
        resolve_model(repo_id)
    error = caught.value
    assert repo_id in error.message and str(clean_env) in error.message
    assert f"mio download {repo_id}" in (error.hint or "") and "--model tiny" in (error.hint or "")
    assert "mio download" in str(error)  # what the CLI prints


def test_tiny_is_the_tiny_checkpoint_of_the_cache(tiny_model: Path, tiny_cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MIO_CACHE", str(tiny_cache))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny") == tiny_model  # what `mio demo` built there (ensure_tiny_checkpoint builds it)
    (tmp_path / "tiny").mkdir()
    assert resolve_model("tiny") == Path("tiny")  # a folder of that name is still a folder


def test_ref_to_a_missing_snapshot_without_others_is_uncached(clean_env: Path):
    repo = clean_env / "models--m-a-p--MIO-7B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve_model("m-a-p/MIO-7B-Instruct")


# ---- detect_variant ----------------------------------------------------------------------------------
@pytest.fixture
def neutral_root() -> Iterator[Path]:
    # Not under tmp_path: the variant is read from folder names, and pytest names tmp folders
    # after the test, which could say "instruct" or "base" by itself.
    root = Path(tempfile.mkdtemp(prefix="mio-variant-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def folder(root: Path, name: str, config: dict[str, object] | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("override", "expected"), [("base", "base"), ("Instruct", "instruct"), ("BASE", "base")])
def test_override_wins(neutral_root: Path, override: str, expected: str):
    path = folder(neutral_root, "MIO-7B-Instruct", {"mio_variant": "instruct"})
    assert detect_variant(path, override) == expected


def test_unknown_override_is_a_usage_error(neutral_root: Path):
    with pytest.raises(UsageError, match="chat"):
        detect_variant(folder(neutral_root, "m"), "chat")


def test_config_declaration_wins_over_the_name(neutral_root: Path):
    assert detect_variant(folder(neutral_root, "MIO-7B-Instruct", {"mio_variant": "base"})) == "base"
    assert detect_variant(folder(neutral_root, "MIO-7B-Base", {"mio_variant": "instruct"})) == "instruct"


def test_tiny_checkpoint_declares_its_variant(tiny_model: Path):
    assert detect_variant(tiny_model) == "instruct"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MIO-7B-Base", "base"),
        ("mio-7b-base", "base"),
        ("MIO-7B-Instruct", "instruct"),
        ("my-mio-instruct-copy", "instruct"),
        ("models--m-a-p--MIO-7B-Base/snapshots/" + SHA, "base"),
        ("models--m-a-p--MIO-7B-Instruct/snapshots/" + SHA, "instruct"),
        ("knowledge-base/MIO-7B-Instruct", "instruct"),
        ("base-models/MIO-7B-Base", "base"),
        ("hub-base/models--m-a-p--MIO-7B-Base/snapshots/" + SHA, "base"),
    ],
)
def test_variant_from_folder_names(neutral_root: Path, name: str, expected: str):
    assert detect_variant(folder(neutral_root, name, {"model_type": "llama"})) == expected


@pytest.mark.parametrize(
    "name",
    [
        "base-models/mymodel",
        "knowledge-base/model",
        "MIO-7B-Base/weights",
        "knowledge-base/models--someone--my-model/snapshots/" + SHA,
        "models--m-a-p--MIO-7B-Base/elsewhere/" + SHA,  # not a hub snapshot: only its own name counts
    ],
)
def test_parent_folder_names_do_not_decide_the_variant(neutral_root: Path, name: str):
    # Only the folder's own name (and a hub snapshot's models--owner--name folder) says which
    # model it is; a parent called "knowledge-base" or "base-models" says nothing.
    assert detect_variant(folder(neutral_root, name, {"model_type": "llama"})) == "instruct"


def test_a_symlink_named_after_the_model_counts(neutral_root: Path):
    target = folder(neutral_root, "blobs/4f2a", {"model_type": "llama"})
    link = neutral_root / "MIO-7B-Base"
    link.symlink_to(target, target_is_directory=True)
    assert detect_variant(link) == "base"
    assert detect_variant(target) == "instruct"


@pytest.mark.parametrize("config", [None, {"model_type": "llama"}, {"mio_variant": "large"}])
def test_default_is_instruct(neutral_root: Path, config: dict[str, object] | None):
    assert detect_variant(folder(neutral_root, "checkpoint", config)) == "instruct"


def test_corrupt_config_does_not_break_detection(neutral_root: Path):
    path = folder(neutral_root, "MIO-7B-Base")
    (path / "config.json").write_text("{not json")
    assert detect_variant(path) == "base"
    (path / "config.json").write_text("[1, 2]")
    assert detect_variant(path) == "base"


def test_hub_snapshot_variant_through_resolve(clean_env: Path):
    snapshot = fake_snapshot(clean_env, "m-a-p/MIO-7B-Base")
    assert detect_variant(resolve_model("m-a-p/MIO-7B-Base")) == "base"
    assert detect_variant(snapshot, "instruct") == "instruct"


# ---- component checks ----------------------------------------------------------------------------
def test_tiny_checkpoint_passes_the_checks_for_what_it_holds(tiny_model: Path):
    reports = {r.name: r for r in check_components(tiny_model)}
    assert set(reports) == {LLM, SEED, SPEECH, UNCLIP}
    for name in COMPONENT_BUILDERS:
        assert reports[name].ok, (name, reports[name].problems)
        assert reports[name].problems == []
    require_components(tiny_model, list(COMPONENT_BUILDERS))


def test_only_the_asked_components_are_checked(tmp_path: Path):
    reports = check_components(tmp_path, [SPEECH])
    assert [r.name for r in reports] == [SPEECH]
    assert not reports[0].ok


@pytest.fixture
def copy(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def llm_problems(path: Path) -> list[str]:
    [report] = check_components(path, [LLM])
    assert report.ok is (not report.problems)
    return report.problems


def assert_required_fails(path: Path, component: str, *needles: str) -> ModelError:
    with pytest.raises(ModelError) as caught:
        require_components(path, [component])
    message = caught.value.message
    assert f"{component}: " in message and str(path) in message
    for needle in needles:
        assert needle in message, message
    assert "mio doctor" in (caught.value.hint or "")
    return caught.value


def test_missing_tokenizer_model(copy: Path):
    (copy / "tokenizer.model").unlink()
    assert llm_problems(copy) == ["tokenizer.model is missing"]
    assert_required_fails(copy, LLM, "tokenizer.model is missing")


def test_missing_added_tokens(copy: Path):
    (copy / "added_tokens.json").unlink()
    assert llm_problems(copy) == []  # tokenizer_config.json still lists them
    (copy / "tokenizer_config.json").unlink()
    assert_required_fails(copy, LLM, "added_tokens.json", "tokenizer_config.json")


def test_empty_weights(copy: Path):
    (copy / "model.safetensors").write_bytes(b"")
    assert_required_fails(copy, LLM, "weights file is empty")


def test_no_weights(copy: Path):
    (copy / "model.safetensors").unlink()
    assert_required_fails(copy, LLM, "no LLM weights")


def test_pytorch_bin_weights_are_accepted(copy: Path):
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    assert llm_problems(copy) == []


def write_safetensors(path: Path) -> Path:
    """A small but complete safetensors file."""
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7)}, str(path))
    return path


def write_index(path: Path, shards: list[str], name: str = "model.safetensors.index.json") -> None:
    weight_map = {f"model.layers.{i}.weight": shard for i, shard in enumerate(shards)}
    (path / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def test_missing_shard_named_from_the_index(copy: Path):
    (copy / "model.safetensors").unlink()
    shards = [shard_name(i, 3) for i in (1, 2, 3)]
    write_index(copy, shards)
    write_safetensors(copy / shards[0])
    (copy / shards[2]).write_bytes(b"")  # half-downloaded: present but empty
    error = assert_required_fails(copy, LLM, shards[1], shards[2])
    assert shards[0] not in error.message


def test_many_missing_shards_are_summarised(copy: Path):
    shards = [shard_name(i, 6) for i in range(1, 7)]
    write_index(copy, shards)
    [problem] = llm_problems(copy)
    assert shards[0] in problem and "and 3 more" in problem
    for shard in shards:
        write_safetensors(copy / shard)
    assert llm_problems(copy) == []


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    assert keep < len(data)
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("cut", ["half", "last-byte", "after-header", "inside-header", "inside-length"])
def test_truncated_weights_are_named_with_a_hint(copy: Path, cut: str):
    # The size > 0 check passes for a half-downloaded file; its own header says how long it must be.
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    header_end = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    keep = {"half": size // 2, "last-byte": size - 1, "after-header": header_end, "inside-header": 9,
            "inside-length": 4}[cut]
    truncate(weights, keep)
    [problem] = llm_problems(copy)
    assert "model.safetensors" in problem and "truncated" in problem and "mio download" in problem
    assert_required_fails(copy, LLM, "model.safetensors is truncated")


def test_truncated_weights_message_gives_the_sizes(copy: Path):
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    truncate(weights, size - 100)
    [problem] = llm_problems(copy)
    assert f"{size - 100} of {size} bytes" in problem


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"x" * 64, "corrupt"),  # a length field far beyond any real header
        ((20).to_bytes(8, "little") + b"{not json at all....", "corrupt"),
        ((2).to_bytes(8, "little") + b"[]", "corrupt"),
        ((40).to_bytes(8, "little") + b'{"w": {"data_offsets": [8, 4]}}' + b" " * 9, "corrupt"),
    ],
    ids=["garbage", "not-json", "not-an-object", "bad-offsets"],
)
def test_corrupt_safetensors_header(copy: Path, content: bytes, needle: str):
    (copy / "model.safetensors").write_bytes(content)
    [problem] = llm_problems(copy)
    assert problem.startswith("model.safetensors is ") and needle in problem and "mio download" in problem


def test_header_check_never_reads_tensor_data(copy: Path):
    # A header that promises 8 GiB of data, in a sparse file of that size: the check only compares
    # sizes, so it passes without touching the (absent) data.
    header = json.dumps({"w": {"dtype": "U8", "shape": [2**33], "data_offsets": [0, 2**33]}}).encode()
    weights = copy / "model.safetensors"
    with open(weights, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + 2**33)
    assert llm_problems(copy) == []
    with open(weights, "r+b") as handle:
        handle.truncate(8 + len(header) + 2**33 - 1)
    [problem] = llm_problems(copy)
    assert "truncated" in problem


def test_truncated_shard_is_named_and_whole_shards_are_not(copy: Path):
    (copy / "model.safetensors").unlink()
    shards = [shard_name(i, 3) for i in (1, 2, 3)]
    write_index(copy, shards)
    for shard in shards:
        write_safetensors(copy / shard)
    assert llm_problems(copy) == []
    truncate(copy / shards[1], (copy / shards[1]).stat().st_size - 1)
    [problem] = llm_problems(copy)
    assert problem.startswith(f"{shards[1]} is truncated")
    error = assert_required_fails(copy, LLM, shards[1], "mio download")
    assert shards[0] not in error.message and shards[2] not in error.message


def test_bin_index_is_read_too(copy: Path):
    (copy / "model.safetensors").unlink()
    write_index(copy, ["pytorch_model-00001-of-00001.bin"], name="pytorch_model.bin.index.json")
    assert_required_fails(copy, LLM, "pytorch_model-00001-of-00001.bin")


def test_corrupt_index(copy: Path):
    (copy / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert_required_fails(copy, LLM, "model.safetensors.index.json is corrupt")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"model_type": "llama", ', "config.json is corrupt"),
        (b"\xff\xfe\x00garbage", "config.json is corrupt"),
        ('{"hidden_size": 64}', "no model_type"),
        ("[]", "no model_type"),
    ],
)
def test_corrupt_config(copy: Path, content: str | bytes, needle: str):
    target = copy / "config.json"
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    assert_required_fails(copy, LLM, needle)


def test_missing_config(copy: Path):
    (copy / "config.json").unlink()
    assert_required_fails(copy, LLM, "config.json is missing")


def test_other_model_type_is_a_note_not_a_failure(copy: Path):
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "mistral"
    (copy / "config.json").write_text(json.dumps(config))
    [report] = check_components(copy, [LLM])
    assert report.ok and any("mistral" in note for note in report.notes)


def make_speech(path: Path) -> Path:
    folder = path / "SpeechTokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "SpeechTokenizer.pt"):
        if not (folder / name).exists():
            (folder / name).write_bytes(b"{}")
    return folder


@pytest.mark.parametrize("missing", ["config.json", "SpeechTokenizer.pt"])
def test_missing_speech_tokenizer_file(copy: Path, missing: str):
    folder = make_speech(copy)
    assert check_components(copy, [SPEECH])[0].ok
    (folder / missing).unlink()
    assert_required_fails(copy, SPEECH, f"SpeechTokenizer/{missing} is missing")


def test_empty_speech_tokenizer_weights(copy: Path):
    folder = make_speech(copy)
    (folder / "SpeechTokenizer.pt").write_bytes(b"")
    assert_required_fails(copy, SPEECH, "SpeechTokenizer/SpeechTokenizer.pt is missing or empty")


def test_missing_speech_folder(tmp_path: Path):
    error = assert_required_fails(tmp_path, SPEECH, "SpeechTokenizer/config.json", "SpeechTokenizer/SpeechTokenizer.pt")
    assert "mio download" in (error.hint or "")


def make_unclip(path: Path) -> Path:
    folder = path / "stable-diffusion-2-1-unclip"
    for sub in UNCLIP_SUBFOLDERS:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").touch()
    return folder


def test_missing_unclip_subfolders_are_each_named(copy: Path):
    folder = make_unclip(copy)
    assert check_components(copy, [UNCLIP])[0].ok
    shutil.rmtree(folder / "vae")
    shutil.rmtree(folder / "image_noising_scheduler")
    error = assert_required_fails(copy, UNCLIP, "stable-diffusion-2-1-unclip/vae/",
                                  "stable-diffusion-2-1-unclip/image_noising_scheduler/")
    assert "unet" not in error.message


def test_missing_unclip_index(copy: Path):
    folder = make_unclip(copy)
    (folder / "model_index.json").unlink()
    assert_required_fails(copy, UNCLIP, "model_index.json is missing")


def test_seed_quantizer_missing_and_vit_note(copy: Path):
    folder = copy / "seed-tokenizer-2"
    folder.mkdir(exist_ok=True)
    (folder / "seed_quantizer.pt").unlink(missing_ok=True)
    assert_required_fails(copy, SEED, "seed-tokenizer-2/seed_quantizer.pt")
    (folder / "seed_quantizer.pt").write_bytes(b"weights")
    (folder / "eva_vit_g.pth").unlink(missing_ok=True)
    [report] = check_components(copy, [SEED])
    # The separate ViT file is optional (it may be inside seed_quantizer.pt): a note, never a failure.
    assert report.ok and any("eva_vit_g.pth" in note for note in report.notes)


def test_one_error_lists_every_incomplete_component(copy: Path):
    (copy / "tokenizer.model").unlink()
    shutil.rmtree(copy / "SpeechTokenizer", ignore_errors=True)
    with pytest.raises(ModelError) as caught:
        require_components(copy, [LLM, SPEECH, UNCLIP] if UNCLIP in COMPONENT_BUILDERS else [LLM, SPEECH])
    message = caught.value.message
    assert "llm: tokenizer.model is missing" in message
    assert "speech: SpeechTokenizer/config.json is missing or empty" in message
    assert "unclip:" not in message


def test_runtime_refuses_a_damaged_folder_before_loading(copy: Path):
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    (copy / "tokenizer.model").unlink()
    runtime = Runtime(RuntimeOptions(model=str(copy)))
    with pytest.raises(ModelError, match="tokenizer.model is missing"):
        _ = runtime.tokenizer
    assert runtime.loaded() == []


def test_component_names_are_stable():
    # doctor, the task table and the tiny builder all key on these names.
    assert checkpoint.COMPONENTS == ("llm", "seed", "speech", "unclip")
