"""SpotWorld: a deterministic synthetic referring dataset (SPEC section 5).

Each sample is a scene of 1-8 coloured shapes (and sometimes one rendered word) on a flat, gradient,
smoothed-noise or photo background, plus one question/answer pair in the LLaVA conversation style.

Coordinates. Every `box`, `region.pixels` and scene coordinate in this module is in PIXELS of the original
image: x right, y down, origin at the top-left corner of the top-left pixel. Boxes are [x1, y1, x2, y2]
pixel EDGES (x2, y2 exclusive), so a box tight around the pixel columns 3..7 is x1=3, x2=8, and every box
lies within [0, W] x [0, H]. Normalized [0, 1] coordinates only appear inside the `<box>[...]</box>` text,
which is always written by `chatspot_edge.referring`.

Determinism. A sample depends only on (seed, split, index, GENERATOR_VERSION): it draws from its own
`numpy.random.Generator` seeded by (seed, split, index), and its task comes from a fixed, seed-independent
schedule, so the output is byte-identical whatever the worker count or the dataset size.

Extra turns (version 2). A training image also carries `EXTRA_TURNS["train"]` more questions about the same
scene (tasks drawn from `EXTRA_MIX`, from a second generator seeded by (seed, split, index, 1), so the
first turn, the image and the test split are exactly what version 1 wrote). They are LLaVA-style later
turns of `conversations`, each a question that stands on its own (no "it", no reference to an earlier
answer), listed with their tasks and targets in `turns`. A training step reads the image once and learns
from every question on it; see `train.adapt` for how the turns are kept independent of each other.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from chatspot_edge import referring
from chatspot_edge.errors import InputError

GENERATOR_VERSION = 2
FORMAT = "spotworld"

# --- vocabulary ----------------------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 170, 50),
    "blue": (20, 60, 230),
    "yellow": (255, 230, 0),
    "purple": (150, 40, 180),
    "orange": (255, 128, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
SIZES: tuple[str, ...] = ("small", "medium", "large")
TEXT_SHAPE = "text"
TASKS: tuple[str, ...] = (
    "region_recognition", "point_qa", "region_ocr", "region_relation", "grounding", "image_caption", "counting",
)
# Percent of each split per task; exact over every prefix up to rounding (see `task_schedule`).
TRAIN_MIX: dict[str, int] = {
    "region_recognition": 35, "point_qa": 20, "region_ocr": 12, "region_relation": 8,
    "grounding": 15, "image_caption": 5, "counting": 5,
}
TEST_MIX: dict[str, int] = {
    "region_recognition": 40, "point_qa": 18, "region_ocr": 10, "region_relation": 7,
    "grounding": 15, "image_caption": 5, "counting": 5,
}
SPLITS: dict[str, int] = {"train": 0, "test": 1}
# Questions per image besides the scheduled one (version 2). The test split keeps one question per image, so
# its records are those of version 1.
EXTRA_TURNS: dict[str, int] = {"train": 7, "test": 0}
# Task shares of the extra turns, percent. The region tasks whose answers need the region embedding most
# (relation, counting, OCR, grounding) get more than in TRAIN_MIX; captions (long answers) none.
EXTRA_MIX: dict[str, int] = {
    "region_recognition": 25, "point_qa": 15, "region_ocr": 15, "region_relation": 15,
    "grounding": 15, "image_caption": 0, "counting": 15,
}

# Words for the OCR task: 3-8 letters, no colour or shape names (they would blur the other tasks).
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "tree", "house", "apple", "water", "bread", "chair", "table", "river",
    "cloud", "music", "light", "train", "plane", "horse", "mouse", "bird", "fish", "book", "door", "window",
    "garden", "coffee", "pizza", "lemon", "tiger", "zebra", "robot", "rocket", "camera", "phone", "paper",
    "pencil", "ocean", "beach", "forest", "winter", "summer", "spring", "autumn", "happy", "smile", "dance",
    "party", "night", "morning", "sleep", "dream", "money", "city", "road", "bridge", "castle", "island",
    "planet", "candle", "flower", "honey", "cookie", "guitar", "piano", "snow", "rain", "wind", "stone",
    "open", "stop", "exit", "sale", "hello", "thanks", "welcome", "market", "school", "coast",
)

ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3))
LONG_SIDE_RANGE = (160, 448)  # longer image side, pixels, inclusive
# Shape diameter as a fraction of the shorter image side, per size class (gaps keep the classes apart).
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.12, 0.17), "medium": (0.20, 0.28), "large": (0.32, 0.42)}
SIZE_PROBS = (0.4, 0.35, 0.25)
TEXT_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.09, 0.12), "medium": (0.13, 0.17), "large": (0.18, 0.23)}
MIN_RADIUS_PX = 7.0
MIN_FONT_PX = 12
MIN_VISIBLE = 0.65  # every shape keeps at least this fraction of its pixels visible (labels stay correct)
TEXT_PROB = 0.3  # chance that a non-OCR scene also contains a word
PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "camera", "grace_hopper")
BACKGROUND_KINDS: tuple[str, ...] = ("flat", "gradient", "noise", "photo")
BACKGROUND_WORDS = {"flat": "plain", "gradient": "gradient", "noise": "textured", "photo": "photo"}
_CONTRAST_DIST = 90.0  # RGB distance below which a background pixel counts as "the same colour"
_CONTRAST_MAX_FRACTION = 0.03
PNG_COMPRESS_LEVEL = 1

_PLURALS = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}


# --- scene specification and rendering -----------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """A filled polygon shape: centre (cx, cy) and radius in pixels, rotation in degrees."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float


