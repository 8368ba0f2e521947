"""Media ↔ token strings through the runtime's codecs (MIO_PROTOCOL §3–§4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from miocli import protocol
from miocli.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from miocli.model.runtime import Runtime

# Frames decoded at a time (20 s of speech); up to one window, decoding is the codec's one-piece decode.
WINDOW_FRAMES = 1024
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
    # None: the decoder's own side, from its config (768 for MIO's SD 2.1 unCLIP).
    size: int | None = None
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
    """16 kHz float32 samples of 4-layer speech codes (layers × frames).

    Up to one window this is the codec's one-piece decode; a longer answer is decoded window by window
    (codecs/speech/windows.py), so its activations stay at one window's whatever its length.
    """
    import numpy as np

    frames = len(codes[0]) if codes else 0
    if frames <= WINDOW_FRAMES:
        import torch

        codec = runtime.speech_codec(DECODER)
        tensor = torch.tensor([list(layer) for layer in codes], dtype=torch.long, device=runtime.device).unsqueeze(1)
        with torch.inference_mode():
            wave = codec.decode(tensor)
        return wave[0, 0].float().cpu().numpy()
    array = np.asarray([list(layer) for layer in codes], dtype=np.int64)
    return np.concatenate(list(speech_windows(runtime, [array], frames)))


def speech_windows(runtime: Runtime, blocks: Iterable[np.ndarray], frames: int,
                   progress: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
    """float32 samples of `frames` speech frames given as (layers, n) code blocks, one window's worth at a time."""
    from miocli.codecs.speech.windows import decode_windows

    codec = runtime.speech_codec(DECODER)
    _check_layers(codec)
    yield from decode_windows(codec, (_checked(codec, block) for block in blocks), frames, window=WINDOW_FRAMES,
                              progress=progress)


def _check_layers(codec: Any) -> None:
    if codec.n_q < protocol.SPEECH_LAYERS_IN_OUTPUT:
        raise InputError(f"speech codes have {protocol.SPEECH_LAYERS_IN_OUTPUT} layers, the codec has only "
                         f"{codec.n_q}")


def _checked(codec: Any, block: np.ndarray) -> np.ndarray:
    if block.size and (int(block.min()) < 0 or int(block.max()) >= codec.codebook_size):
        raise InputError(f"speech codes must lie in 0..{codec.codebook_size - 1}, found {int(block.min())}.."
                         f"{int(block.max())}")
    return block
