"""Any image input → an RGB PIL image; tiles → normalized pixel arrays (numpy)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MediaError

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


def load_image(image: ImageInput, max_pixels: int = 178_956_970, budget_pixels: int | None = None) -> Image.Image:
    """Open and decode ``image`` (path, bytes, PIL image or HWC uint8 RGB array) as RGB.

    ``max_pixels`` refuses larger images from the header, before any decode. ``budget_pixels`` (what the tiler
    can use): a larger file is downscaled while it decodes (JPEG: libjpeg's DCT scaling through PIL ``draft``,
    so the full-size bitmap is never made) or right after (PIL ``reduce``, an integer box filter), keeping at
    least ``budget_pixels``. EXIF orientation is applied; grayscale, RGBA (alpha dropped, as the reference ``convert("RGB")``),
    palette, CMYK and 16-bit images are converted to 8-bit RGB. Unreadable input raises ``MediaError``.
    """
    if isinstance(image, np.ndarray):
        if image.ndim >= 2 and image.shape[0] * image.shape[1] > max_pixels:
            raise MediaError(
                f"image array has {image.shape[0] * image.shape[1]} pixels, above the limit of {max_pixels}; downscale it first"
            )
        return _from_array(image)
    if isinstance(image, Image.Image):
        img = image
        name = "PIL image"
    elif isinstance(image, (bytes, bytearray)):
        name = "image bytes"
        if not image:
            raise MediaError("image bytes are empty (0 bytes)")
        img = _open(io.BytesIO(image), name, max_pixels, budget_pixels)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        name = str(path)
        if not path.is_file():
            raise MediaError(f"image file not found: {path}")
        if path.stat().st_size == 0:
            raise MediaError(f"image file is empty (0 bytes): {path}")
        img = _open(path, name, max_pixels, budget_pixels)
    else:
        raise MediaError(
            f"unsupported image input of type {type(image).__name__}; pass a path, bytes, a PIL image or an HWC uint8 array"
        )
    w, h = img.size
    if w < 1 or h < 1:
        raise MediaError(f"{name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise MediaError(f"{name} has {w * h} pixels, above the limit of {max_pixels}; downscale it first")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not hide a good image
        pass
    return _to_rgb(img, name)


def _open(src, name: str, max_pixels: int, budget_pixels: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below decides; PIL's warning threshold is lower than our default
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
            w, h = img.size
            if w * h > max_pixels:
                raise MediaError(f"{name} has {w * h} pixels, above the limit of {max_pixels}; downscale it first")
            factor = reduce_factor((w, h), budget_pixels)
            if factor > 1:
                img.draft(None, (-(-w // factor), -(-h // factor)))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            img.load()  # force decoding now so truncated data fails here, not later
            return _reduce(img, budget_pixels)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name} is too large to decode safely ({e}); downscale it first") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"cannot decode {name}: {e}. Is it a complete JPEG/PNG/WebP/BMP/TIFF file?") from e


def reduce_factor(size: tuple[int, int], budget_pixels: int | None) -> int:
    """The largest integer downscale that keeps at least ``budget_pixels`` (1: none)."""
    w, h = size
    if not budget_pixels or w * h <= budget_pixels:
        return 1
    return max(1, int((w * h / budget_pixels) ** 0.5))


def _reduce(img: Image.Image, budget_pixels: int | None) -> Image.Image:
    factor = reduce_factor(img.size, budget_pixels)
    if factor == 1:
        return img
    if img.mode not in ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F", "I;16"):
        img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
    return img.reduce(factor)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            arr = arr / 257.0  # 16-bit → 8-bit
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"cannot convert {name} from mode {mode} to RGB: {e}") from e


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MediaError(f"image arrays must be HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = np.rint(arr / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0:
            arr = np.rint(arr * 255.0).astype(np.uint8)
        else:
            raise MediaError(f"image arrays must be uint8 (0-255), uint16, or float in [0, 1]; got {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[..., 0], "L").convert("RGB")
    if arr.shape[2] == 4:
        return Image.fromarray(arr, "RGBA").convert("RGB")
    return Image.fromarray(arr, "RGB")


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Reference resize: PIL bicubic (antialiased when downscaling). ``size`` is (width, height)."""
    if img.size == tuple(size):
        return img
    return img.resize(tuple(size), Image.Resampling.BICUBIC)


def crop_grid(img: Image.Image, cols: int, rows: int, tile: int) -> list[Image.Image]:
    """Resize to cols*tile x rows*tile and crop tiles left→right, top→bottom."""
    big = resize(img, (cols * tile, rows * tile))
    return [big.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]


def to_pixel_values(
    tiles: Sequence[Image.Image], mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
) -> np.ndarray:
    """Tiles → float32 (N, 3, H, W): rescale 1/255, normalize per channel."""
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if not all(getattr(t, "mode", None) == "RGB" for t in tiles):
        arr = np.stack([np.asarray(t, dtype=np.float32) for t in tiles]) * np.float32(1 / 255)
        return np.ascontiguousarray(((arr - mean32) / std32).transpose(0, 3, 1, 2))
    # 8-bit RGB: the same float32 arithmetic done once per byte value, then a table lookup (3x faster)
    lut = (np.arange(256, dtype=np.float32)[None] * np.float32(1 / 255) - mean32[:, None]) / std32[:, None]
    u = np.ascontiguousarray(np.stack([np.asarray(t) for t in tiles]).transpose(0, 3, 1, 2))
    out = np.empty(u.shape, np.float32)
    for n in range(u.shape[0]):  # contiguous planes: np.take into a strided view would copy
        for c in range(3):
            np.take(lut[c], u[n, c], out=out[n, c])
    return out
