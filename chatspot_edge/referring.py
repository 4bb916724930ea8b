"""Referring formats: how a region is written in a prompt or an answer (SPEC sections 1 and 1b).

One representation, `Region` (normalized coordinates of the original image), and two ways to write it:

    chatspot-text-v1 (ChatSpot's)  point    <box>[0.412,0.533]</box>
                                   box      <box>[0.100,0.200,0.450,0.610]</box>      x1,y1,x2,y2
                                   polygon  <box>[0.100,0.200,0.450,0.610,0.300,0.700]</box>   3+ points
    chatspot-loc-v1  (N bins)      point    <box><loc_13><loc_17></box>
                                   box      <box><loc_3><loc_6><loc_14><loc_19></box>
                                   polygon  the x, y pairs in order, one `<loc_k>` each

Callers give regions in PIXELS of the original image (x right, y down, origin top-left); `point`, `box`,
`polygon` validate them once (finite, inside the image unless clipped, not degenerate) and normalize to
[0, 1]. Writing is the format's job: text-v1 writes exactly 3 decimals (and refuses a region that would be
a line at that resolution); loc-v1 writes bin k = min(N - 1, floor(c * N)) per coordinate as the added token
`<loc_k>` and widens a region whose coordinates fall in one bin on an axis to the adjacent bin. Parsing reads
either format back (loc bin k decodes to its centre (k + 0.5) / N), so one dataset (SpotWorld stays in
text-v1 on disk) trains and evaluates models of either format: `ReferringFormat.convert` rewrites every
region of a text into the model's format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

from chatspot_edge.errors import InputError

TEXT_FORMAT = "chatspot-text-v1"
LOC_FORMAT = "chatspot-loc-v1"
FORMATS = (TEXT_FORMAT, LOC_FORMAT)
FORMAT_NAME = TEXT_FORMAT  # the default format (ChatSpot's protocol)
# chatspot-loc-v1's default bins per axis: on SpotWorld's test set, 32 bins keep every grounding target at
# IoU >= 0.5 after quantization (mean 0.82; 16 bins: 94%) and stay at 97.5% when the model is 1% of the
# image side off per coordinate (64 bins: 99.6%); each bin is ~1/4.6 of a 7x7 image-grid cell (docs/referring.md)
DEFAULT_BINS = 32

IMAGE_TOKEN = "<image>"
BOX_START = "<box>"
BOX_END = "</box>"
# Placeholder for the optional region embedding (referring.region_token in the manifest): it follows `</box>`.
REGION_TOKEN = "<region>"
SPECIAL_TOKENS = (IMAGE_TOKEN, BOX_START, BOX_END, REGION_TOKEN)
DECIMALS = 3

RegionKind = Literal["point", "box", "polygon"]

_NUMBER = r"-?\d+(?:\.\d+)?"
_LOC = r"<loc_(?:0|[1-9]\d*)>"  # decimal, no padding
_LOC_RE = re.compile(r"<loc_(0|[1-9]\d*)>")
_REGION_RE = re.compile(
    re.escape(BOX_START) + r"(?:\[(" + _NUMBER + r"(?:," + _NUMBER + r")*)\]|((?:" + _LOC + r")+))" + re.escape(BOX_END)
)


def loc_token(k: int) -> str:
    """The added token of bin k: `<loc_k>`."""
    return f"<loc_{k}>"


def loc_tokens(bins: int) -> tuple[str, ...]:
    """`<loc_0>` .. `<loc_{bins-1}>`, in id order."""
    return tuple(loc_token(k) for k in range(bins))


def loc_bin(c: float, bins: int) -> int:
    """Bin of a normalized coordinate c in [0, 1]: min(N - 1, floor(c * N)) (clamped to 0 below)."""
    return min(bins - 1, max(0, math.floor(c * bins)))


def loc_centre(k: int, bins: int) -> float:
    """Normalized coordinate that bin k decodes to: its centre (k + 0.5) / N."""
    return (k + 0.5) / bins


@dataclass(frozen=True)
class Region:
    """A region in NORMALIZED coordinates of the original image: values in [0, 1], x then y.

    `coords` holds 2 numbers (point), 4 (box x1,y1,x2,y2) or 6+ even (polygon). Build one with `point`,
    `box`, `polygon`, `from_pixels` or `from_normalized` (they validate); write it with a format."""

    kind: RegionKind
    coords: tuple[float, ...]

    def text(self) -> str:
        """The chatspot-text-v1 text of this region (`<box>[...]</box>`, exactly 3 decimals, no spaces)."""
        return _write_text(self)

    def write(self, fmt: "ReferringFormat") -> str:
        """The text of this region in format `fmt`."""
        return fmt.write(self)

    def bbox(self) -> tuple[float, float, float, float]:
        """Normalized bounding box (x1, y1, x2, y2) of the region; a point is a zero-size box."""
        xs, ys = self.coords[0::2], self.coords[1::2]
        return (min(xs), min(ys), max(xs), max(ys))

    def to_pixels(self, width: int, height: int) -> tuple[float, ...]:
        """Coordinates back in pixels of an image of `width` x `height`."""
        return tuple(c * (width if i % 2 == 0 else height) for i, c in enumerate(self.coords))


# -- building (the one validation) --------------------------------------------------------------------------------


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


def _normalize(xy: list[float], width: float, height: float, what: str, clip: bool, unit: str) -> tuple[float, ...]:
    out = []
    for i, v in enumerate(xy):
        side = width if i % 2 == 0 else height
        if clip:
            v = min(max(v, 0.0), float(side))
        elif v < 0 or v > side:
            axis = "x" if i % 2 == 0 else "y"
            raise InputError(f"{what}: {axis}={v:g} lies outside the image (0..{side:g} {unit}); "
                             "pass clip=True to clip")
        out.append(v / side)
    return tuple(out)


def _region(kind: RegionKind, values: Sequence[float], width: float, height: float, clip: bool,
            unit: str = "px") -> Region:
    """Validate coordinates given in units of a `width` x `height` image and normalize them: finite, inside
    the image (or clipped), a box with x2 > x1 and y2 > y1, a polygon of 3+ points with an extent in x and y."""
    xy = _check_finite(values, kind)
    norm = _normalize(xy, width, height, kind, clip, unit)
    xs, ys = norm[0::2], norm[1::2]
    if kind == "box" and not (norm[2] > norm[0] and norm[3] > norm[1]):
        raise InputError(f"box: degenerate box {xy} (needs x2 > x1 and y2 > y1)")
    if kind == "polygon" and (max(xs) <= min(xs) or max(ys) <= min(ys)):
        raise InputError(f"polygon: degenerate (its points have no extent in x or y): {xy}")
    return Region(kind, norm)


def point(x: float, y: float, width: int, height: int, *, clip: bool = False) -> Region:
    """A point at pixel (x, y) of a `width` x `height` image."""
    _check_size(width, height)
    return _region("point", (x, y), width, height, clip)


def box(x1: float, y1: float, x2: float, y2: float, width: int, height: int, *, clip: bool = False) -> Region:
    """A box with top-left (x1, y1) and bottom-right (x2, y2) in pixels; x2 > x1 and y2 > y1."""
    _check_size(width, height)
    return _region("box", (x1, y1, x2, y2), width, height, clip)


def _flat_points(points: Iterable[Sequence[float]] | Sequence[float]) -> list:
    flat: list = []
    for p in list(points):
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
    return flat


def polygon(points: Iterable[Sequence[float]] | Sequence[float], width: int, height: int, *, clip: bool = False) -> Region:
    """A polygon or scribble: 3+ (x, y) pixel points, as pairs or as a flat x,y,x,y,... list."""
    _check_size(width, height)
    return _region("polygon", _flat_points(points), width, height, clip)


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


def from_normalized(kind: RegionKind, coords: Sequence[float]) -> Region:
    """A region from normalized coordinates (e.g. parsed from text), with the same validation as pixels."""
    if kind == "polygon":
        return _region("polygon", _flat_points(coords), 1, 1, False, "of the image side")
    if len(coords) != {"point": 2, "box": 4}.get(kind, -1):
        raise InputError(f"{kind}: wrong number of coordinates ({len(coords)})")
    return _region(kind, coords, 1, 1, False, "of the image side")


def parse_numbers(text: str, what: str) -> list[float]:
    """'1,2,3' -> [1.0, 2.0, 3.0]; a clear InputError otherwise (CLI flag parsing)."""
    try:
        return [float(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise InputError(f"{what}: expected comma-separated numbers, got {text!r}") from None


# -- writing ------------------------------------------------------------------------------------------------------


def _write_text(region: Region) -> str:
    """chatspot-text-v1: exactly 3 decimals. A box / polygon that would have no extent at 3 decimals (thinner
    than 1/1000 of the image side) cannot be written in this format: InputError."""
    if region.kind != "point":
        xs = [round(c, DECIMALS) for c in region.coords[0::2]]
        ys = [round(c, DECIMALS) for c in region.coords[1::2]]
        if max(xs) <= min(xs) or max(ys) <= min(ys):
            raise InputError(f"{region.kind}: thinner than 1/1000 of the image; it cannot be written in {TEXT_FORMAT}")
    return BOX_START + "[" + ",".join(f"{c:.{DECIMALS}f}" for c in region.coords) + "]" + BOX_END


def _write_loc(region: Region, bins: int) -> str:
    """chatspot-loc-v1: one `<loc_k>` per coordinate. If a box's or polygon's coordinates all fall in one bin
    on an axis, the largest ones move to the next bin (the smallest to the previous one in the last bin), so
    what is written keeps an extent (SPEC 1b: widened, never refused for that alone)."""
    k = [loc_bin(c, bins) for c in region.coords]
    if region.kind != "point":
        for axis in (0, 1):
            ks, vals = k[axis::2], region.coords[axis::2]
            if max(ks) == min(ks):
                edge, step = (max(vals), 1) if ks[0] < bins - 1 else (min(vals), -1)
                for i in range(axis, len(k), 2):
                    if region.coords[i] == edge:
                        k[i] += step
    return BOX_START + "".join(loc_token(b) for b in k) + BOX_END


# -- parsing ------------------------------------------------------------------------------------------------------


def _kind_of(n: int) -> RegionKind:
    if n == 2:
        return "point"
    if n == 4:
        return "box"
    return "polygon"


def _scan(text: str, bins: int | None) -> Iterator[tuple[re.Match, Region | None, str]]:
    """(match, region or None if malformed, format) for every `<box>...</box>` of either format in `text`.
    Loc regions need the bin count: with `bins` None, or a bin >= bins, they count as malformed."""
    for m in _REGION_RE.finditer(text):
        if m.group(1) is not None:
            nums = [float(t) for t in m.group(1).split(",")]
            fmt = TEXT_FORMAT
        else:
            ks = [int(t) for t in _LOC_RE.findall(m.group(2))]
            fmt = LOC_FORMAT
            nums = [loc_centre(k, bins) for k in ks] if bins and all(k < bins for k in ks) else []
        ok = len(nums) >= 2 and len(nums) % 2 == 0 and all(math.isfinite(v) for v in nums)
        yield m, (Region(_kind_of(len(nums)), tuple(nums)) if ok else None), fmt


def parse_regions(text: str, bins: int | None = None) -> list[Region]:
    """Every region written in `text`, in order, in either format (loc regions when `bins` is given).
    Malformed ones are skipped (model output may be anything); values are not clipped or validated.
    A 4-number group is a box, 2 a point, 6+ even a polygon."""
    return [r for _, r, _ in _scan(text, bins) if r is not None]


def region_spans(text: str, bins: int | None = None) -> list[tuple[int, int, Region | None]]:
    """(start, end, region or None if malformed) of every `<box>...</box>` in `text`, either format."""
    return [(m.start(), m.end(), r) for m, r, _ in _scan(text, bins)]


def region_boxes(text: str, bins: int | None = None) -> list[tuple[float, float, float, float]]:
    """Normalized bounding boxes of the regions written in `text`, in order: what region embeddings pool
    (a point is a zero-size box; the region encoder grows it to one grid cell)."""
    return [r.bbox() for r in parse_regions(text, bins)]


# -- a model's format ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferringFormat:
    """The format a model speaks: `name` (chatspot-text-v1 or chatspot-loc-v1) and, for loc, `bins` N per axis.
    Recorded in the checkpoint config and the bundle manifest as `referring: {"format", "bins"}`."""

    name: str = TEXT_FORMAT
    bins: int | None = None

    def __post_init__(self) -> None:
        if self.name == TEXT_FORMAT:
            if self.bins is not None:
                raise InputError(f"{TEXT_FORMAT} has no bins (got {self.bins})")
        elif self.name == LOC_FORMAT:
            if not isinstance(self.bins, int) or isinstance(self.bins, bool) or self.bins < 2:
                raise InputError(f"{LOC_FORMAT} needs an integer number of bins >= 2, got {self.bins!r}")
        else:
            raise InputError(f"unknown referring format {self.name!r} (one of {', '.join(FORMATS)})")

    @classmethod
    def from_dict(cls, d: dict | None) -> "ReferringFormat":
        """From a config / manifest `referring` entry (missing: chatspot-text-v1)."""
        d = d or {}
        return cls(d.get("format", TEXT_FORMAT), d.get("bins"))

    def to_dict(self) -> dict:
        return {"format": self.name, **({"bins": self.bins} if self.bins is not None else {})}

    @property
    def is_loc(self) -> bool:
        return self.name == LOC_FORMAT

    @property
    def tokens(self) -> tuple[str, ...]:
        """The added tokens this format needs beyond SPECIAL_TOKENS (`<loc_0>`.. for loc; none for text)."""
        return loc_tokens(self.bins) if self.is_loc else ()

    def write(self, region: Region) -> str:
        return _write_loc(region, self.bins) if self.is_loc else _write_text(region)

    def parse(self, text: str) -> list[Region]:
        """Regions of `text` in either format (this format's bins decode loc tokens)."""
        return parse_regions(text, self.bins)

    def boxes(self, text: str) -> list[tuple[float, float, float, float]]:
        return region_boxes(text, self.bins)

    def convert(self, text: str) -> str:
        """`text` with every region written in the other format rewritten in this one (validated as regions
        from pixels are: InputError if one lies outside the image or is degenerate). Regions already in this
        format and malformed ones stay as written."""
        out, last = [], 0
        for m, region, fmt in _scan(text, self.bins):
            if fmt == self.name or region is None:
                continue
            out += [text[last:m.start()], self.write(from_normalized(region.kind, region.coords))]
            last = m.end()
        return "".join(out) + text[last:] if out else text


TEXT = ReferringFormat()


def format_option(name: str | None, bins: int | None = None) -> ReferringFormat | None:
    """A command-line choice (`--referring text|loc [--bins N]`, full format names too) -> the format;
    None when neither is given (keep the model's own). `--bins` alone means loc."""
    if name is None and bins is None:
        return None
    short = {"text": TEXT_FORMAT, "loc": LOC_FORMAT}
    full = short.get(name or "loc", name)
    if full == TEXT_FORMAT and bins is not None:
        raise InputError(f"--bins is for {LOC_FORMAT}; {TEXT_FORMAT} writes decimals")
    if full == LOC_FORMAT and bins is None:
        bins = DEFAULT_BINS
    return ReferringFormat(full, bins)


# -- region embeddings ------------------------------------------------------------------------------------------


def insert_region_tokens(text: str) -> str:
    """Put the region-embedding placeholder after every `</box>` (models with referring.region_token)."""
    return text.replace(BOX_END, BOX_END + REGION_TOKEN)


REGION_PLACEMENTS = ("after_box", "before_answer")


def with_region_tokens(question: str, render, placement: str = "after_box", bins: int | None = None) -> str:
    """The prompt text `render(question)` with one `<region>` placeholder per region of the question:
    right after each `</box>` ("after_box"), or all at the very end of the prompt, just before the answer
    ("before_answer", in region order; the LLM then reads them with short-range attention). `bins`: the
    model's loc bins (its loc regions count)."""
    if placement == "after_box":
        return render(insert_region_tokens(question))
    if placement == "before_answer":
        return render(question) + REGION_TOKEN * len(parse_regions(question, bins))
    raise ValueError(f"unknown region placement {placement!r} (one of {REGION_PLACEMENTS})")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in the same coordinate space."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
