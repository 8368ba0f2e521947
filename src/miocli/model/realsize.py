"""A random checkpoint of MIO-7B's real shapes, in the real layout, for real-size measurements.

    python -m miocli.model.realsize DIR [--parts llm,seed,speech,unclip] [--seed N]

What tiny checkpoints cannot show (memory, load time, tokens/s at 6 B parameters) shows here:

- llm: `LlamaForCausalLM` of Yi-6B's shapes (hidden 4096, 32 layers, 32 heads, 4 KV heads, MLP 11008) with
  MIO's vocabulary of 76,288 (text ids, then 12,292 media tokens), 6.16 B parameters, bf16 safetensors in
  shards of about 2 GB. Written one shard at a time: the builder never holds the model (peak about one shard).
  The tokenizer fills those 76,288 ids: a small sentencepiece model padded with unused pieces, then the media
  tokens as added tokens.
- seed: SEED-Tokenizer-2 at its published size (1.15 B, EVA ViT-g inside `seed_quantizer.pt`), fp16.
- speech: SpeechTokenizer at its published config (fp32, as published).
- unclip: stable-diffusion-2-1-unclip at its real config (UNet 865 M, VAE, OpenCLIP ViT-H text encoder,
  ViT-H image encoder), fp16 safetensors.

Weights are uniform random with fan-in scaled spread (norms at 1, biases small), so activations stay finite;
the outputs are noise. The folder is large (about 19 GB with every part): never commit it or build it in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARTS = ("llm", "seed", "speech", "unclip")
MARKER_FILE = "mio_realsize.json"

# Yi-6B (MIO-7B's base) and MIO's vocabulary: 76,288 rows, the last 12,292 ids the media tokens.
MIO_VOCAB = 76_288
MEDIA_TOKENS = 12_292
LLM_SHAPE: dict[str, Any] = {
    "vocab_size": MIO_VOCAB,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 5_000_000.0,
}
SHARD_BYTES = 2_000_000_000
# Small enough that 32 layers of random bf16 weights keep the residual stream finite.
LLM_STD = 0.02


def llm_config_dict(variant: str = "instruct") -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": LLM_STD,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **LLM_SHAPE,
        "mio_variant": variant,
    }


def llm_tensor_shapes(shape: dict[str, Any] | None = None) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the LLM, in file order (embeddings, layer by layer, final norm, head)."""
    s = shape or LLM_SHAPE
    hidden, inter, vocab = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def llm_parameters(shape: dict[str, Any] | None = None) -> int:
    return sum(math.prod(s) for _, s in llm_tensor_shapes(shape))


def _random(shape: tuple[int, ...], dtype: Any, std: float, generator: Any) -> Any:
    import torch

    tensor = torch.empty(shape, dtype=dtype)
    # uniform of the same spread as a normal: about twice as fast to draw at billions of values
    half_width = std * math.sqrt(3.0)
    return tensor.uniform_(-half_width, half_width, generator=generator)


