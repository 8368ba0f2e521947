"""Image reading and SEED preprocessing: golden tensors, odd formats, and broken files."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miocli.errors import InputError
from miocli.media.image import load_image, preprocess

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "seed"


@pytest.mark.parametrize("name", ["synthetic_A", "synthetic_B"])
def test_preprocess_is_bit_identical_to_reference(name: str) -> None:
    image = load_image(GOLDEN / "images" / f"{name}_320x200.png")
    got = preprocess([image])
    want = np.load(GOLDEN / f"preprocessed_{name}.npy")
    assert got.dtype == np.float32 and got.shape == (1, 3, 224, 224)
    assert np.array_equal(got[0], want)


def test_preprocess_batch_and_non_rgb_input() -> None:
    images = [Image.new("RGB", (50, 900), (255, 0, 0)), Image.new("L", (224, 224), 0)]
    out = preprocess(images)
    assert out.shape == (2, 3, 224, 224)
    # pure red: channel 0 at (1 - mean) / std, black: -mean / std
    assert np.allclose(out[0, 0], (1 - 0.48145466) / 0.26862954, atol=1e-6)
    assert np.allclose(out[1, 2], -0.40821073 / 0.27577711, atol=1e-6)
    assert preprocess([]).shape == (0, 3, 224, 224)


def test_module_does_not_import_torch() -> None:
    code = "import sys, miocli.media.image; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------- odd but valid images


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    image.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((1, 0)))


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (200, 100, 50)
    image.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").getpixel((0, 0)) == (200, 100, 50)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_grey_keeps_its_range(tmp_path: Path) -> None:
    values = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    assert out.mode == "RGB"
    assert [out.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 4]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    assert out.getpixel((10, 5))[0] > 200 and out.getpixel((10, 35))[0] < 50


def test_corrupt_exif_loads_without_warnings(tmp_path: Path) -> None:
    # One orientation entry whose bytes are cut short: PIL warns "Corrupt EXIF data" on stderr,
    # which the user can do nothing about; the picture itself is fine.
    tiff = b"II*\x00" + struct.pack("<IH", 8, 3) + struct.pack("<HHII", 0x0112, 3, 1, 6) + b"\x01\x02"
    Image.new("RGB", (40, 20), (200, 0, 0)).save(tmp_path / "odd.jpg", exif=b"Exif\x00\x00" + tiff)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_image(tmp_path / "odd.jpg")
    assert caught == []
    assert out.mode == "RGB" and out.getpixel((5, 5))[0] > 150


# ---------------------------------------------------------------- files that are not usable images


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _expect_error(path: Path, words: str) -> InputError:
    with pytest.raises(InputError, match=words) as info:
        load_image(path)
    assert str(path) in info.value.message and info.value.source == str(path)
    return info.value


def test_missing_file_and_folder(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.png", "not found")
    _expect_error(tmp_path, "folder")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    _expect_error(tmp_path / "zero.png", "empty")


def test_text_renamed_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("these are not pixels\n")
    assert _expect_error(tmp_path / "notes.png", "not an image").hint


def test_truncated_png(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.png", "corrupt or truncated")


def test_corrupt_jpeg(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.jpg")
    data = bytearray((tmp_path / "ok.jpg").read_bytes())
    (tmp_path / "cut.jpg").write_bytes(bytes(data[:200]))
    _expect_error(tmp_path / "cut.jpg", "corrupt or truncated")


@pytest.mark.parametrize("side", [100_000, 10_000])  # past PIL's error limit / past its warning limit
def test_decompression_bomb(tmp_path: Path, side: int) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header(side, side))
    error = _expect_error(tmp_path / "bomb.png", "too large")
    assert "downscale" in (error.hint or "")
