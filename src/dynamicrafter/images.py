"""Loading and preparing input photos.

``load_image`` opens any PIL-readable photo safely (EXIF orientation applied, converted to RGB) and
``prepare_image`` scales it to cover the model's resolution and centre-crops it, giving a (1, 3, H, W) tensor in
[-1, 1].  Where the original code pads narrow photos with black bars, we scale to cover instead; for every photo the
original does not pad (wider than the target, or already the target size) the two give the same pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 8192 * 8192  # decompression-bomb guard: larger images are refused


class ImageError(ValueError):
    """An input image that cannot be used."""


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB image, honouring the EXIF orientation; raise ImageError on anything unusable."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"image too large ({im.width}x{im.height} pixels; limit {MAX_PIXELS} pixels): {path}")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits before RGB
                arr = np.asarray(im, dtype=np.float64)
                arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
                im = Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            rgb = im.convert("RGB")
            rgb.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression-bomb limit): {path}") from exc
    except PermissionError as exc:
        raise ImageError(f"cannot read image (permission denied): {path}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"not a readable image (not a format Pillow knows, or not an image at all): {path}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable image (truncated or corrupt: {str(exc).rstrip('.')}): {path}") from exc
    if min(rgb.size) < 2:
        raise ImageError(f"image too small ({rgb.width}x{rgb.height}): {path}")
    return rgb


def cover_size(size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(w, h) after scaling ``size`` = (w, h) to cover (height, width), keeping the aspect ratio (truncating)."""
    w, h = size
    if w * height >= h * width:  # at least as wide as the target: the height decides
        return max(width, int(height * w / h)), height
    return width, max(height, int(width * h / w))


def prepare_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Scale to cover (height, width) with PIL bilinear, centre-crop, map to [-1, 1]: (1, 3, height, width)."""
    import torch  # here, not at the top: starting the CLI (``--help``, validating photos) needs no torch

    if image.size != (width, height):
        new_w, new_h = cover_size(image.size, height, width)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.BILINEAR)
        top = int(round((new_h - height) / 2))
        left = int(round((new_w - width) / 2))
        image = image.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    return ((x - 0.5) / 0.5).unsqueeze(0)
