"""Pixel conversions shared by the shard writer (``shards.py``) and the training stream (``stream.py``).

Both sides go through the same functions so that an image written at C channels and read back at
C channels keeps its exact pixels (the round-trip test relies on it). Rules:

- Every PIL mode ends as 8-bit ``L`` (1 channel) or ``RGB`` (3 channels).
- Transparency (RGBA, LA, palette or grayscale with a transparent index) is flattened onto white:
  emoji and logos have transparent backgrounds, and black would turn their outlines into noise.
- 16-bit and 32-bit integer images (``I;16``, ``I``) are scaled from 0..65535 down to 0..255 rather
  than clipped, which would turn most 16-bit photos white.
- CMYK, YCbCr, LAB and HSV go through PIL's RGB conversion.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from distgan.errors import DataError

#: Field names (extensions) recognised as the image of a webdataset sample, in order of preference.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "pnm", "tif", "tiff", "gif")

#: Resize filters the writer records in dataset.json; the stream uses the same names.
FILTERS = {
    "box": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class SampleError(DataError, ValueError):
    """One sample could not be used. Carries the shard and key so the report can name them."""

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(f"{shard} [{key}]: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


def describe_error(exn: BaseException) -> str:
    """Short text for a skip report (OSError's str() would show errno tuples)."""
    if isinstance(exn, OSError) and exn.strerror:
        return f"{type(exn).__name__}: {exn.strerror}"
    return f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"


def _to_8bit(img: Image.Image) -> Image.Image:
    """High bit-depth modes -> 8-bit L, scaled (not clipped)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 'I' is what older PIL versions and some TIFFs use for 16-bit data: treat it as 0..65535.
        a = np.asarray(img).astype(np.float64)
        a = np.clip(a, 0, 65535) / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    if img.mode == "F":
        return Image.fromarray(np.round(np.clip(np.asarray(img), 0, 255)).astype(np.uint8), mode="L")
    return img


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL image -> 8-bit ``L`` (channels=1) or ``RGB`` (channels=3), transparency on white."""
    img = _to_8bit(img)
    if img.mode == "1":
        img = img.convert("L")
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        img = white.convert("RGB")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    want = "L" if channels == 1 else "RGB"
    # RGB->L uses weights that sum to exactly 1 in PIL's fixed point, so gray stays exact.
    return img if img.mode == want else img.convert(want)


def fit(img: Image.Image, resolution: int, crop: str = "center", resize_filter: str = "lanczos") -> Image.Image:
    """Square the image (center crop, or squash with crop='none') and resize to resolution."""
    if crop == "center" and img.width != img.height:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), FILTERS[resize_filter])
    return img


def open_image(data: bytes, exif: bool = False) -> Image.Image:
    """Decode bytes fully now (PIL is lazy; a truncated file must fail here, not later)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if exif:  # photos from phones are stored sideways with an orientation tag
        img = ImageOps.exif_transpose(img)
    return img


def to_chw(img: Image.Image) -> np.ndarray:
    """PIL L/RGB -> uint8 array (C, H, W)."""
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def flip_bit(seed: int, epoch: int, shard: str, key: str) -> bool:
    """Deterministic per-sample coin for horizontal flips.

    Hashing (seed, epoch, shard name, key) instead of drawing from a running RNG makes the flip of
    a sample independent of where it lands in the stream, so a resumed stream flips exactly like
    an uninterrupted one. Only the shard's base name is used: the same shards reached through
    another path or a ``pipe:`` URL flip the same way.
    """
    name = shard.rstrip().split("/")[-1]
    digest = hashlib.blake2b(f"{seed}:{epoch}:{name}:{key}".encode(), digest_size=1).digest()
    return bool(digest[0] & 1)


def decode_sample(sample: dict[str, Any], resolution: int, channels: int) -> tuple[np.ndarray, int, bool]:
    """webdataset sample dict -> (uint8 CHW array, label or -1, whether it had to be resized).

    Raises SampleError (naming shard and key) for anything unusable.
    """
    shard, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(shard, key, f"no image field (fields: {', '.join(fields) or 'none'})")
    try:
        img = to_channels(open_image(sample[ext]), channels)
    except Image.UnidentifiedImageError:
        raise SampleError(shard, key, f"cannot decode .{ext}: not an image PIL can read") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SampleError(shard, key, f"cannot decode .{ext}: {type(e).__name__}: {e}") from None
    resized = img.size != (resolution, resolution)
    if resized:
        img = fit(img, resolution, "center", "lanczos")
    label = -1
    if "cls" in sample:
        try:
            label = int(bytes(sample["cls"]).decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise SampleError(shard, key, f"cls is not an integer: {bytes(sample['cls'])[:20]!r}") from None
    return to_chw(img), label, resized
