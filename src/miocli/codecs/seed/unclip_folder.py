"""The `stable-diffusion-2-1-unclip/` folder: checked before anything loads, then its parts loaded.

`check_layout` names every missing or mismatched piece at once (a ViT-L "small" unCLIP, parts from
different models) and tells which weights variant each part has; `load_parts` loads the parts the
decoder uses (not image_encoder/ nor feature_extractor/: MIO hands over the embedding itself).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli.errors import ModelError

if TYPE_CHECKING:
    import torch

FOLDER_NAME = "stable-diffusion-2-1-unclip"
PIPELINE_CLASS = "StableUnCLIPImg2ImgPipeline"
EMBEDDING_DIM = 1024
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
# Sub-folders the decoder reads, with their config file and the stem of their weights
# (None: config only). image_encoder/ and feature_extractor/ are deliberately absent.
_PARTS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "unet": ("config.json", (_DIFFUSERS_WEIGHTS,)),
    "vae": ("config.json", (_DIFFUSERS_WEIGHTS,)),
    "image_normalizer": ("config.json", (_DIFFUSERS_WEIGHTS,)),
    "text_encoder": ("config.json", ("model", "pytorch_model")),
    "scheduler": ("scheduler_config.json", None),
    "image_noising_scheduler": ("scheduler_config.json", None),
}
GET_IT = (
    "it ships with the MIO checkpoint; otherwise put a full copy of the Hugging Face repository "
    "stabilityai/stable-diffusion-2-1-unclip there (image_encoder/ may be left out)"
)


def _weights_variant(part_dir: Path, stems: tuple[str, ...]) -> str | None | bool:
    """None: plain weights; "fp16": only fp16-variant weights; False: no weights at all."""
    for stem in stems:
        if any((part_dir / f"{stem}{suffix}").is_file() for suffix in _WEIGHT_SUFFIXES):
            return None
    for stem in stems:
        if any(part_dir.glob(f"{stem}.fp16.*")) or any(part_dir.glob(f"{stem}.*.index.fp16.json")):
            return "fp16"
    return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", hint=f"the file is damaged; {GET_IT}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object", hint=f"the file is damaged; {GET_IT}")
    return data


def check_layout(folder: Path) -> dict[str, str | None]:
    """Fail early, naming every missing piece; return the weights variant of each part."""
    if not folder.is_dir():
        raise ModelError(f"the unCLIP image decoder folder {folder} does not exist", hint=GET_IT)
    missing: list[str] = []
    variants: dict[str, str | None] = {}
    if not (folder / "model_index.json").is_file():
        missing.append("model_index.json")
    for part, (config_name, stems) in _PARTS.items():
        part_dir = folder / part
        if not part_dir.is_dir():
            missing.append(f"{part}/")
            continue
        if not (part_dir / config_name).is_file():
            missing.append(f"{part}/{config_name}")
        if stems is not None:
            variant = _weights_variant(part_dir, stems)
            if variant is False:
                missing.append(f"{part}/{stems[0]}.safetensors")
            else:
                variants[part] = variant
    tok = folder / "tokenizer"
    if not tok.is_dir():
        missing.append("tokenizer/")
    elif not (tok / "tokenizer.json").is_file():
        missing += [f"tokenizer/{n}" for n in ("vocab.json", "merges.txt") if not (tok / n).is_file()]
    if missing:
        raise ModelError(
            f"the unCLIP image decoder folder {folder} is incomplete: missing {', '.join(missing)}",
            hint=GET_IT,
        )

    index = _read_json(folder / "model_index.json")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ModelError(
            f"{folder} holds a {index.get('_class_name')!r} pipeline, not {PIPELINE_CLASS}",
            hint="MIO needs stabilityai/stable-diffusion-2-1-unclip (the image-variation unCLIP)",
        )
    unet = _read_json(folder / "unet" / "config.json")
    normalizer = _read_json(folder / "image_normalizer" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    emb_dim = normalizer.get("embedding_dim")
    if (
        emb_dim != EMBEDDING_DIM
        or unet.get("class_embed_type") != "projection"
        or (unet.get("projection_class_embeddings_input_dim") != 2 * EMBEDDING_DIM)
    ):
        raise ModelError(
            f"{folder} is an unCLIP decoder for {emb_dim}-d image embeddings; MIO's are {EMBEDDING_DIM}-d",
            hint="use stable-diffusion-2-1-unclip (ViT-H), not stable-diffusion-2-1-unclip-small (ViT-L)",
        )
    text_width = text.get("hidden_size", text.get("text_config", {}).get("hidden_size"))
    if unet.get("cross_attention_dim") != text_width:
        raise ModelError(
            f"in {folder}, unet/ expects {unet.get('cross_attention_dim')}-d text features but "
            f"text_encoder/ makes {text_width}-d ones",
            hint=f"the sub-folders come from different models; {GET_IT}",
        )
    return variants


def load_parts(folder: Path, variants: dict[str, str | None], dtype: torch.dtype) -> dict[str, Any]:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPTextModel, CLIPTokenizer

    def load(part: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(folder / part, local_files_only=True, **kwargs)
        except Exception as exc:  # any failure here is a bad file: name the part, keep the cause
            raise ModelError(f"cannot load {folder / part}: {exc}", hint=f"the files look damaged; {GET_IT}") from exc

    def scheduler(part: str) -> Any:
        name = _read_json(folder / part / "scheduler_config.json").get("_class_name")
        cls = getattr(diffusers, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise ModelError(f"{folder / part} names an unknown scheduler {name!r}", hint=GET_IT)
        return load(part, cls.from_pretrained)

    def weights(part: str) -> dict[str, Any]:
        return {"variant": variants[part]} if variants.get(part) else {}

    return {
        "unet": load("unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype, **weights("unet")),
        "vae": load("vae", AutoencoderKL.from_pretrained, torch_dtype=dtype, **weights("vae")),
        "image_normalizer": load(
            "image_normalizer",
            StableUnCLIPImageNormalizer.from_pretrained,
            torch_dtype=dtype,
            **weights("image_normalizer"),
        ),
        "text_encoder": load("text_encoder", CLIPTextModel.from_pretrained, dtype=dtype, **weights("text_encoder")),
        "tokenizer": load("tokenizer", CLIPTokenizer.from_pretrained),
        "scheduler": scheduler("scheduler"),
        "image_noising_scheduler": scheduler("image_noising_scheduler"),
    }
