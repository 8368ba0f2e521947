"""Pixels from SEED image embeddings: Stable Diffusion 2.1 unCLIP driven by `image_embeds`.

MIO turns 32 image tokens into one 1024-d unCLIP image embedding; this module turns that
embedding into an RGB picture with the `stable-diffusion-2-1-unclip/` folder of the model
directory, the way the reference does (empty prompt, noise level 0, guidance 10, 20 DDIM
steps, 768x768, optional negative embedding).

What is loaded: unet, vae, text_encoder + tokenizer (the empty prompt still conditions the
UNet), scheduler, image_noising_scheduler and image_normalizer. What is not: image_encoder
(the CLIP ViT-H, about 2.5 GB) and feature_extractor, which only turn a *picture* into an
embedding, and MIO hands us the embedding. See docs/unclip.md.

diffusers is imported lazily (inside `load`), so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from miocli import quiet
from miocli.codecs.seed.unclip_folder import check_layout, load_parts
from miocli.errors import EnvironmentProblem, ModelError, UsageError

if TYPE_CHECKING:
    import PIL.Image

# The reference decodes with exactly these (MIO protocol §3 "Pixels").
NOISE_LEVEL = 0
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 10.0
# The real decoder's side; a checkpoint's own comes from its config (UnclipDecoder.native_size).
DEFAULT_SIZE = 768

ProgressFn = Callable[[int, int], None]


class UnclipDecoder:
    """SD 2.1 unCLIP img2img pipeline fed with ready-made image embeddings."""

    def __init__(self, pipeline: Any, folder: Path) -> None:
        # Use `load`; this takes an already assembled pipeline.
        self.pipeline = pipeline
        self.folder = folder

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> UnclipDecoder:
        """Load from `<model dir>/stable-diffusion-2-1-unclip`, local files only.

        fp32 is forced on CPU; on CUDA fp16 and bf16 are honoured.
        """
        folder = Path(folder)
        torch_device, dtype = _resolve_device(device, dtype)
        variants = check_layout(folder)
        # quiet.silenced: diffusers logs "An error occurred while trying to fetch ..." at error level
        # when a part has no safetensors weights, then loads its .bin weights fine.
        with quiet_libraries(), quiet.silenced():
            parts = load_parts(folder, variants, dtype)
            pipeline = _pipeline_class()(feature_extractor=None, image_encoder=None, **parts)
            pipeline.set_progress_bar_config(disable=True)
            try:
                pipeline.to(torch_device)
            except torch.cuda.OutOfMemoryError as exc:
                raise EnvironmentProblem(
                    f"not enough memory on {torch_device} for the unCLIP decoder in {folder}",
                    hint="use fp16/bf16, a larger GPU, or --device cpu",
                ) from exc
        return cls(pipeline, folder)

    # ----------------------------------------------------------------- facts
    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    @property
    def embedding_dim(self) -> int:
        return int(self.pipeline.image_normalizer.config.embedding_dim)

    @property
    def native_size(self) -> int:
        """The side this unCLIP was trained at (768 for SD 2.1): the UNet's latent side times the VAE's factor.

        Read from the checkpoint's own config, so a small decoder (the tiny one is 64 px) is not asked
        for 768 px pictures it was never made for, at 100x the time.
        """
        return int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        """Output sizes must be multiples of this (64 for the real model)."""
        vae_factor = int(self.pipeline.vae_scale_factor)
        # Each UNet level but the last halves the latent; an odd latent side breaks the skips.
        unet_factor = 2 ** (len(self.pipeline.unet.config.block_out_channels) - 1)
        # The pipeline itself insists on multiples of 8.
        return math.lcm(8, vae_factor * unet_factor)

    def num_parameters(self) -> int:
        """Parameters held in memory: unet + vae + text_encoder + image_normalizer."""
        p = self.pipeline
        return sum(t.numel() for m in (p.unet, p.vae, p.text_encoder, p.image_normalizer) for t in m.parameters())

    # ---------------------------------------------------------------- decoding
    def decode(
        self,
        image_embeds: torch.Tensor,
        *,
        negative_embeds: torch.Tensor | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        size: int | None = None,
        seed: int | None = None,
        progress: ProgressFn | None = None,
    ) -> list[PIL.Image.Image]:
        """One RGB `size`x`size` picture per row of `image_embeds` (b, 1024); `size` None is `native_size`.

        `negative_embeds` ((1, 1024) or (b, 1024)) replaces the all-zero unconditional
        embedding of classifier-free guidance. `progress(step, total)` is called after each
        denoising step, step counting from 1. Same seed, same embeddings, same device and
        dtype: same pixels.
        """
        embeds = self._check_embeds(image_embeds, "image_embeds")
        batch = embeds.shape[0]
        negative = None
        if negative_embeds is not None:
            negative = self._check_embeds(negative_embeds, "negative_embeds")
            if negative.shape[0] not in (1, batch):
                raise ValueError(f"negative_embeds has {negative.shape[0]} rows; expected 1 or {batch}")
            negative = negative.expand(batch, -1)
        if size is None:
            size = self.native_size
        self._check_settings(steps, guidance, size)
        if batch == 0:
            return []

        # A CPU generator gives the same starting noise on every device for a given seed.
        generator = None if seed is None else torch.Generator(device="cpu").manual_seed(int(seed))
        kwargs: dict[str, Any] = {}
        if progress is not None:
            kwargs.update(_progress_kwargs(self.pipeline, progress, steps))

        pipe = self.pipeline
        pipe._mio_negative_embeds = negative
        try:
            # Always in inference mode: a decode inside generate()'s streaming callback is, and the
            # pipeline's image normalizer keeps the kind of tensor it first saw.
            with quiet_libraries(), quiet.silenced(), torch.inference_mode():
                out = pipe(
                    # One empty prompt per row: the text batch must match the embedding batch.
                    prompt=[""] * batch,
                    image_embeds=embeds,
                    height=size,
                    width=size,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    noise_level=NOISE_LEVEL,
                    generator=generator,
                    output_type="pil",
                    **kwargs,
                )
        except (RuntimeError, MemoryError) as exc:
            # CUDA raises OutOfMemoryError; on CPU torch's allocator raises a RuntimeError ("can't allocate
            # memory") and Python a MemoryError. All get the same advice; other errors are not ours to explain.
            message = str(exc)
            if not (isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "can't allocate memory" in message
                    or "not enough memory" in message):
                raise
            raise EnvironmentProblem(
                f"out of memory decoding {batch} image(s) of {size}x{size} on {self.device}",
                hint="decode fewer images at once or a smaller --size",
            ) from exc
        finally:
            pipe._mio_negative_embeds = None
        return [img.convert("RGB") for img in out.images]

    def _check_embeds(self, embeds: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(embeds, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, not {type(embeds).__name__}")
        if embeds.ndim == 1:
            embeds = embeds.unsqueeze(0)
        if embeds.ndim != 2:
            raise ValueError(f"{name} must be (batch, {self.embedding_dim}), got {tuple(embeds.shape)}")
        if embeds.shape[1] != self.embedding_dim:
            raise ModelError(
                f"{name} are {embeds.shape[1]}-d but the unCLIP decoder in {self.folder} takes "
                f"{self.embedding_dim}-d embeddings",
                hint="the SEED tokenizer and stable-diffusion-2-1-unclip folders do not belong together",
            )
        if not torch.isfinite(embeds).all():
            raise ValueError(f"{name} contain NaN or infinite values")
        return embeds.to(device=self.device, dtype=self.dtype)

    def _check_settings(self, steps: int, guidance: float, size: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UsageError(f"the number of denoising steps must be a whole number >= 1, not {steps!r}")
        if not math.isfinite(guidance) or guidance < 0:
            raise UsageError(f"the guidance scale must be a finite number >= 0, not {guidance!r}")
        multiple = self.size_multiple
        if isinstance(size, bool) or not isinstance(size, int) or size < multiple or size % multiple:
            nearest = max(multiple, round(size / multiple) * multiple) if isinstance(size, int) else self.native_size
            raise UsageError(
                f"image size {size!r} is not a positive multiple of {multiple}",
                hint=f"use e.g. {nearest} (this decoder's own size is {self.native_size})",
            )


# ------------------------------------------------------------------ pipeline
@functools.cache
def _pipeline_class() -> type:
    """The diffusers pipeline with its image-encoding step replaced (built on first use)."""
    from diffusers import StableUnCLIPImg2ImgPipeline
    from diffusers.utils.torch_utils import randn_tensor

    class EmbeddingOnlyUnclipPipeline(StableUnCLIPImg2ImgPipeline):
        """StableUnCLIPImg2ImgPipeline that works without the CLIP image encoder.

        Why the override: diffusers 0.42's `_encode_image` starts with
        `next(self.image_encoder.parameters()).dtype` even when `image_embeds` is given, so
        with `image_encoder=None` it crashes, and the only way to satisfy it stock is to
        load the 2.5 GB ViT-H just to read its dtype. The stock method also hard-codes an
        all-zero unconditional embedding, while the SEED/MIO reference lets a negative
        embedding take that place. This replacement takes the dtype from the UNet (which
        the embedding feeds) and uses `_mio_negative_embeds` when set. It is the only
        place the pipeline touches image_encoder/feature_extractor on the embeds path.
        """

        _mio_negative_embeds: torch.Tensor | None = None

        def _encode_image(
            self,
            image: Any,
            device: torch.device,
            batch_size: int,
            num_images_per_prompt: int,
            do_classifier_free_guidance: bool,
            noise_level: Any,
            generator: torch.Generator | None,
            image_embeds: torch.Tensor | None,
        ) -> torch.Tensor:
            if image_embeds is None:
                raise ValueError("this pipeline has no image encoder: pass image_embeds, not an image")
            dtype = self.unet.dtype

            def condition(embeds: torch.Tensor) -> torch.Tensor:
                # Same noise augmentation as training (normalise, noise, un-normalise, append
                # the noise-level embedding), then one row per requested image. One noise row
                # for all: identical embeddings must give identical pictures in any batch.
                embeds = embeds.to(device=device, dtype=dtype)
                noise = randn_tensor((1, *embeds.shape[1:]), generator=generator, device=device, dtype=dtype)
                noised = self.noise_image_embeddings(
                    image_embeds=embeds,
                    noise_level=noise_level,
                    noise=noise.expand_as(embeds),
                )
                return noised.repeat_interleave(num_images_per_prompt, dim=0)

            cond = condition(image_embeds)
            if not do_classifier_free_guidance:
                return cond
            negative = self._mio_negative_embeds
            # The positive embedding draws its noise first, then the negative: the order in
            # which the reference consumes the generator, so seeded runs line up with it.
            uncond = torch.zeros_like(cond) if negative is None else condition(negative)
            return torch.cat([uncond, cond])

        def prepare_latents(
            self, batch_size: int, num_channels_latents: int, height: int, width: int, dtype: torch.dtype,
            device: torch.device, generator: torch.Generator | None, latents: torch.Tensor | None = None,
        ) -> torch.Tensor:
            # Every image starts from the same latents, as in the reference (one `latents` tensor):
            # the frames of a video or the images of a story then share their start, and an image
            # does not depend on what else is decoded with it. With one image this draws exactly
            # what the stock method draws.
            if latents is None:
                shape = (1, num_channels_latents, int(height) // self.vae_scale_factor,
                         int(width) // self.vae_scale_factor)
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = latents.expand(batch_size, *shape[1:]).contiguous()
            return latents.to(device) * self.scheduler.init_noise_sigma

    return EmbeddingOnlyUnclipPipeline


def _progress_kwargs(pipeline: Any, progress: ProgressFn, total: int) -> dict[str, Any]:
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        progress(done, total)

    params = inspect.signature(pipeline.__call__).parameters
    if "callback_on_step_end" in params:

        def on_step_end(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            tick()
            return tensors

        return {"callback_on_step_end": on_step_end}
    # StableUnCLIPImg2ImgPipeline up to diffusers 0.42 only has the older per-step callback.
    return {"callback": lambda _i, _t, _latents: tick(), "callback_steps": 1}


# ------------------------------------------------------------- layout checks
def _resolve_device(device: str | torch.device, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N") from exc
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UsageError(f"unsupported dtype {dtype} for the unCLIP decoder", hint="use fp32, fp16 or bf16")
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(
                "CUDA was asked for but this torch sees no CUDA device",
                hint="use --device cpu, or install a CUDA build of torch",
            )
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise EnvironmentProblem("this GPU does not support bf16", hint="use fp16")
    elif torch_device.type == "cpu":
        # Half-precision convolutions and attention on CPU are slow or missing: fp32 there.
        dtype = torch.float32
    return torch_device, dtype


# ------------------------------------------------------------------- quiet
_NOISY_LOGGERS = ("bitsandbytes",)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library chatter that the user cannot act on, for the duration only.

    diffusers/transformers log notices (deprecations of their own internals, progress
    bars while writing shards), and importing bitsandbytes through them logs a warning
    about an optional kernels package. Real errors still raise.
    """
    saved_levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = (
        dlog.get_verbosity(),
        tlog.get_verbosity(),
        dlog.is_progress_bar_enabled(),
        tlog.is_progress_bar_enabled(),
    )
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(diffusers|transformers|torch)\b")
            yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        if saved[2]:
            dlog.enable_progress_bar()
        if saved[3]:
            tlog.enable_progress_bar()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
