"""Referring format `chatspot-text-v1` (SPEC section 1).

A region is written as normalized text coordinates between two special tokens:

    point    <box>[0.412,0.533]</box>
    box      <box>[0.100,0.200,0.450,0.610]</box>         x1,y1,x2,y2 (top-left, bottom-right)
    polygon  <box>[0.100,0.200,0.450,0.610,0.300,0.700]</box>   3+ points, x then y

Callers give regions in PIXELS of the original image (x right, y down, origin top-left); this module
validates them, converts to [0, 1] by the original width and height, and formats with exactly 3 decimals.
Parsing goes the other way (text -> normalized -> pixels), so a region survives a round trip up to the
3-decimal quantization (half a thousandth of the image side).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

from chatspot_edge.errors import InputError

FORMAT_NAME = "chatspot-text-v1"
IMAGE_TOKEN = "<image>"
BOX_START = "<box>"
BOX_END = "</box>"
# Placeholder for the optional region embedding (referring.region_token in the manifest): it follows `</box>`.
REGION_TOKEN = "<region>"
SPECIAL_TOKENS = (IMAGE_TOKEN, BOX_START, BOX_END, REGION_TOKEN)
DECIMALS = 3

RegionKind = Literal["point", "box", "polygon"]

_NUMBER = r"-?\d+(?:\.\d+)?"
_REGION_RE = re.compile(
    re.escape(BOX_START) + r"\[(" + _NUMBER + r"(?:," + _NUMBER + r")*)\]" + re.escape(BOX_END)
)


@dataclass(frozen=True)
class Region:
    """A region in NORMALIZED coordinates of the original image: values in [0, 1], x then y.

    `coords` holds 2 numbers (point), 4 (box x1,y1,x2,y2) or 6+ even (polygon)."""

    kind: RegionKind
    coords: tuple[float, ...]

    def text(self) -> str:
        """The `<box>[...]</box>` text of this region, exactly 3 decimals, no spaces."""
        return BOX_START + "[" + ",".join(f"{c:.{DECIMALS}f}" for c in self.coords) + "]" + BOX_END

    def bbox(self) -> tuple[float, float, float, float]:
        """Normalized bounding box (x1, y1, x2, y2) of the region; a point is a zero-size box."""
        xs, ys = self.coords[0::2], self.coords[1::2]
        return (min(xs), min(ys), max(xs), max(ys))

    def to_pixels(self, width: int, height: int) -> tuple[float, ...]:
        """Coordinates back in pixels of an image of `width` x `height`."""
        return tuple(c * (width if i % 2 == 0 else height) for i, c in enumerate(self.coords))


def _check_size(width: int, height: int) -> None:
    if not (isinstance(width, (int,)) and isinstance(height, (int,))) or width <= 0 or height <= 0:
        raise InputError(f"image size must be positive integers, got {width}x{height}")


def _check_finite(values: Sequence[float], what: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: coordinates must be numbers ({e})") from None
    if not all(math.isfinite(v) for v in out):
        raise InputError(f"{what}: coordinates must be finite, got {list(values)}")
    return out


def _normalize(xy: list[float], width: int, height: int, what: str, clip: bool) -> tuple[float, ...]:
    out = []
    for i, v in enumerate(xy):
        side = width if i % 2 == 0 else height
        if clip:
            v = min(max(v, 0.0), float(side))
        elif v < 0 or v > side:
            axis = "x" if i % 2 == 0 else "y"
            raise InputError(f"{what}: {axis}={v:g} lies outside the image (0..{side} px); pass clip=True to clip")
        out.append(v / side)
    return tuple(out)


def point(x: float, y: float, width: int, height: int, *, clip: bool = False) -> Region:
    """A point at pixel (x, y) of a `width` x `height` image."""
    _check_size(width, height)
    xy = _check_finite((x, y), "point")
    return Region("point", _normalize(xy, width, height, "point", clip))


def box(x1: float, y1: float, x2: float, y2: float, width: int, height: int, *, clip: bool = False) -> Region:
    """A box with top-left (x1, y1) and bottom-right (x2, y2) in pixels; x2 > x1 and y2 > y1."""
    _check_size(width, height)
    xy = _check_finite((x1, y1, x2, y2), "box")
    norm = _normalize(xy, width, height, "box", clip)
    if not (norm[2] > norm[0] and norm[3] > norm[1]):
        raise InputError(f"box: degenerate box {xy} (needs x2 > x1 and y2 > y1)")
    # 3 decimals must not collapse the box: it would be written as a line
    if round(norm[2], DECIMALS) <= round(norm[0], DECIMALS) or round(norm[3], DECIMALS) <= round(norm[1], DECIMALS):
        raise InputError(f"box: {xy} is thinner than 1/1000 of the image and cannot be written in {FORMAT_NAME}")
    return Region("box", norm)


def polygon(points: Iterable[Sequence[float]] | Sequence[float], width: int, height: int, *, clip: bool = False) -> Region:
    """A polygon or scribble: 3+ (x, y) pixel points, as pairs or as a flat x,y,x,y,... list."""
    _check_size(width, height)
    pts = list(points)
    flat: list = []
    for p in pts:
        if isinstance(p, (list, tuple)):
            if len(p) != 2:
                raise InputError(f"polygon: each point needs 2 coordinates, got {p}")
            flat.extend(p)
        else:
            flat.append(p)
    if len(flat) % 2 != 0:
        raise InputError(f"polygon: odd number of coordinates ({len(flat)})")
    if len(flat) < 6:
        raise InputError(f"polygon: needs at least 3 points, got {len(flat) // 2}")
    xy = _check_finite(flat, "polygon")
    norm = _normalize(xy, width, height, "polygon", clip)
    xs, ys = [round(v, DECIMALS) for v in norm[0::2]], [round(v, DECIMALS) for v in norm[1::2]]
    if max(xs) - min(xs) <= 0 or max(ys) - min(ys) <= 0:  # as written (3 decimals), it would be a line
        raise InputError(f"polygon: degenerate (no extent in x or y at {FORMAT_NAME}'s 1/1000 resolution)")
    return Region("polygon", norm)


def from_pixels(kind: RegionKind, values: Sequence[float], width: int, height: int, *, clip: bool = False) -> Region:
    """Dispatch on kind with a flat list of pixel coordinates (what the CLI flags give)."""
    if kind == "point":
        if len(values) != 2:
            raise InputError(f"point: needs X,Y, got {len(values)} numbers")
        return point(values[0], values[1], width, height, clip=clip)
    if kind == "box":
        if len(values) != 4:
            raise InputError(f"box: needs X1,Y1,X2,Y2, got {len(values)} numbers")
        return box(*values, width, height, clip=clip)
    if kind == "polygon":
        return polygon(values, width, height, clip=clip)
    raise InputError(f"unknown region kind {kind!r}")


def parse_numbers(text: str, what: str) -> list[float]:
    """'1,2,3' -> [1.0, 2.0, 3.0]; a clear InputError otherwise (CLI flag parsing)."""
    try:
        return [float(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise InputError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _kind_of(n: int) -> RegionKind:
    if n == 2:
        return "point"
    if n == 4:
        return "box"
    return "polygon"


def parse_regions(text: str) -> list[Region]:
    """Every `<box>[...]</box>` region in `text`, in order. Malformed ones are skipped (model output may be
    anything); values are not clipped. A 4-number group is a box, 2 a point, 6+ even a polygon."""
    out = []
    for m in _REGION_RE.finditer(text):
        nums = [float(t) for t in m.group(1).split(",")]
        if len(nums) < 2 or len(nums) % 2 or len(nums) == 0 or not all(math.isfinite(v) for v in nums):
            continue
        out.append(Region(_kind_of(len(nums)), tuple(nums)))
    return out


def region_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Normalized bounding boxes of the regions written in `text`, in order: what region embeddings pool
    (a point is a zero-size box; the region encoder grows it to one grid cell)."""
    return [r.bbox() for r in parse_regions(text)]


def insert_region_tokens(text: str) -> str:
    """Put the region-embedding placeholder after every `</box>` (models with referring.region_token)."""
    return text.replace(BOX_END, BOX_END + REGION_TOKEN)


REGION_PLACEMENTS = ("after_box", "before_answer")


def with_region_tokens(question: str, render, placement: str = "after_box") -> str:
    """The prompt text `render(question)` with one `<region>` placeholder per region of the question:
    right after each `</box>` ("after_box"), or all at the very end of the prompt, just before the answer
    ("before_answer", in region order; the LLM then reads them with short-range attention)."""
    if placement == "after_box":
        return render(insert_region_tokens(question))
    if placement == "before_answer":
        return render(question) + REGION_TOKEN * len(parse_regions(question))
    raise ValueError(f"unknown region placement {placement!r} (one of {REGION_PLACEMENTS})")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in the same coordinate space."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
