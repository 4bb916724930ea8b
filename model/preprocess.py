"""Image preprocessing shared by training, evaluation, export checks and the runtime, so they cannot drift.

`load_image` reads any file Pillow can (EXIF orientation applied; CMYK, 16-bit, palette and alpha images
converted to RGB, alpha composited on white), rejecting corrupt, truncated, empty and decompression-bomb
files with an `InputError`. `resize_pixels` squashes to the model's (H, W) with a bicubic filter: the
aspect ratio is not kept, so normalized region coordinates map linearly onto the resized image.
"""

from __future__ import annotations

import io
import os
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
        name = ("image bytes" if isinstance(source, (bytes, bytearray)) else
                str(source)[:80] if isinstance(source, (str, os.PathLike)) else "image data")  # never a stream's repr
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


# -- region crops from the original image ---------------------------------------------------------------------

CROP_HEIGHT, CROP_WIDTH = 32, 128  # the region crop canvas: a word of 3-8 letters stays legible at 32 px
POINT_SIDE = 1.0 / 7.0  # a point is read as a square of this fraction of the shorter image side
MIN_CROP_PX = 2.0  # a box thinner than this (pixels of the source) is grown around its centre
REGION_SOURCE_MAX = 2048  # the runtime keeps the original for crops at most this long-side size


def region_source(img: Image.Image, max_side: int = REGION_SOURCE_MAX) -> Image.Image:
    """The image region crops are read from: the original, downscaled (aspect kept) only if its longer side
    exceeds `max_side` (a 12-megapixel photo would otherwise stay in memory at full size). Crops take
    normalized boxes, so the scale does not change where they fall."""
    if max(img.size) <= max_side:
        return img
    s = max_side / max(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)


def region_crops(img: Image.Image | np.ndarray, boxes, size: tuple[int, int] = (CROP_HEIGHT, CROP_WIDTH),
                 point_side: float = POINT_SIDE) -> np.ndarray:
    """Aspect-preserving crops of normalized boxes, read from `img` (the original image, not the model's
    square resize): uint8 `[R, h, w, 4]` = RGB + a validity channel (255 where the crop lies, 0 in padding).

    boxes: `[R, 4]` normalized (x1, y1, x2, y2) of `img`, the same boxes the region encoder gets; a point
    (x1 == x2 and y1 == y2) is read as a square of `point_side` x the shorter image side around it; a thinner
    extent is grown to `MIN_CROP_PX` pixels around its centre. Each crop is scaled (antialiased bilinear) by
    one factor on both axes so that it fills the canvas height or width, whichever binds first, and is centred
    on the (h, w) canvas: a word keeps its letter shapes, a tall object its proportions. The same function
    makes the crops for training, evaluation and the runtime, so they cannot drift."""
    h, w = size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(b), h, w, 4), dtype=np.uint8)
    if isinstance(img, np.ndarray):  # uint8 [H, W, 3]
        img = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    W, H = img.size
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    for r, (x1, y1, x2, y2) in enumerate(b):
        px1, px2 = sorted((float(x1) * W, float(x2) * W))
        py1, py2 = sorted((float(y1) * H, float(y2) * H))
        cx, cy = (px1 + px2) / 2, (py1 + py2) / 2
        if px2 - px1 <= 0 and py2 - py1 <= 0:  # a point
            half_w = half_h = point_side * min(W, H) / 2
        else:
            half_w, half_h = max(px2 - px1, MIN_CROP_PX) / 2, max(py2 - py1, MIN_CROP_PX) / 2
        bw, bh = 2 * half_w, 2 * half_h
        s = min(h / bh, w / bw)  # one scale for both axes: the crop keeps its aspect ratio
        left, top = (w - bw * s) / 2, (h - bh * s) / 2  # the window's place on the canvas (centred)
        wx1, wy1 = cx - half_w, cy - half_h
        # the part of the window inside the image; the rest of the canvas stays padding (validity 0)
        vx1, vy1, vx2, vy2 = max(wx1, 0.0), max(wy1, 0.0), min(wx1 + bw, float(W)), min(wy1 + bh, float(H))
        if vx2 <= vx1 or vy2 <= vy1:
            continue
        c1, c2 = round(left + (vx1 - wx1) * s), round(left + (vx2 - wx1) * s)
        r1, r2 = round(top + (vy1 - wy1) * s), round(top + (vy2 - wy1) * s)
        c1, r1 = min(max(c1, 0), w - 1), min(max(r1, 0), h - 1)
        c2, r2 = min(max(c2, c1 + 1), w), min(max(r2, r1 + 1), h)
        crop = rgb.resize((c2 - c1, r2 - r1), Image.Resampling.BILINEAR, box=(vx1, vy1, vx2, vy2), reducing_gap=None)
        out[r, r1:r2, c1:c2, :3] = np.asarray(crop, dtype=np.uint8)
        out[r, r1:r2, c1:c2, 3] = 255
    return out


def batch_region_crops(images, boxes, box_batch, size: tuple[int, int] = (CROP_HEIGHT, CROP_WIDTH)) -> np.ndarray:
    """`region_crops` for regions spread over several images: box r of `boxes [R, 4]` is read from
    `images[box_batch[r]]` (PIL images or uint8 `[H, W, 3]` arrays); returns uint8 `[R, h, w, 4]` in box order."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    idx = np.asarray(box_batch, dtype=np.int64).reshape(-1)
    out = np.zeros((len(b), size[0], size[1], 4), dtype=np.uint8)
    for i in np.unique(idx):
        out[idx == i] = region_crops(images[int(i)], b[idx == i], size)
    return out