@dataclass(frozen=True)
class TextSpec:
    """A rendered word: PIL's default (scalable) font, text origin (x, y) in pixels, font size in pixels."""

    text: str
    color: str
    size: str
    x: float
    y: float
    font_size: int
    shape: str = TEXT_SHAPE


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render a scene; `render_scene` turns it into pixels without randomness."""

    width: int
    height: int
    background: dict
    objects: tuple = field(default_factory=tuple)  # ShapeSpec | TextSpec, drawn in order (later on top)


@lru_cache(maxsize=None)
def _unit_outline(shape: str) -> np.ndarray:
    """Polygon vertices (N, 2) of a shape centred at 0 with extent about [-1, 1] (y down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8
    elif shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(a), np.sin(a)], 1)
        pts[:, 1] += 0.25  # centre the bounding box vertically
    elif shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "hexagon":
        a = np.deg2rad(60 * np.arange(6))
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "diamond":
        pts = np.array([[0, -1], [0.65, 0], [0, 1], [-0.65, 0]], float)
    elif shape == "cross":
        a = 0.32
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                        [-1, -a], [-a, -a]], float)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
        pts -= (pts.max(0) + pts.min(0)) / 2
        pts /= np.abs(pts).max()
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return pts


def shape_outline(obj: ShapeSpec) -> np.ndarray:
    """The shape's polygon vertices (N, 2) in pixels."""
    a = math.radians(obj.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _unit_outline(obj.shape) @ rot.T * obj.radius + np.array([obj.cx, obj.cy])


def _region_outline(obj: ShapeSpec) -> np.ndarray:
    """A short version of the outline for a polygon region in a question (at most 12 vertices)."""
    pts = shape_outline(obj)
    step = {"circle": 4, "heart": 4}.get(obj.shape, 1)
    return pts[::step]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _coverage(obj: ShapeSpec | TextSpec, width: int, height: int) -> np.ndarray:
    """Where the object paints: a bool mask (shapes, no anti-aliasing) or a uint8 alpha (text), H x W."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    if isinstance(obj, TextSpec):
        draw.text((obj.x, obj.y), obj.text, fill=255, font=_font(obj.font_size))
        return np.asarray(img)
    draw.polygon([tuple(p) for p in shape_outline(obj).tolist()], fill=255)
    return np.asarray(img) > 0


def _paint(canvas: np.ndarray, obj: ShapeSpec | TextSpec, cov: np.ndarray) -> None:
    """Draw the object's colour into `canvas` (H x W x 3 uint8) in place."""
    rgb = np.array(COLORS[obj.color], np.int32)
    if cov.dtype == bool:
        canvas[cov] = rgb
        return
    sel = cov > 0
    a = cov[sel].astype(np.int32)[:, None]
    canvas[sel] = ((canvas[sel].astype(np.int32) * (255 - a) + rgb * a + 127) // 255).astype(np.uint8)


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    """A bundled sample photo (scikit-image or matplotlib data, no network), RGB, loaded once per process."""
    if name == "grace_hopper":
        from matplotlib.cbook import get_sample_data

        with get_sample_data("grace_hopper.jpg", asfileobj=True) as f:
            return Image.open(f).convert("RGB")
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]).astype(np.uint8)).convert("RGB")


def _render_background(bg: dict, width: int, height: int) -> np.ndarray:
    kind = bg["kind"]
    if kind == "flat":
        return np.broadcast_to(np.array(bg["color"], np.uint8), (height, width, 3)).copy()
    if kind == "gradient":
        a = math.radians(bg["angle"])
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        proj = xs * math.cos(a) + ys * math.sin(a)
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
        c1, c2 = np.array(bg["colors"][0], np.float32), np.array(bg["colors"][1], np.float32)
        return np.rint(c1 + (c2 - c1) * t[..., None]).astype(np.uint8)
    if kind == "noise":
        rng = np.random.default_rng(bg["seed"])
        gw, gh = bg["grid"]
        small = rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int32)
        base = np.array(bg["base"], np.int32)
        return ((img + base) // 2).astype(np.uint8)
    if kind == "photo":
        crop = _photo(bg["name"]).crop(tuple(bg["crop"]))
        return np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR)).copy()
    raise ValueError(f"unknown background kind {kind!r}")


def render_scene(spec: SceneSpec) -> tuple[Image.Image, list[np.ndarray]]:
    """Render a scene: the RGB image and, per object, the bool mask (H x W) of its VISIBLE pixels.

    Shapes are drawn without anti-aliasing, so every visible pixel of a shape has exactly `COLORS[color]`;
    text is anti-aliased (its mask is where its alpha is above zero)."""
    w, h = spec.width, spec.height
    canvas = _render_background(spec.background, w, h)
    owner = np.full((h, w), -1, np.int16)
    for k, obj in enumerate(spec.objects):
        cov = _coverage(obj, w, h)
        _paint(canvas, obj, cov)
        owner[cov if cov.dtype == bool else cov > 0] = k
    masks = [owner == k for k in range(len(spec.objects))]
    return Image.fromarray(canvas), masks


