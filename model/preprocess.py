"""Image preprocessing shared by training, evaluation, export checks and the runtime, so they cannot drift.

`load_image` reads any file Pillow can (EXIF orientation applied; CMYK, 16-bit, palette and alpha images
converted to RGB, alpha composited on white), rejecting corrupt, truncated, empty and decompression-bomb
files with an `InputError`. `resize_pixels` squashes to the model's (H, W) with a bicubic filter: the
aspect ratio is not kept, so normalized region coordinates map linearly onto the resized image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from chatspot_edge.errors import InputError

MAX_PIXELS = 64_000_000  # larger images are refused (decompression bombs); 8000 x 8000
RESIZE_FILTER = "bicubic"
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited on white; 16-bit and float images are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """An RGB image from a path, bytes or a PIL image (see module docstring for what is converted/refused)."""
    if isinstance(source, Image.Image):
        img = source
        name = "image"
    else:
        name = str(source)[:80] if not isinstance(source, bytes) else "image bytes"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                Image.MAX_IMAGE_PIXELS = MAX_PIXELS
                img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
                if img.width * img.height > MAX_PIXELS:
                    raise InputError(f"{name}: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
                img.load()
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{name}: is a folder, not an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"{name}: refused as a decompression bomb ({e})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{name}: unreadable or truncated image ({e})") from None
    if img.width <= 0 or img.height <= 0:
        raise InputError(f"{name}: image has zero size")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unusable
        pass
    return to_rgb(img)


def resize_pixels(img: Image.Image, size: tuple[int, int], resize: str = RESIZE_FILTER) -> np.ndarray:
    """RGB image -> uint8 `[H, W, 3]` at `size` = (H, W) with the manifest's filter."""
    h, w = size
    if resize not in _FILTERS:
        raise InputError(f"unknown resize filter {resize!r}")
    out = img if img.size == (w, h) else img.resize((w, h), _FILTERS[resize])
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))