def build_llm(dest: Path, seed: int = 0, variant: str = "instruct", shape: dict[str, Any] | None = None) -> None:
    """Tokenizer, config.json and the LLM weights, written shard by shard."""
    import torch
    from safetensors.torch import save_file

    from miocli.model.tiny import write_tiny_tokenizer

    s = shape or LLM_SHAPE
    vocab = write_tiny_tokenizer(dest, base_vocab=s["vocab_size"] - MEDIA_TOKENS)
    if vocab != s["vocab_size"]:
        raise RuntimeError(f"tokenizer has {vocab} ids, the LLM {s['vocab_size']}")
    config = llm_config_dict(variant) | s
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dest / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    generator = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, tensor_shape in llm_tensor_shapes(s):
        nbytes = math.prod(tensor_shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor_shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for number, names in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, tensor_shape in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                tensors[name] = _random(tensor_shape, torch.bfloat16, LLM_STD, generator)
            weight_map[name] = file_name
            total += tensors[name].numel() * 2
        save_file(tensors, str(dest / file_name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def build_seed(dest: Path, seed: int = 0) -> None:
    """seed-tokenizer-2/ at the published size, ViT inside, fp16 (MIO runs it in fp16 on GPUs)."""
    import torch

    from miocli.codecs.seed import SeedDims
    from miocli.codecs.seed.tiny import random_state, write_checkpoint

    dims = SeedDims.real()
    write_checkpoint(dest / "seed-tokenizer-2", random_state(dims, seed, dtype=torch.float16, uniform=True), dims)


def build_speech(dest: Path, seed: int = 0) -> None:
    """SpeechTokenizer/ at the published config; codebooks of the encoder's spread so codes vary."""
    import torch

    from miocli.codecs.speech.checkpoint import checkpoint_layout
    from miocli.codecs.speech.config import REAL_CONFIG, SpeechConfig
    from miocli.codecs.speech.model import CONFIG_NAME, WEIGHTS_NAME
    from miocli.codecs.speech.tiny import random_weights

    config = SpeechConfig.from_dict(REAL_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    state = random_weights(checkpoint_layout(config), generator, dtype=torch.float32)
    for i in range(config.n_q):
        embed = 0.1 * torch.randn((config.codebook_size, config.dimension), generator=generator)
        state[f"quantizer.vq.layers.{i}._codebook.embed"] = embed
        state[f"quantizer.vq.layers.{i}._codebook.embed_avg"] = embed.clone()
    folder = dest / "SpeechTokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(REAL_CONFIG, indent=2) + "\n")
    torch.save(state, folder / WEIGHTS_NAME)


# stabilityai/stable-diffusion-2-1-unclip, as published (the parts MIO's decoder builds).
UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "class_embed_type": "projection", "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2048, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}
VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 768, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "projection_dim": 512, "hidden_act": "gelu",
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
IMAGE_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu",
}


def _random_state(module: Any, seed: int) -> dict[str, Any]:
    """fp16 random weights for every tensor of a module built on the meta device."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        shape = tuple(tensor.shape)
        if not tensor.is_floating_point():
            state[name] = torch.arange(shape[-1]).expand(shape).contiguous() if shape else torch.zeros(())
        elif name.endswith("weight") and len(shape) == 1 and "norm" in name:
            state[name] = torch.ones(shape, dtype=torch.float16)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            state[name] = _random(shape, torch.float16, 1 / math.sqrt(fan_in), generator)
        else:
            state[name] = _random(shape, torch.float16, 0.02, generator)
    return state


def _save_module(module: Any, config: Any, folder: Path, file_name: str, seed: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
    else:
        config.save_pretrained(folder)
    state = _random_state(module, seed)
    # tied or shared storage is not a concern here: each tensor was drawn on its own
    save_file(state, str(folder / file_name), metadata={"format": "pt"})


def build_unclip(dest: Path, seed: int = 0) -> None:
    """stable-diffusion-2-1-unclip/ at the real config: tokenizer, schedulers and normalizer come from the
    tiny builder (their files are configuration), the networks here at full size."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from miocli.codecs.seed import unclip_tiny
    from miocli.codecs.seed.unclip import quiet_libraries

    unclip_tiny.build_tiny(dest, seed)
    folder = dest / unclip_tiny.FOLDER_NAME
    with quiet_libraries(), torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_config = CLIPTextConfig(**TEXT_CONFIG)
        text = CLIPTextModel(text_config)
        image_config = CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)
        image = CLIPVisionModelWithProjection(image_config)
    for part, module, config, file_name in (
        ("unet", unet, None, "diffusion_pytorch_model.safetensors"),
        ("vae", vae, None, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", text, text_config, "model.safetensors"),
        ("image_encoder", image, image_config, "model.safetensors"),
    ):
        for old in (folder / part).glob("*.safetensors"):
            old.unlink()
        _save_module(module, config, folder / part, file_name, seed)


BUILDERS = {"llm": build_llm, "seed": build_seed, "speech": build_speech, "unclip": build_unclip}


def build(dest: Path, parts: list[str], seed: int = 0, log: Any = None) -> dict[str, float]:
    """Build `parts` into `dest`; returns the seconds each took."""
    dest.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    for part in parts:
        start = time.perf_counter()
        BUILDERS[part](dest, seed)
        seconds[part] = time.perf_counter() - start
        if log is not None:
            log(f"built {part} in {seconds[part]:.1f} s")
    marker = dest / MARKER_FILE
    done = json.loads(marker.read_text()).get("parts", []) if marker.is_file() else []
    marker.write_text(json.dumps({"parts": sorted(set(done) | set(parts)), "seed": seed}, indent=1) + "\n")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miocli.model.realsize", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to write (created; about 19 GB with every part)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in BUILDERS]
    if unknown or not parts:
        parser.error(f"unknown part(s) {', '.join(unknown) or '(none)'}; use {', '.join(PARTS)}")
    total = time.perf_counter()
    build(args.dest, parts, args.seed, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"real-size checkpoint in {args.dest} ({', '.join(parts)}) in {time.perf_counter() - total:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