def mask_box(mask: np.ndarray) -> list[int]:
    """Tight [x1, y1, x2, y2] pixel-edge box of a non-empty bool mask (x2, y2 exclusive)."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


# --- scene sampling ------------------------------------------------------------------------------------


@dataclass
class _Scene:
    """A sampled scene with its labels: spec, pixels, visible masks, full (unoccluded) areas."""

    spec: SceneSpec
    canvas: np.ndarray
    masks: list[np.ndarray]
    full_area: list[int]
    _memo: dict = field(default_factory=dict, repr=False, compare=False)  # boxes and areas, computed once

    @property
    def objects(self) -> tuple:
        return self.spec.objects

    def box(self, i: int) -> list[int]:
        if ("box", i) not in self._memo:
            self._memo[("box", i)] = mask_box(self.masks[i])
        return list(self._memo[("box", i)])

    def visible(self, i: int) -> int:
        """Visible pixels of object i."""
        if ("area", i) not in self._memo:
            self._memo[("area", i)] = int(self.masks[i].sum())
        return self._memo[("area", i)]

    def shape_ids(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if o.shape != TEXT_SHAPE]

    def text_ids(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if o.shape == TEXT_SHAPE]


def _sample_size(rng: np.random.Generator) -> tuple[int, int]:
    rw, rh = ASPECT_RATIOS[int(rng.integers(len(ASPECT_RATIOS)))]
    long = int(rng.integers(LONG_SIDE_RANGE[0], LONG_SIDE_RANGE[1] + 1))
    if rw >= rh:
        return long, max(1, round(long * rh / rw))
    return max(1, round(long * rw / rh)), long


def _random_rgb(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> list[int]:
    return [int(v) for v in rng.integers(lo, hi, 3)]


def _sample_background(rng: np.random.Generator, width: int, height: int) -> dict:
    kind = BACKGROUND_KINDS[int(rng.choice(4, p=[0.25, 0.25, 0.2, 0.3]))]
    if kind == "flat":
        return {"kind": "flat", "color": _random_rgb(rng)}
    if kind == "gradient":
        return {"kind": "gradient", "colors": [_random_rgb(rng), _random_rgb(rng)], "angle": float(rng.integers(0, 360))}
    if kind == "noise":
        g = int(rng.integers(3, 12))
        return {"kind": "noise", "seed": int(rng.integers(2**31)), "grid": [g, g], "base": _random_rgb(rng, 40, 216)}
    name = PHOTOS[int(rng.integers(len(PHOTOS)))]
    pw, ph = _photo(name).size
    scale = float(rng.uniform(0.35, 1.0))
    cw = min(pw, ph * width / height) * scale
    ch = cw * height / width
    x0 = float(rng.uniform(0, pw - cw))
    y0 = float(rng.uniform(0, ph - ch))
    return {"kind": "photo", "name": name, "crop": [round(x0), round(y0), round(x0 + cw), round(y0 + ch)]}


def _contrasting_color(rng: np.random.Generator, canvas: np.ndarray, box: Sequence[int],
                       avoid: Sequence[str] = ()) -> str | None:
    """A colour that differs from nearly every pixel of `canvas` in `box` (grown by 3 px), or None."""
    h, w = canvas.shape[:2]
    x1, y1, x2, y2 = max(0, box[0] - 3), max(0, box[1] - 3), min(w, box[2] + 3), min(h, box[3] + 3)
    patch = canvas[y1:y2, x1:x2].reshape(-1, 3).astype(np.int32)
    names = list(COLORS)
    for ci in rng.permutation(len(names)):
        name = names[int(ci)]
        if name in avoid:
            continue
        d2 = ((patch - np.array(COLORS[name], np.int32)) ** 2).sum(1)
        if (d2 < _CONTRAST_DIST**2).mean() <= _CONTRAST_MAX_FRACTION:
            return name
    return None


def _boxes_touch(a: Sequence[int], b: Sequence[int], margin: int = 2) -> bool:
    return a[0] - margin < b[2] and b[0] - margin < a[2] and a[1] - margin < b[3] and b[1] - margin < a[3]


def _sample_shape(rng: np.random.Generator, width: int, height: int) -> ShapeSpec | None:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = SIZES[int(rng.choice(3, p=SIZE_PROBS))]
    lo, hi = SIZE_FRACTIONS[size]
    radius = max(MIN_RADIUS_PX, float(rng.uniform(lo, hi)) * min(width, height) / 2)
    if shape == "hexagon":
        angle = float(rng.uniform(0, 60))
    elif shape == "circle":
        angle = 0.0
    else:
        angle = float(rng.uniform(-15, 15))
    probe = ShapeSpec(shape, "black", size, 0.0, 0.0, radius, angle)
    pts = shape_outline(probe)
    (mnx, mny), (mxx, mxy) = pts.min(0), pts.max(0)
    if mxx - mnx > width - 4 or mxy - mny > height - 4:
        return None
    cx = float(rng.uniform(2 - mnx, width - 2 - mxx))
    cy = float(rng.uniform(2 - mny, height - 2 - mxy))
    return ShapeSpec(shape, "black", size, round(cx, 2), round(cy, 2), round(radius, 2), round(angle, 2))


def _sample_text(rng: np.random.Generator, width: int, height: int) -> TextSpec | None:
    if rng.random() < 0.25:
        text = str(int(rng.integers(100, 10000)))
    else:
        text = WORDS[int(rng.integers(len(WORDS)))]
        case = rng.random()
        text = text.upper() if case < 0.35 else text.capitalize() if case < 0.5 else text
    size = SIZES[int(rng.choice(3, p=SIZE_PROBS))]
    lo, hi = TEXT_FRACTIONS[size]
    fs = max(MIN_FONT_PX, round(float(rng.uniform(lo, hi)) * min(width, height)))
    l, t, r, b = _font(fs).getbbox(text)
    while r - l > width - 6 and fs > MIN_FONT_PX:
        fs = max(MIN_FONT_PX, int(fs * 0.8))
        l, t, r, b = _font(fs).getbbox(text)
    if r - l > width - 6 or b - t > height - 6:
        return None
    x = float(rng.uniform(3 - l, width - 3 - r))
    y = float(rng.uniform(3 - t, height - 3 - b))
    return TextSpec(text, "black", size, round(x, 1), round(y, 1), fs)


def _sample_scene(rng: np.random.Generator, min_shapes: int, need_text: bool) -> _Scene | None:
    """One scene, or None when its constraints could not be met (the caller draws again)."""
    w, h = _sample_size(rng)
    bg = _sample_background(rng, w, h)
    canvas = _render_background(bg, w, h)
    owner = np.full((h, w), -1, np.int16)
    objects: list = []
    boxes: list[list[int]] = []
    full_area: list[int] = []
    visible: list[int] = []
    for _ in range(int(rng.integers(max(1, min_shapes), 9))):
        for _attempt in range(8):
            obj = _sample_shape(rng, w, h)
            if obj is None:
                continue
            cov = _coverage(obj, w, h)
            area = int(cov.sum())
            if area < 40:
                continue
            covered = np.bincount(owner[cov] + 1, minlength=len(objects) + 1)[1:]
            after = np.array(visible, np.int64) - covered
            if len(objects) and np.any(after < MIN_VISIBLE * np.array(full_area)):
                continue
            box = mask_box(cov)
            avoid = [o.color for o, b in zip(objects, boxes) if _boxes_touch(box, b)]
            color = _contrasting_color(rng, canvas, box, avoid)
            if color is None:
                continue
            obj = ShapeSpec(obj.shape, color, obj.size, obj.cx, obj.cy, obj.radius, obj.angle)
            _paint(canvas, obj, cov)
            owner[cov] = len(objects)
            visible = [int(v) for v in after] + [area]
            objects.append(obj)
            boxes.append(box)
            full_area.append(area)
            break
    if len(objects) < min_shapes:
        return None
    if need_text or rng.random() < TEXT_PROB:
        placed = False
        for _attempt in range(12):
            txt = _sample_text(rng, w, h)
            if txt is None:
                continue
            cov = _coverage(txt, w, h)
            if not cov.any():
                continue
            box = mask_box(cov > 0)
            x1, y1, x2, y2 = max(0, box[0] - 2), max(0, box[1] - 2), box[2] + 2, box[3] + 2
            if owner[y1:y2, x1:x2].max(initial=-1) >= 0:
                continue  # text never overlaps a shape
            color = _contrasting_color(rng, canvas, box)
            if color is None:
                continue
            txt = TextSpec(txt.text, color, txt.size, txt.x, txt.y, txt.font_size)
            _paint(canvas, txt, cov)
            owner[cov > 0] = len(objects)
            objects.append(txt)
            full_area.append(int((cov > 0).sum()))
            placed = True
            break
        if need_text and not placed:
            return None
    masks = [owner == k for k in range(len(objects))]
    return _Scene(SceneSpec(w, h, bg, tuple(objects)), canvas, masks, full_area)


# --- questions and answers ------------------------------------------------------------------------------

# (template, answer style); "{r}" is a region, styles: short ("a red triangle") or detailed (a sentence).
RECOGNITION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("What is in {r}? Answer briefly.", "short"),
    ("{r} What object is this? Answer in a few words.", "short"),
    ("Describe the region {r} briefly.", "short"),
    ("What do you see at {r}?", "short"),
    ("Name the object in {r}.", "short"),
    ("What is the object at {r}?", "short"),
    ("Describe the object in {r} in detail.", "detailed"),
    ("{r} Describe this object in detail.", "detailed"),
    ("Tell me about the object in {r} in detail.", "detailed"),
)
POINT_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "color": (
        ("What color is the object at {r}?", "short"),
        ("{r} What is the color of this object? Answer in one word.", "short"),
        ("Which color does the object at {r} have? Answer briefly.", "short"),
        ("What color is the object at {r}? Answer with a full sentence.", "detailed"),
    ),
    "shape": (
        ("What shape is at {r}?", "short"),
        ("{r} What is the shape of this object? Answer in one word.", "short"),
        ("Which shape does the object at {r} have? Answer briefly.", "short"),
        ("What shape is the object at {r}? Answer with a full sentence.", "detailed"),
    ),
}
OCR_TEMPLATES: tuple[str, ...] = (
    "What does the text in {r} say?",
    "Read the text in {r}.",
    "{r} What is written here?",
    "What word is written in {r}? Answer briefly.",
    "Read out the text at {r} exactly.",
)
RELATION_WORD_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Where is the object in {r1} relative to the object in {r2}? Answer with left, right, above or below.", "short"),
    ("{r1} {r2} Is the first object left of, right of, above or below the second? Answer in one word.", "short"),
    ("Describe the position of the object in {r1} relative to the object in {r2} in detail.", "detailed"),
)
RELATION_YESNO_TEMPLATES: tuple[str, ...] = (
    "Is the object in {r1} {rel} the object in {r2}? Answer yes or no.",
    "{r1} {r2} Is the first object {rel} the second one? Answer yes or no.",
)
SIZE_YESNO_TEMPLATES: tuple[str, ...] = (
    "Is the object in {r1} {cmp} than the object in {r2}? Answer yes or no.",
    "{r1} {r2} Is the first object {cmp} than the second one? Answer yes or no.",
)
GROUNDING_TEMPLATES: tuple[str, ...] = (
    "Where is {d}? Answer with a box.",
    "Find {d} in the image.",
    "Locate {d}.",
    "Give the bounding box of {d}.",
    "Which region contains {d}?",
    "Point out {d} with a box.",
)
CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("Describe the image briefly.", "short"),
    ("Give a short caption for this image.", "short"),
    ("What is in this image? Answer in a few words.", "short"),
    ("Describe the image in detail.", "detailed"),
    ("Describe everything you see in this image in detail.", "detailed"),
)
COUNT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("How many {things} are there in the image?", "short"),
    ("Count the {things} in the image. Answer with a number.", "short"),
    ("How many {things} can you see? Answer with a full sentence.", "detailed"),
)
RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(obj: ShapeSpec) -> str:
    """'red triangle': the colour and shape words, adjacent (what the evaluation matches)."""
    return f"{obj.color} {obj.shape}"


def short_answer(obj: ShapeSpec) -> str:
    """'a red triangle' / 'an orange star'."""
    return f"{_article(obj.color)} {_name(obj)}"


def detailed_answer(obj: ShapeSpec) -> str:
    """'It is a large red triangle.'"""
    return f"It is {_article(obj.size)} {obj.size} {_name(obj)}."


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


@dataclass
class _QA:
    question: str
    answer: str
    target: dict
    regions: list[dict] = field(default_factory=list)  # {"kind", "pixels"} in question order


def _box_region(box: Sequence[int], w: int, h: int) -> tuple[dict, str]:
    return {"kind": "box", "pixels": [int(v) for v in box]}, referring.box(*box, w, h).text()


def _interior_point(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float]:
    """Centre of a pixel of `mask`, as deep inside as 3 erosions allow (pixel coordinates)."""
    inner = mask
    for _ in range(3):
        e = inner.copy()
        e[1:] &= inner[:-1]
        e[:-1] &= inner[1:]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        if not e.any():
            break
        inner = e
    ys, xs = np.nonzero(inner)
    k = int(rng.integers(len(xs)))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def _point_region(rng: np.random.Generator, mask: np.ndarray, w: int, h: int) -> tuple[dict, str]:
    x, y = _interior_point(rng, mask)
    return {"kind": "point", "pixels": [x, y]}, referring.point(x, y, w, h).text()


def _task_recognition(rng: np.random.Generator, sc: _Scene) -> _QA | None:
    ids = sc.shape_ids()
    i = int(_pick(rng, ids))
    obj, (w, h) = sc.objects[i], (sc.spec.width, sc.spec.height)
    kind = ("box", "point", "polygon")[int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
    if kind == "box":
        region, text = _box_region(sc.box(i), w, h)
    elif kind == "point":
        region, text = _point_region(rng, sc.masks[i], w, h)
    else:
        if rng.random() < 0.5:
            pts = [round(float(v), 1) for v in _region_outline(obj).reshape(-1)]
            pts = [min(max(v, 0.0), float(w if k % 2 == 0 else h)) for k, v in enumerate(pts)]
        else:
            x1, y1, x2, y2 = sc.box(i)
            pts = [float(v) for v in (x1, y1, x2, y1, x2, y2, x1, y2)]
        region, text = {"kind": "polygon", "pixels": pts}, referring.polygon(pts, w, h).text()
    template, style = _pick(rng, RECOGNITION_TEMPLATES)
    answer = short_answer(obj) if style == "short" else detailed_answer(obj)
    return _QA(template.format(r=text), answer, {"object": i}, [region])


def _task_point_qa(rng: np.random.Generator, sc: _Scene) -> _QA | None:
    i = int(_pick(rng, sc.shape_ids()))
    obj, (w, h) = sc.objects[i], (sc.spec.width, sc.spec.height)
    attribute = "color" if rng.random() < 0.5 else "shape"
    region, text = _point_region(rng, sc.masks[i], w, h)
    template, style = _pick(rng, POINT_TEMPLATES[attribute])
    value = obj.color if attribute == "color" else obj.shape
    if style == "short":
        answer = value
    elif attribute == "color":
        answer = f"The object at this point is {value}."
    else:
        answer = f"It is {_article(value)} {value}."
    return _QA(template.format(r=text), answer, {"object": i, "attribute": attribute, "answer": value}, [region])


def _task_ocr(rng: np.random.Generator, sc: _Scene) -> _QA | None:
    ids = sc.text_ids()
    if not ids:
        return None
    i = ids[0]
    region, text = _box_region(sc.box(i), sc.spec.width, sc.spec.height)
    obj = sc.objects[i]
    return _QA(_pick(rng, OCR_TEMPLATES).format(r=text), obj.text, {"object": i, "answer": obj.text}, [region])


def _position(a: Sequence[int], b: Sequence[int]) -> str | None:
    """Where box a is relative to box b, when unambiguous (disjoint along the dominant axis)."""
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    if abs(dx) > abs(dy):
        if a[2] <= b[0]:
            return "left"
        if b[2] <= a[0]:
            return "right"
    elif abs(dy) > abs(dx):
        if a[3] <= b[1]:
            return "above"
        if b[3] <= a[1]:
            return "below"
    return None


def _size_relation(sc: _Scene, i: int, j: int) -> str | None:
    """'larger' / 'smaller' when object i is clearly (1.8x full area, 1.5x visible area) bigger or smaller."""
    fi, fj = sc.full_area[i], sc.full_area[j]
    vi, vj = sc.visible(i), sc.visible(j)
    if fi >= 1.8 * fj and vi >= 1.5 * vj:
        return "larger"
    if fj >= 1.8 * fi and vj >= 1.5 * vi:
        return "smaller"
    return None


def _task_relation(rng: np.random.Generator, sc: _Scene) -> _QA | None:
    ids = sc.shape_ids()
    pairs = [(i, j) for i in ids for j in ids if i != j]
    if not pairs:
        return None
    kind = ("word", "yesno", "size")[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
    if kind == "size":
        ok = [(i, j, _size_relation(sc, i, j)) for i, j in pairs]
    else:
        ok = [(i, j, _position(sc.box(i), sc.box(j))) for i, j in pairs]
    ok = [t for t in ok if t[2] is not None]
    if not ok:
        return None
    i, j, rel = _pick(rng, ok)
    w, h = sc.spec.width, sc.spec.height
    reg1, t1 = _box_region(sc.box(i), w, h)
    reg2, t2 = _box_region(sc.box(j), w, h)
    a, b = sc.objects[i], sc.objects[j]
    target = {"objects": [i, j], "relation": rel}
    if kind == "word":
        template, style = _pick(rng, RELATION_WORD_TEMPLATES)
        answer = rel if style == "short" else f"The {_name(a)} is {RELATION_PHRASES[rel]} the {_name(b)}."
        question = template.format(r1=t1, r2=t2)
        target["answer"] = rel
    elif kind == "yesno":
        asked = rel if rng.random() < 0.5 else _OPPOSITE[rel]
        answer = "yes" if asked == rel else "no"
        question = _pick(rng, RELATION_YESNO_TEMPLATES).format(r1=t1, r2=t2, rel=RELATION_PHRASES[asked])
        target["answer"] = answer
    else:
        asked = rel if rng.random() < 0.5 else ("smaller" if rel == "larger" else "larger")
        answer = "yes" if asked == rel else "no"
        question = _pick(rng, SIZE_YESNO_TEMPLATES).format(r1=t1, r2=t2, cmp=asked)
        target["answer"] = answer
    return _QA(question, answer, target, [reg1, reg2])


def unique_descriptions(objects: Sequence, i: int) -> list[str]:
    """Descriptions ('the red triangle', 'the star', 'the blue shape', 'the large red circle') that pick
    out shape i and no other shape of the scene."""
    shapes = [o for o in objects if o.shape != TEXT_SHAPE]
    me = objects[i]

    def count(pred: Callable) -> int:
        return sum(1 for o in shapes if pred(o))

    out = []
    cs = count(lambda o: o.color == me.color and o.shape == me.shape)
    if cs == 1:
        out.append(f"the {_name(me)}")
    if count(lambda o: o.shape == me.shape) == 1:
        out.append(f"the {me.shape}")
    if count(lambda o: o.color == me.color) == 1:
        out.append(f"the {me.color} shape")
    if cs > 1 and count(lambda o: o.color == me.color and o.shape == me.shape and o.size == me.size) == 1:
        out.append(f"the {me.size} {_name(me)}")
    return out


def _task_grounding(rng: np.random.Generator, sc: _Scene) -> _QA | None:
    options = [(i, d) for i in sc.shape_ids() for d in unique_descriptions(sc.objects, i)]
    if not options:
        return None
    i, desc = _pick(rng, options)
    answer = referring.box(*sc.box(i), sc.spec.width, sc.spec.height).text()
    question = _pick(rng, GROUNDING_TEMPLATES).format(d=desc)
    return _QA(question, answer, {"object": i, "description": desc}, [])


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _task_caption(rng: np.random.Generator, sc: _Scene) -> _QA | None:
    ids = sorted(sc.shape_ids(), key=lambda k: (sum(sc.box(k)[0::2]), sum(sc.box(k)[1::2])))  # left to right
    objs = [sc.objects[k] for k in ids]
    texts = [sc.objects[k] for k in sc.text_ids()]
    bg = BACKGROUND_WORDS[sc.spec.background["kind"]]
    template, style = _pick(rng, CAPTION_TEMPLATES)
    if style == "short":
        items = [short_answer(o) for o in objs] + [f'the word "{t.text}"' for t in texts]
        answer = f"{_join(items)} on {_article(bg)} {bg} background"
    else:
        n = len(objs)
        items = [f"{_article(o.size)} {o.size} {_name(o)}" for o in objs]
        answer = f"The image shows {n} shape{'s' if n != 1 else ''} on {_article(bg)} {bg} background: {_join(items)}."
        answer += "".join(f' The word "{t.text}" is written in {t.color}.' for t in texts)
    return _QA(template, answer, {"answer": answer}, [])


def _task_counting(rng: np.random.Generator, sc: _Scene) -> _QA | None:
    objs = [sc.objects[k] for k in sc.shape_ids()]
    kind = ("all", "color", "shape")[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
    if kind == "all":
        n, singular, plural = len(objs), "shape", "shapes"
    elif kind == "color":
        color = _pick(rng, [o.color for o in objs]) if rng.random() < 0.8 else _pick(rng, list(COLORS))
        n, singular, plural = sum(o.color == color for o in objs), f"{color} shape", f"{color} shapes"
    else:
        shape = _pick(rng, [o.shape for o in objs]) if rng.random() < 0.8 else _pick(rng, SHAPES)
        n, singular, plural = sum(o.shape == shape for o in objs), shape, _PLURALS[shape]
    template, style = _pick(rng, COUNT_TEMPLATES)
    if style == "short":
        answer = str(n)
    else:
        answer = f"There is 1 {singular} in the image." if n == 1 else f"There are {n} {plural} in the image."
    return _QA(template.format(things=plural), answer, {"answer": n}, [])


_TASK_FUNCS: dict[str, Callable[[np.random.Generator, _Scene], _QA | None]] = {
    "region_recognition": _task_recognition,
    "point_qa": _task_point_qa,
    "region_ocr": _task_ocr,
    "region_relation": _task_relation,
    "grounding": _task_grounding,
    "image_caption": _task_caption,
    "counting": _task_counting,
}


# --- samples --------------------------------------------------------------------------------------------


def task_schedule(split: str, n: int) -> list[str]:
    """Tasks of samples 0..n-1 of a split: smooth weighted round-robin over the split's mix.

    Seed-independent and prefix-stable (sample i's task does not depend on n), and every prefix holds each
    task within about one sample of its exact share."""
    mix = TRAIN_MIX if _split_id(split) == 0 else TEST_MIX
    total = sum(mix.values())
    current = dict.fromkeys(mix, 0)
    out = []
    for _ in range(n):
        for t, wgt in mix.items():
            current[t] += wgt
        best = max(mix, key=lambda t: current[t])  # ties: first in mix order
        current[best] -= total
        out.append(best)
    return out


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return SPLITS[split]


@dataclass
class Sample:
    """One generated sample: its JSONL record, scene spec, image and per-object visible masks."""

    record: dict
    spec: SceneSpec
    image: Image.Image
    masks: list[np.ndarray]


def sample_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def make_sample(seed: int, split: str, index: int, task: str | None = None) -> Sample:
    """Sample `index` of `split` for `seed` (task from `task_schedule` unless given). Deterministic."""
    if task is None:
        task = task_schedule(split, index + 1)[index]
    if task not in _TASK_FUNCS:
        raise InputError(f"unknown task {task!r}")
    rng = np.random.default_rng([seed, _split_id(split), index])
    min_shapes = 2 if task == "region_relation" else 1
    for _ in range(200):
        scene = _sample_scene(rng, min_shapes=min_shapes, need_text=task == "region_ocr")
        if scene is None:
            continue
        qa = _TASK_FUNCS[task](rng, scene)
        if qa is not None:
            break
    else:  # pragma: no cover - constraints are loose enough that this never happens in practice
        raise RuntimeError(f"could not generate {task} sample {split}/{index}")
    sid = sample_id(split, index)
    w, h = scene.spec.width, scene.spec.height
    objects = []
    for k, o in enumerate(scene.objects):
        entry = {"box": scene.box(k), "shape": o.shape, "color": o.color, "size": o.size}
        if isinstance(o, TextSpec):
            entry["text"] = o.text
        objects.append(entry)
    record: dict = {
        "id": sid,
        "image": f"images/{sid}.png",
        "width": w,
        "height": h,
        "objects": objects,
        "conversations": [
            {"from": "human", "value": referring.IMAGE_TOKEN + "\n" + qa.question},
            {"from": "gpt", "value": qa.answer},
        ],
        "task": task,
        "target": qa.target,
    }
    if qa.regions:
        record["region"] = qa.regions[0]
        record["regions"] = qa.regions
    turns = _extra_turns(np.random.default_rng([seed, _split_id(split), index, 1]), scene,
                         EXTRA_TURNS[split] if split in EXTRA_TURNS else 0)
    if turns:
        for t, qa_t in turns:
            record["conversations"] += [{"from": "human", "value": qa_t.question}, {"from": "gpt", "value": qa_t.answer}]
        record["turns"] = [{"task": t, "target": qa_t.target, **({"regions": qa_t.regions} if qa_t.regions else {})}
                           for t, qa_t in turns]
    return Sample(record, scene.spec, Image.fromarray(scene.canvas), scene.masks)


def _extra_turns(rng: np.random.Generator, scene: _Scene, n: int) -> list[tuple[str, _QA]]:
    """`n` more questions about `scene`, tasks drawn from EXTRA_MIX (a task the scene cannot serve, e.g. OCR
    without a word, is redrawn). Questions repeat neither a question already asked nor an exact answer
    to the same question."""
    tasks = [t for t, w in EXTRA_MIX.items() if w > 0]
    p = np.array([EXTRA_MIX[t] for t in tasks], dtype=np.float64)
    p /= p.sum()
    out: list[tuple[str, _QA]] = []
    seen: set[str] = set()
    for _ in range(20 * n):
        if len(out) == n:
            break
        task = tasks[int(rng.choice(len(tasks), p=p))]
        qa = _TASK_FUNCS[task](rng, scene)
        if qa is None or qa.question in seen:
            continue
        seen.add(qa.question)
        out.append((task, qa))
    return out


# --- dataset generation ---------------------------------------------------------------------------------


def build_meta(seed: int, n_train: int, n_test: int) -> dict:
    """The meta.json content for these parameters (also used to decide whether a folder is up to date)."""
    return {
        "format": FORMAT,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "counts": {"train": n_train, "test": n_test},
        "colors": {k: list(v) for k, v in COLORS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "tasks": list(TASKS),
        "task_mix": {"train": TRAIN_MIX, "test": TEST_MIX},
        "extra_turns": EXTRA_TURNS,
        "extra_mix": EXTRA_MIX,
        "task_counts": {
            split: {t: c for t in TASKS if (c := task_schedule(split, n).count(t))}
            for split, n in (("train", n_train), ("test", n_test))
        },
        "backgrounds": list(BACKGROUND_KINDS),
        "photos": list(PHOTOS),
        "words": list(WORDS),
    }


def _generate_chunk(out_dir: str, seed: int, split: str, start: int, tasks: list[str]) -> list[str]:
    """Write the PNGs of samples start..start+len(tasks)-1 and return their JSONL lines (worker entry)."""
    lines = []
    for k, task in enumerate(tasks):
        s = make_sample(seed, split, start + k, task)
        s.image.save(Path(out_dir) / s.record["image"], format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        lines.append(json.dumps(s.record))
    return lines


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _check_existing(out_dir: Path, meta: dict) -> bool:
    """True when out_dir already holds this dataset; InputError when it holds something else."""
    if not out_dir.exists():
        return False
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return False
    if _read_meta(out_dir) == meta:
        return True
    raise InputError(f"{out_dir} already exists and is not this SpotWorld dataset (other seed, counts or "
                     f"generator version); choose another --out or remove it")


def generate(out_dir: Path, seed: int, n_train: int, n_test: int, workers: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Write SpotWorld to `out_dir` (images/*.png, train.jsonl, test.jsonl, meta.json) and return the meta.

    Atomic: everything is written to a sibling temporary folder that is renamed into place at the end, so
    `out_dir` is either absent or complete. If `out_dir` already holds the same dataset (identical meta) it
    is returned untouched; if it holds anything else, InputError. `workers` processes (default: CPU count)
    share the work; the bytes written do not depend on it. `progress(done, total)` is called in the main
    process as samples complete."""
    out_dir = Path(out_dir)
    for name, v in (("seed", seed), ("n_train", n_train), ("n_test", n_test)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InputError(f"{name} must be a non-negative integer, got {v!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    workers = workers or os.cpu_count() or 1
    meta = build_meta(seed, n_train, n_test)
    if _check_existing(out_dir, meta):
        return meta

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        total = n_train + n_test
        chunk = max(1, min(50, math.ceil(total / (workers * 4)) if total else 1))
        jobs = []  # (split, start, tasks)
        for split, n in (("train", n_train), ("test", n_test)):
            schedule = task_schedule(split, n)
            jobs += [(split, s, schedule[s:s + chunk]) for s in range(0, n, chunk)]
        results: dict[tuple[str, int], list[str]] = {}
        done = 0
        if workers == 1 or len(jobs) <= 1:
            for split, start, tasks in jobs:
                results[(split, start)] = _generate_chunk(str(tmp), seed, split, start, tasks)
                done += len(tasks)
                if progress:
                    progress(done, total)
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_generate_chunk, str(tmp), seed, split, start, tasks): (split, start, len(tasks))
                           for split, start, tasks in jobs}
                for fut in as_completed(futures):
                    split, start, n_done = futures[fut]
                    results[(split, start)] = fut.result()
                    done += n_done
                    if progress:
                        progress(done, total)
        for split in ("train", "test"):
            lines = [line for (sp, start), ls in sorted(results.items()) if sp == split for line in ls]
            (tmp / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if _read_meta(out_dir) == meta:  # a concurrent run finished the same dataset first
                shutil.rmtree(tmp, ignore_errors=True)
                return meta
            raise InputError(f"cannot move the generated dataset into {out_dir}: it exists and is not empty") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
