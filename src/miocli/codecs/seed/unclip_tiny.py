"""A tiny, randomly initialised stand-in for `stable-diffusion-2-1-unclip/`.

`build_tiny` writes a folder with the same sub-folders, file names and class names as the
real stabilityai/stable-diffusion-2-1-unclip snapshot, so the loader in `unclip.py` runs
its real code path on it (tests, `mio demo`) without multi-gigabyte weights. Only the
sizes are tiny; the interfaces that matter to MIO are kept: 1024-d image embeddings, a
UNet conditioned through a 2048-d projection class embedding (embedding + noise-level
embedding), v-prediction DDIM, a VAE with the real 8x spatial factor. The pictures it
produces are noise-coloured nonsense.

Everything is generated locally (the tokenizer too): nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FOLDER_NAME = "stable-diffusion-2-1-unclip"
EMBEDDING_DIM = 1024  # SEED-Tokenizer-2's unCLIP embedding size: must match the real checkpoint
MAX_TEXT_LENGTH = 77  # the real tokenizer pads every prompt to 77 tokens
TEXT_WIDTH = 32

# Same scheduler settings as the real repository's scheduler configs, so that a schedule
# bug shows up on the tiny model too.
DENOISING_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
NOISING_SCHEDULER = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}

# BPE merges for the tiny tokenizer: a few, so the merge path of the real tokenizer runs.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n</w>")]
_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "!",  # Stable Diffusion 2.x pads with "!", not with the end token
}


def build_tiny(model_dir: Path, seed: int = 0) -> None:
    """Write a tiny `model_dir/stable-diffusion-2-1-unclip/`; same seed, same weights."""
    folder = Path(model_dir) / FOLDER_NAME
    folder.mkdir(parents=True, exist_ok=True)
    from miocli.codecs.seed.unclip import quiet_libraries

    # fork_rng: building a fixture must not change the caller's random stream.
    with quiet_libraries(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocab_size = _write_tokenizer(folder / "tokenizer")
        _write_text_encoder(folder / "text_encoder", vocab_size)
        _write_unet(folder / "unet")
        _write_vae(folder / "vae")
        _write_schedulers(folder)
        _write_image_normalizer(folder / "image_normalizer")
        _write_image_encoder(folder / "image_encoder")
        _write_feature_extractor(folder / "feature_extractor")
    _write_json(folder / "model_index.json", _model_index())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableUnCLIPImg2ImgPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "image_noising_scheduler": ["diffusers", "DDPMScheduler"],
        "image_normalizer": ["stable_diffusion", "StableUnCLIPImageNormalizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def _write_tokenizer(path: Path) -> int:
    # Written as vocab.json + merges.txt + configs, the slow-tokenizer layout of the real
    # repository, so loading it exercises the same conversion the real folder needs.
    path.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    symbols = _byte_symbols()
    for token in [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in _MERGES)]:
        vocab.setdefault(token, len(vocab))
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (path / "merges.txt").write_text(merges, encoding="utf-8")
    _write_json(path / "special_tokens_map.json", dict(_SPECIAL_TOKENS))
    _write_json(
        path / "tokenizer_config.json",
        {
            **_SPECIAL_TOKENS,
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": MAX_TEXT_LENGTH,
            "tokenizer_class": "CLIPTokenizer",
        },
    )
    return len(vocab)


def _write_text_encoder(path: Path, vocab_size: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_LENGTH,
        projection_dim=TEXT_WIDTH,
        hidden_act="gelu",
        # The real SD 2.1 config carries these legacy ids too.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    CLIPTextModel(config).eval().save_pretrained(path, safe_serialization=True)


def _write_unet(path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        attention_head_dim=(2, 2),
        cross_attention_dim=TEXT_WIDTH,
        use_linear_projection=True,
        # What makes it an unCLIP UNet: the noised image embedding and its noise-level
        # embedding (1024 + 1024) enter through the class-embedding projection.
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * EMBEDDING_DIM,
        norm_num_groups=32,
    )
    unet.save_pretrained(path, safe_serialization=True)


def _write_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    # Four levels like the real VAE, so the 8x pixel-to-latent factor (and with it the
    # rule on valid output sizes) is the real one; the channels are what is tiny.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(path, safe_serialization=True)


def _write_schedulers(folder: Path) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler

    DDIMScheduler(**DENOISING_SCHEDULER).save_pretrained(folder / "scheduler")
    DDPMScheduler(**NOISING_SCHEDULER).save_pretrained(folder / "image_noising_scheduler")


def _write_image_normalizer(path: Path) -> None:
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMBEDDING_DIM)
    # Real CLIP statistics are not zero/one: random ones make a scale/unscale mix-up visible.
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, EMBEDDING_DIM) * 0.1)
        normalizer.std.copy_(torch.rand(1, EMBEDDING_DIM) * 0.5 + 0.75)
    normalizer.save_pretrained(path, safe_serialization=True)


def _write_image_encoder(path: Path) -> None:
    # Present for layout fidelity only: the decoder never loads it (the embedding is given).
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=EMBEDDING_DIM,
        hidden_act="gelu",
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(path, safe_serialization=True)


def _write_feature_extractor(path: Path) -> None:
    # Written by hand: it is plain configuration, and building a CLIPImageProcessor here
    # would drag in (and warn about) optional image backends for a file nobody loads.
    _write_json(
        path / "preprocessor_config.json",
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 224},
        },
    )
