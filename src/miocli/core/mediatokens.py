"""Media ↔ token strings through the runtime's codecs (MIO_PROTOCOL §3–§4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from miocli import protocol
from miocli.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from miocli.model.runtime import Runtime

ENCODER = frozenset({"encoder"})
DECODER = frozenset({"decoder"})


@dataclass(frozen=True)
class PixelOptions:
    """unCLIP settings for turning image tokens into pixels (MIO_PROTOCOL §3 defaults).

    Checked when made: the CLI and the API build these before anything loads, so a bad value is
    refused up front rather than found by the decoder after the whole generation.
    """

    steps: int = 20
    guidance: float = 10.0
    size: int = 768
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """UsageError for settings the decoder cannot take (see miocli.core.validate)."""
        from miocli.core.validate import check_pixels, check_seed

        check_pixels(self.steps, self.guidance, self.size)
        check_seed(self.seed)


def image_ids(runtime: Runtime, images: Sequence[Image.Image], batch_size: int = 8) -> list[list[int]]:
    """32 SEED ids per image; images are encoded together in batches."""
    import torch

    from miocli.media.image import preprocess

    codec = runtime.seed_codec(ENCODER)
    parameter = next(iter(codec.parameters())) if hasattr(codec, "parameters") else None
    dtype = parameter.dtype if parameter is not None else torch.float32
    result: list[list[int]] = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(preprocess(list(images[start : start + batch_size])))
        with torch.inference_mode():
            ids = codec.encode(pixels.to(runtime.device, dtype))
        result.extend(ids.cpu().tolist())
    return result


def image_strings(runtime: Runtime, images: Sequence[Image.Image]) -> list[str]:
    return [protocol.image_ids_to_string(ids) for ids in image_ids(runtime, images)]


def speech_codes(runtime: Runtime, wave: np.ndarray, layers: int) -> list[list[int]]:
    """Codes (layers × frames) of one 16 kHz mono recording."""
    import torch

    codec = runtime.speech_codec(ENCODER)
    with torch.inference_mode():
        codes = codec.encode(torch.from_numpy(wave).to(runtime.device), n_q=layers)
    return codes[:, 0, :].cpu().tolist()


def speech_string(runtime: Runtime, wave: np.ndarray, with_timbre: bool) -> str:
    layers = protocol.SPEECH_LAYERS_IN_OUTPUT if with_timbre else 1
    return protocol.speech_codes_to_string(speech_codes(runtime, wave, layers), with_timbre=with_timbre)


def image_embeddings(runtime: Runtime, id_lists: Sequence[Sequence[int]]) -> Any:
    """The (n, 1024) float32 unCLIP embeddings of complete 32-token images."""
    import torch

    codec = runtime.seed_codec(DECODER)
    for ids in id_lists:
        if len(ids) != protocol.IMAGE_TOKENS_PER_IMAGE:
            raise InputError(f"an image needs {protocol.IMAGE_TOKENS_PER_IMAGE} tokens, got {len(ids)}",
                             hint="generate with constraints on (the default) so images are complete")
        if any(not 0 <= i < protocol.IMAGE_CODEBOOK_SIZE for i in ids):
            raise InputError("image token ids must be in 0…8191")
    with torch.inference_mode():
        embeds = codec.embed(torch.tensor([list(ids) for ids in id_lists], dtype=torch.long, device=runtime.device))
    return embeds.float().cpu()


def images_from_ids(
    runtime: Runtime,
    id_lists: Sequence[Sequence[int]],
    options: PixelOptions,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    if not id_lists:
        return []
    embeds = image_embeddings(runtime, id_lists)
    decoder = runtime.unclip
    return decoder.decode(embeds.to(decoder.device, decoder.dtype), steps=options.steps, guidance=options.guidance,
                          size=options.size, seed=options.seed, progress=progress)


def speech_from_codes(runtime: Runtime, codes: Sequence[Sequence[int]]) -> np.ndarray:
    """16 kHz float32 samples of 4-layer speech codes (layers × frames)."""
    import torch

    codec = runtime.speech_codec(DECODER)
    tensor = torch.tensor([list(layer) for layer in codes], dtype=torch.long, device=runtime.device).unsqueeze(1)
    with torch.inference_mode():
        wave = codec.decode(tensor)
    return wave[0, 0].float().cpu().numpy()
