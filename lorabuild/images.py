"""Decoding user images into clean RGB, with errors that name the file."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    # PIL's BOX filter averages every source pixel under the target pixel: OpenCV's
    # INTER_AREA, which kohya uses for downscaling.
    "area": Image.Resampling.BOX,
}


class ImageError(Exception):
    """An image that cannot be used; the message names it."""


def _open_upright(path: Path, data: bytes | None = None) -> Image.Image:
    """The first frame of ``path`` (decoded from ``data``, its bytes, when given), turned as its
    EXIF orientation says."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im.seek(0)
            im.load()
            return ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255), data: bytes | None = None) -> Image.Image:
    """Open ``path`` (or decode ``data``, its bytes already read), apply its EXIF orientation and
    return an RGB image.

    Transparency is composited onto ``background``; animated files give their
    first frame; greyscale, palette, CMYK and 16-bit images are converted.
    """
    im = _open_upright(path, data)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting PIL clip at 255.
        im = im.point(lambda v: v / 257).convert("L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def has_alpha(path: Path) -> bool:
    """Whether the image has an alpha channel (read from its header; an unreadable file has none)."""
    try:
        with Image.open(path) as im:
            return im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def load_alpha(path: Path, data: bytes | None = None) -> Image.Image | None:
    """The alpha channel of ``path`` (or of ``data``, its bytes) as an ``L`` image, oriented like
    :func:`load_rgb`'s image (EXIF), or None when the image has none (kohya ``alpha_mask``: 0–255 → 0–1)."""
    im = _open_upright(path, data)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode not in ALPHA_MODES:
        return None
    return im.convert("RGBA").getchannel("A")
