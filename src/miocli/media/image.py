"""Reading images for MIO and turning them into the SEED tokenizer's input tensor.

No torch here: this module is imported by commands that only check their inputs.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import quiet
from ..errors import InputError

SIZE = 224
# CLIP's normalisation, as the reference's "clip" transform uses it
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def load_image(path: Path) -> Image.Image:
    """Open any image PIL reads as an upright 8-bit RGB image, or raise InputError naming it."""
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise InputError(f"image not found: {path}", hint="check the path", source=src)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image", hint="give an image file", source=src)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", source=src) from exc
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes)", hint="the file was not written completely", source=src)
    return _decode(path, src)


def image_from_bytes(data: bytes, name: str) -> Image.Image:
    """The same as load_image for an image file's bytes (an upload, a buffer)."""
    if not data:
        raise InputError(f"{name} is empty (0 bytes)", hint="give the bytes of an image file", source=name)
    return _decode(io.BytesIO(data), name)


def image_from_pil(image: Image.Image, name: str) -> Image.Image:
    """A PIL image given in memory, made upright 8-bit RGB like a loaded file."""
    with quiet.silenced():
        return _to_rgb(_upright(image), name)


def _decode(source: Path | io.BytesIO, src: str) -> Image.Image:
    try:
        # PIL warns on stderr about odd files (corrupt EXIF data); silenced() ignores warnings,
        # but the bomb filter set inside it is newer and still wins.
        with quiet.silenced(), warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; refuse those too rather than
            # decode hundreds of megapixels for a 224x224 input
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                opened.load()
                image = _upright(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{src} is too large to decode safely ({exc})",
            hint="downscale the image (it only needs 224x224 pixels) and try again",
            source=src,
        ) from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{src} is not an image format that can be read",
                         hint="convert it to PNG or JPEG", source=src) from exc
    except PermissionError as exc:
        raise InputError(f"cannot read {src}: permission denied", source=src) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated or broken data as OSError (and a few plugins as the others)
        raise InputError(f"{src} is corrupt or truncated ({exc})",
                         hint="re-export or re-download the image", source=src) from exc
    with quiet.silenced():
        return _to_rgb(image, src)


def _upright(image: Image.Image) -> Image.Image:
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:
        # a malformed EXIF block must not lose an otherwise fine image
        return image.copy()
    return rotated if rotated is not None else image.copy()


def _to_rgb(image: Image.Image, src: str) -> Image.Image:
    mode = image.mode
    try:
        if mode == "RGB":
            return image
        if mode in _SIXTEEN_BIT or mode == "F":
            return _wide_to_rgb(image)
        if mode == "P":
            # a transparent palette entry must become white, not whatever colour it holds
            palette_alpha = image.palette is not None and image.palette.mode == "RGBA"
            has_alpha = "transparency" in image.info or palette_alpha
            image = image.convert("RGBA" if has_alpha else "RGB")
            mode = image.mode
        if mode in {"RGBA", "LA", "RGBa", "La", "PA"}:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode == "L" and "transparency" in image.info:
            return _to_rgb(image.convert("LA"), src)
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot convert {src} (mode {mode}) to RGB ({exc})",
                         hint="convert it to an 8-bit RGB PNG or JPEG", source=src) from exc


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit grey to 8-bit: PIL's own convert clips everything above 255 to white."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    else:
        # "I" is how PIL opens some 16-bit files; values above 255 mean a 16-bit range
        scaled = values / 257.0 if image.mode != "I" or values.max() > 255 else values
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def preprocess(images: list[Image.Image]) -> np.ndarray:
    """RGB images -> float32 (b, 3, 224, 224): bilinear resize ignoring aspect, /255, CLIP normalise.

    The arithmetic order (uint8 -> float32, /255, -mean, /std, all in float32) matches the
    reference's torchvision ToTensor + Normalize, so the result is bit-identical to it.
    """
    out = np.empty((len(images), 3, SIZE, SIZE), dtype=np.float32)
    for i, image in enumerate(images):
        if image.mode != "RGB":
            image = image.convert("RGB")
        resized = image.resize((SIZE, SIZE), Image.BILINEAR)
        pixels = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        out[i] = ((pixels - MEAN) / STD).transpose(2, 0, 1)
    return out
