"""SEED-Tokenizer-2 codec: golden parity with the reference, checkpoint strictness, parts, tiny builder."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from miocli.codecs.seed import HeadCounts, SeedCodec, SeedDims, layout
from miocli.codecs.seed.model import SeedModel
from miocli.codecs.seed.tiny import TINY_DIMS, build_tiny, random_state
from miocli.errors import InputError, ModelError
from miocli.media.image import load_image, preprocess

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "seed"
NAMES = ("synthetic_A", "synthetic_B")
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
TINY_CONFIG = {"vit_num_heads": 4, "qformer_num_heads": 12}


def _golden_state() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / "seed-tokenizer-2" / "seed_quantizer.pt", weights_only=True)


def _write_folder(folder: Path, state: dict[str, torch.Tensor] | None = None,
                  config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        shutil.copy(GOLDEN / "seed-tokenizer-2" / "seed_quantizer.pt", folder / "seed_quantizer.pt")
    else:
        torch.save(state, folder / "seed_quantizer.pt")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG if config is None else config))
    return folder


@pytest.fixture(scope="module")
def golden_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("seed") / "seed-tokenizer-2")


@pytest.fixture(scope="module")
def codec(golden_folder: Path) -> SeedCodec:
    return SeedCodec.load(golden_folder)


def _pixels(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN / f"preprocessed_{name}.npy"))[None]


# ---------------------------------------------------------------- golden parity


@pytest.mark.parametrize("name", NAMES)
def test_intermediates_match_reference(codec: SeedCodec, name: str) -> None:
    trace = codec.trace(_pixels(name))
    for field in ("vit_ln", "qformer_out", "encode_task_out"):
        want = np.load(GOLDEN / f"intermediate_{name}_{field}.npy")
        got = getattr(trace, field).numpy()
        assert got.shape == want.shape, field
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=field)
    assert trace.ids[0].tolist() == EXPECTED[name]["token_ids"]


def test_ids_from_png_are_exact_and_batch_agrees(codec: SeedCodec) -> None:
    images = [load_image(GOLDEN / EXPECTED[name]["image_file"]) for name in NAMES]
    ids = codec.encode(torch.from_numpy(preprocess(images)))
    assert ids.dtype == torch.int64 and ids.shape == (2, 32)
    for row, name in zip(ids, NAMES, strict=True):
        assert row.tolist() == EXPECTED[name]["token_ids"]
    assert codec.encode(_pixels("synthetic_B"))[0].tolist() == ids[1].tolist()


@pytest.mark.parametrize("name", [*NAMES, "fixed_id_list"])
def test_embedding_matches_reference(codec: SeedCodec, name: str) -> None:
    entry = EXPECTED[name]
    got = codec.embed(torch.tensor([entry["token_ids"]]))
    want = np.load(GOLDEN / entry["expected_embedding_npy"])
    assert got.dtype == torch.float32 and got.shape == (1, 1024)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=0)


def test_public_attributes(codec: SeedCodec) -> None:
    assert (codec.num_tokens, codec.codebook_size, codec.embed_dim) == (32, 8192, 1024)
    # the golden file's 2,634,926 elements less the reconstruction branch (4 blocks + pos_embed)
    assert codec.num_parameters() == 2_634_926 - 4 * 111_840 - 32 * 96


def test_embed_batch_and_bad_ids(codec: SeedCodec) -> None:
    ids = torch.tensor([EXPECTED[n]["token_ids"] for n in NAMES])
    both = codec.embed(ids)
    np.testing.assert_allclose(both[1:].numpy(), codec.embed(ids[1:]).numpy(), atol=1e-5)
    with pytest.raises(InputError, match="exactly 32"):
        codec.embed(ids[:, :5])
    with pytest.raises(InputError, match="8192"):
        codec.embed(torch.full((1, 32), 8192))
    with pytest.raises(ValueError, match="pixels"):
        codec.encode(torch.zeros(1, 3, 100, 100))


# ---------------------------------------------------------------- layout at real size


def test_real_size_layout_is_the_manifest() -> None:
    manifest = json.loads((GOLDEN / "manifest_real_full_size.json").read_text())
    want = {e["key"]: tuple(e["shape"]) for e in manifest["entries"]}
    real = SeedDims.real()
    assert layout.reference_shapes(real) == want
    assert list(layout.reference_shapes(real)) == list(want)  # same order too

    # the sizes are recovered from the shapes alone, and the manifest passes the key check
    vit = layout.infer_vit(want, HeadCounts(), layout.VIT_PREFIX, from_eva_file=False)
    assert layout.infer_dims(want, vit, HeadCounts()) == real
    layout.check_quantizer(want, real, vit_inside=True)

    with torch.device("meta"):
        model = SeedModel(real)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    unused = {k for k in want if k == "pos_embed" or k.startswith("blocks.") or k.endswith("position_ids")}
    assert built.keys() | unused == want.keys() and not built.keys() & unused
    assert all(built[k] == want[k] for k in built)
    n_unused = sum(int(np.prod(want[k])) for k in unused if not k.endswith("position_ids"))
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameter_elements"] - n_unused


# ---------------------------------------------------------------- strictness


def test_vit_from_eva_file(tmp_path: Path, codec: SeedCodec) -> None:
    state = {k: v for k, v in _golden_state().items() if not k.startswith("visual_encoder.")}
    folder = _write_folder(tmp_path / "seed-tokenizer-2", state)
    shutil.copy(GOLDEN / "seed-tokenizer-2" / "eva_vit_g.pth", folder / "eva_vit_g.pth")
    other = SeedCodec.load(folder)
    for name in NAMES:
        a, b = other.trace(_pixels(name)), codec.trace(_pixels(name))
        assert torch.equal(a.vit_ln, b.vit_ln) and torch.equal(a.ids, b.ids)


def test_missing_vit_weights_is_a_model_error_naming_the_file(tmp_path: Path) -> None:
    state = {k: v for k, v in _golden_state().items() if not k.startswith("visual_encoder.")}
    folder = _write_folder(tmp_path / "seed-tokenizer-2", state)
    with pytest.raises(ModelError, match="eva_vit_g.pth") as info:
        SeedCodec.load(folder)
    assert "never downloads" in str(info.value)
    # image generation only decodes: it does not need the ViT at all
    decoder = SeedCodec.load(folder, parts=frozenset({"decoder"}))
    assert decoder.embed(torch.tensor([EXPECTED["fixed_id_list"]["token_ids"]])).shape == (1, 1024)


def test_missing_folder_or_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="seed_quantizer.pt"):
        SeedCodec.load(tmp_path / "nowhere")
    (tmp_path / "seed_quantizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot be read"):
        SeedCodec.load(tmp_path)


def _edit_missing(s: dict) -> str:
    key = "Qformer.bert.encoder.layer.1.output_query.dense.weight"
    del s[key]
    return key


def _edit_unexpected(s: dict) -> str:
    key = "Qformer.bert.encoder.layer.0.extra_adapter.weight"
    s[key] = torch.zeros(3)
    return key


def _edit_shape(s: dict) -> str:
    key = "blocks_image.2.mlp.fc1.weight"
    s[key] = torch.zeros(100, 96)
    return key


def _edit_partial_recon(s: dict) -> str:
    key = "blocks.3.attn.proj.bias"
    del s[key]
    return key


def _edit_vit_block(s: dict) -> str:
    key = "visual_encoder.blocks.1.attn.q_bias"
    del s[key]
    return key


@pytest.mark.parametrize(
    "edit, words",
    [(_edit_missing, "missing keys"), (_edit_unexpected, "unexpected keys"), (_edit_shape, "wrong shapes"),
     (_edit_partial_recon, "missing keys"), (_edit_vit_block, "missing keys")],
)
def test_checkpoint_is_checked_strictly(tmp_path: Path, edit, words: str) -> None:
    state = _golden_state()
    key = edit(state)
    folder = _write_folder(tmp_path / "seed-tokenizer-2", state)
    with pytest.raises(ModelError, match=words) as info:
        SeedCodec.load(folder, parts=frozenset({"decoder"}) if "blocks" in key else frozenset({"encoder"}))
    assert key in str(info.value) and "seed_quantizer.pt" in str(info.value)


def test_unused_keys_may_be_absent_or_text_side(tmp_path: Path, codec: SeedCodec) -> None:
    state = {k: v for k, v in _golden_state().items()
             if not (k == "pos_embed" or k.startswith("blocks.") or k.endswith("position_ids"))}
    state["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(7, 96)
    state["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(192, 96)
    other = SeedCodec.load(_write_folder(tmp_path / "seed-tokenizer-2", state))
    assert torch.equal(other.encode(_pixels("synthetic_A")), codec.encode(_pixels("synthetic_A")))


def test_head_counts_come_from_config(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "a", config={"vit_num_heads": 5})
    with pytest.raises(ModelError, match="vit_num_heads=5"):
        SeedCodec.load(folder)
    folder = _write_folder(tmp_path / "b", config={"vit_num_heads": "four"})
    with pytest.raises(ModelError, match="config.json"):
        SeedCodec.load(folder)
    # without config.json the real head counts are assumed; an override replaces both
    (folder / "config.json").unlink()
    assert SeedCodec.load(folder, parts=frozenset({"decoder"})).dims.qformer.num_heads == 12
    over = SeedCodec.load(folder, heads=HeadCounts(vit=4, qformer=12))
    assert over.encode(_pixels("synthetic_A"))[0].tolist() == EXPECTED["synthetic_A"]["token_ids"]


# ---------------------------------------------------------------- parts and dtypes


def test_decoder_part_loads_no_encoder(golden_folder: Path, codec: SeedCodec) -> None:
    dec = SeedCodec.load(golden_folder, parts=frozenset({"decoder"}))
    names = [n for n, _ in dec.model.named_parameters()]
    assert not any(n.startswith(("visual_encoder.", "Qformer.", "ln_vision", "query_tokens")) for n in names)
    assert any(n.startswith("blocks_image.") for n in names)
    ids = torch.tensor([EXPECTED["fixed_id_list"]["token_ids"]])
    assert torch.equal(dec.embed(ids), codec.embed(ids))
    with pytest.raises(RuntimeError, match="without the encoder"):
        dec.encode(_pixels("synthetic_A"))


def test_encoder_part_loads_no_decoder(golden_folder: Path) -> None:
    enc = SeedCodec.load(golden_folder, parts=frozenset({"encoder"}))
    names = [n for n, _ in enc.model.named_parameters()]
    decoder_only = ("blocks_image.", "image_down.", "distill_image_proj", "decode_task")
    assert not any(n.startswith(decoder_only) for n in names)
    assert enc.encode(_pixels("synthetic_B"))[0].tolist() == EXPECTED["synthetic_B"]["token_ids"]
    with pytest.raises(RuntimeError, match="without the decoder"):
        enc.embed(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="parts"):
        SeedCodec.load(golden_folder, parts=frozenset({"vae"}))


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_cpu_load_assigns_the_mapped_file(golden_folder: Path) -> None:
    # a float32 CPU load must use the memory-mapped checkpoint pages, not copies of them
    loaded = SeedCodec.load(golden_folder)
    ranges = _mapped_ranges((golden_folder / "seed_quantizer.pt").resolve())
    assert ranges
    for p in loaded.model.parameters():
        assert p.dtype == torch.float32 and not p.requires_grad
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges)


def test_bfloat16_on_cpu(golden_folder: Path, codec: SeedCodec) -> None:
    half = SeedCodec.load(golden_folder, dtype=torch.bfloat16)
    assert half.model.distill_image_proj.weight.dtype == torch.bfloat16
    ids = half.encode(_pixels("synthetic_A"))
    assert ids.shape == (1, 32) and ids.dtype == torch.int64
    emb = half.embed(ids)
    assert emb.dtype == torch.float32
    np.testing.assert_allclose(emb.numpy(), codec.embed(ids).numpy(), atol=0.15)


# ---------------------------------------------------------------- tiny builder


def test_tiny_builder(tmp_path: Path) -> None:
    start = time.perf_counter()
    build_tiny(tmp_path / "m", seed=3)
    assert time.perf_counter() - start < 2.0
    folder = tmp_path / "m" / "seed-tokenizer-2"
    assert json.loads((folder / "config.json").read_text())["vit_num_heads"] == 4
    state = torch.load(folder / "seed_quantizer.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == layout.reference_shapes(TINY_DIMS)
    assert all(torch.equal(v, random_state(TINY_DIMS, 3)[k]) for k, v in state.items())
    assert not torch.equal(state["query_tokens"], random_state(TINY_DIMS, 4)["query_tokens"])

    tiny = SeedCodec.load(folder)
    assert tiny.dims == TINY_DIMS
    ids = tiny.encode(torch.cat([_pixels(n) for n in NAMES]))
    assert (ids[0] != ids[1]).sum() >= 16
    assert min(len(set(row.tolist())) for row in ids) >= 16
    assert torch.isfinite(tiny.embed(ids)).all()
