"""The unCLIP pixel decoder on the tiny stand-in folder (no download, CPU, a few seconds)."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from miocli.codecs.seed.unclip import UnclipDecoder
from miocli.codecs.seed.unclip_folder import EMBEDDING_DIM, FOLDER_NAME
from miocli.codecs.seed.unclip_tiny import build_tiny
from miocli.errors import EnvironmentProblem, ModelError, UsageError

SIZE = 64
STEPS = 3


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("mio-tiny")
    build_tiny(model_dir, seed=0)
    return model_dir


@pytest.fixture(scope="session")
def tiny_folder(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / FOLDER_NAME


@pytest.fixture(scope="session")
def decoder(tiny_folder: Path) -> UnclipDecoder:
    return UnclipDecoder.load(tiny_folder)


@pytest.fixture(scope="session")
def embeds() -> torch.Tensor:
    return torch.randn(2, EMBEDDING_DIM, generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="session")
def seeded_images(decoder: UnclipDecoder, embeds: torch.Tensor) -> list:
    return decoder.decode(embeds, size=SIZE, steps=STEPS, seed=7)


@pytest.fixture
def folder_copy(tiny_folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / FOLDER_NAME
    shutil.copytree(tiny_folder, dst)
    return dst


def pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(img) for img in images]


# ------------------------------------------------------------------ decoding
def test_decode_gives_one_rgb_image_per_row(seeded_images: list) -> None:
    assert len(seeded_images) == 2
    for img in seeded_images:
        assert img.mode == "RGB"
        assert img.size == (SIZE, SIZE)
    a, b = pixels(seeded_images)
    assert not np.array_equal(a, b), "different embeddings should give different pictures"


def test_same_seed_same_pixels_other_seed_other_pixels(
    decoder: UnclipDecoder, embeds: torch.Tensor, seeded_images: list
) -> None:
    again = decoder.decode(embeds, size=SIZE, steps=STEPS, seed=7)
    for x, y in zip(pixels(seeded_images), pixels(again), strict=True):
        np.testing.assert_array_equal(x, y)
    other = decoder.decode(embeds, size=SIZE, steps=STEPS, seed=8)
    for x, y in zip(pixels(seeded_images), pixels(other), strict=True):
        assert not np.array_equal(x, y)


def test_progress_is_called_once_per_step(decoder: UnclipDecoder, embeds: torch.Tensor) -> None:
    calls: list[tuple[int, int]] = []
    decoder.decode(embeds[:1], size=SIZE, steps=2, seed=0, progress=lambda s, t: calls.append((s, t)))
    assert calls == [(1, 2), (2, 2)]


def test_negative_embeds_replace_the_zero_embedding(
    decoder: UnclipDecoder, embeds: torch.Tensor, seeded_images: list
) -> None:
    negative = torch.randn(1, EMBEDDING_DIM, generator=torch.Generator().manual_seed(99))
    with_one = decoder.decode(embeds, negative_embeds=negative, size=SIZE, steps=STEPS, seed=7)
    assert [img.size for img in with_one] == [(SIZE, SIZE)] * 2
    for x, y in zip(pixels(seeded_images), pixels(with_one), strict=True):
        assert not np.array_equal(x, y), "a negative embedding should change the guidance"
    # One row per image gives the same as one row broadcast.
    with_rows = decoder.decode(embeds, negative_embeds=negative.expand(2, -1), size=SIZE, steps=STEPS, seed=7)
    for x, y in zip(pixels(with_one), pixels(with_rows), strict=True):
        np.testing.assert_array_equal(x, y)
    assert decoder.pipeline._mio_negative_embeds is None, "the negative must not leak into the next call"


def test_bad_sizes_and_steps_are_usage_errors(decoder: UnclipDecoder, embeds: torch.Tensor) -> None:
    assert decoder.size_multiple == 16  # tiny: VAE x8, two UNet levels x2 (the real model: 64)
    for size in (40, 100, 0, -64):
        with pytest.raises(UsageError, match="multiple of 16"):
            decoder.decode(embeds, size=size, steps=STEPS)
    with pytest.raises(UsageError, match="steps"):
        decoder.decode(embeds, size=SIZE, steps=0)


def test_wrong_embedding_width_is_a_model_error(decoder: UnclipDecoder) -> None:
    with pytest.raises(ModelError, match="768-d"):
        decoder.decode(torch.zeros(1, 768), size=SIZE, steps=1)


def test_defaults_follow_the_protocol() -> None:
    params = inspect.signature(UnclipDecoder.decode).parameters
    assert params["steps"].default == 20
    assert params["guidance"].default == 10.0
    assert params["size"].default is None  # the decoder's own side: 768 for SD 2.1 unCLIP


def test_the_decoder_draws_at_its_own_size_unless_told(decoder: UnclipDecoder, embeds: torch.Tensor) -> None:
    # The tiny UNet is 8 latents wide and the VAE scales by 8: a 64 px decoder (the real one: 96 x 8 = 768).
    assert decoder.native_size == 64
    [image] = decoder.decode(embeds[:1], steps=1, seed=0)
    assert image.size == (64, 64)
    with pytest.raises(UsageError, match="own size is 64"):
        decoder.decode(embeds[:1], steps=1, size=72)


def test_library_logging_is_restored_after_decode(decoder: UnclipDecoder, embeds: torch.Tensor) -> None:
    import diffusers.utils.logging as dlog

    before = (dlog.get_verbosity(), dlog.is_progress_bar_enabled(), logging.getLogger("bitsandbytes").level)
    decoder.decode(embeds[:1], size=SIZE, steps=1, seed=0)
    after = (dlog.get_verbosity(), dlog.is_progress_bar_enabled(), logging.getLogger("bitsandbytes").level)
    assert after == before


# --------------------------------------------------- what is (not) loaded
def test_image_encoder_is_never_loaded(decoder: UnclipDecoder) -> None:
    pipe = decoder.pipeline
    assert pipe.image_encoder is None
    assert pipe.feature_extractor is None
    expected = sum(
        p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_normalizer) for p in m.parameters()
    )
    assert decoder.num_parameters() == expected
    assert decoder.dtype == torch.float32 and decoder.device.type == "cpu"


def test_loads_and_decodes_without_image_encoder_or_network(
    folder_copy: Path, embeds: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    # Garbage where the CLIP vision weights and processor config were: reading them would fail.
    (folder_copy / "image_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    (folder_copy / "feature_extractor" / "preprocessor_config.json").write_text("{broken")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CLIP image encoder / processor must not be loaded")

    monkeypatch.setattr(transformers.CLIPVisionModelWithProjection, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPImageProcessor, "from_pretrained", refuse)

    connections: list[object] = []

    def no_network(self: socket.socket, address: object) -> None:
        connections.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    decoder = UnclipDecoder.load(folder_copy)
    images = decoder.decode(embeds[:1], size=SIZE, steps=1, seed=0)
    assert len(images) == 1
    assert connections == []

    shutil.rmtree(folder_copy / "image_encoder")
    shutil.rmtree(folder_copy / "feature_extractor")
    assert UnclipDecoder.load(folder_copy).pipeline.image_encoder is None


def test_fp16_only_weights_are_found(folder_copy: Path, decoder: UnclipDecoder) -> None:
    unet = folder_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    loaded = UnclipDecoder.load(folder_copy)
    assert loaded.num_parameters() == decoder.num_parameters()


def test_half_precision_on_cpu_falls_back_to_fp32(tiny_folder: Path) -> None:
    assert UnclipDecoder.load(tiny_folder, dtype=torch.float16).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_an_environment_problem(tiny_folder: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="CUDA"):
        UnclipDecoder.load(tiny_folder, device="cuda")


# ------------------------------------------------------------ bad folders
def test_missing_folder_is_a_model_error(tmp_path: Path) -> None:
    missing = tmp_path / FOLDER_NAME
    with pytest.raises(ModelError, match="does not exist") as info:
        UnclipDecoder.load(missing)
    assert str(missing) in info.value.message
    assert "stable-diffusion-2-1-unclip" in (info.value.hint or "")


def test_incomplete_folder_names_every_missing_piece(folder_copy: Path) -> None:
    (folder_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(folder_copy / "vae")
    (folder_copy / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(ModelError) as info:
        UnclipDecoder.load(folder_copy)
    message = info.value.message
    assert str(folder_copy) in message
    for piece in ("unet/diffusion_pytorch_model.safetensors", "vae/", "tokenizer/merges.txt"):
        assert piece in message
    assert "image_encoder" not in message


def test_other_pipeline_or_small_variant_is_refused(folder_copy: Path) -> None:
    index_path = folder_copy / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="StableDiffusionPipeline"):
        UnclipDecoder.load(folder_copy)
    index_path.write_text(json.dumps(index))

    cfg_path = folder_copy / "image_normalizer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "embedding_dim": 768}))
    with pytest.raises(ModelError, match="small"):
        UnclipDecoder.load(folder_copy)


def test_damaged_weights_name_the_part(folder_copy: Path) -> None:
    (folder_copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelError, match="vae"):
        UnclipDecoder.load(folder_copy)


# --------------------------------------------------------------- the tiny build
def test_tiny_folder_mirrors_the_real_layout(tiny_folder: Path) -> None:
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableUnCLIPImg2ImgPipeline"
    for part in (
        "unet", "vae", "scheduler", "text_encoder", "tokenizer", "image_normalizer",
        "image_noising_scheduler", "feature_extractor", "image_encoder",
    ):  # fmt: skip
        assert (tiny_folder / part).is_dir(), part
        assert part in index
    unet = json.loads((tiny_folder / "unet" / "config.json").read_text())
    assert unet["class_embed_type"] == "projection"
    assert unet["projection_class_embeddings_input_dim"] == 2048
    vision = json.loads((tiny_folder / "image_encoder" / "config.json").read_text())
    assert vision["projection_dim"] == 1024
    assert json.loads((tiny_folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "DDIMScheduler"
    )
    total = sum(f.stat().st_size for f in tiny_folder.rglob("*") if f.is_file())
    assert total < 5 * 1024 * 1024


def test_tiny_build_is_deterministic(tiny_folder: Path, tmp_path: Path) -> None:
    build_tiny(tmp_path / "same", seed=0)
    build_tiny(tmp_path / "other", seed=1)
    files = sorted(f.relative_to(tiny_folder) for f in tiny_folder.rglob("*") if f.is_file())
    same = tmp_path / "same" / FOLDER_NAME
    assert files == sorted(f.relative_to(same) for f in same.rglob("*") if f.is_file())
    for rel in files:
        assert (same / rel).read_bytes() == (tiny_folder / rel).read_bytes(), rel
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "other" / FOLDER_NAME / weights).read_bytes() != (tiny_folder / weights).read_bytes()
