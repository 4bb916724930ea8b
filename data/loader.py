"""Reading LLaVA-style JSONL datasets (SpotWorld, or e.g. RefCOCO converted to the same keys).

A split is `<data_dir>/<split>.jsonl`, one JSON object per line (blank lines are skipped). Required keys:
`id` (string), `image` (path relative to `data_dir`, or absolute) and `conversations` (a non-empty list
of `{"from": ..., "value": str}`). `width` / `height` (pixels of the original image) are optional and
read from the image header when missing. Other keys (`objects`, `task`, `target`, `region`, ...) are kept
as they are. Any problem is an `InputError` naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from chatspot_edge.errors import InputError
from chatspot_edge.model import preprocess

REQUIRED_KEYS = ("id", "image", "conversations")


def _image_path(data_dir: Path, record: dict) -> Path:
    p = Path(record["image"])
    return p if p.is_absolute() else data_dir / p


def _image_size(path: Path, where: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise InputError(f"{where}: image {path} not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{where}: cannot read image {path} ({e})") from None


def _validate(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise InputError(f"{where}: missing required key(s) {', '.join(missing)}")
    if not isinstance(record["id"], str) or not isinstance(record["image"], str) or not record["image"]:
        raise InputError(f"{where}: 'id' and 'image' must be strings")
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv:
        raise InputError(f"{where}: 'conversations' must be a non-empty list")
    for turn in conv:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise InputError(f"{where}: each conversation turn needs string 'from' and 'value'")
    for key in ("width", "height"):
        v = record.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise InputError(f"{where}: '{key}' must be a positive integer, got {v!r}")
    return record


def load_split(data_dir: Path | str, split: str) -> list[dict]:
    """All records of `<data_dir>/<split>.jsonl`, validated, with `width`/`height` (pixels) filled in."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (expected {split}.jsonl in {data_dir})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg})") from None
        record = _validate(record, where)
        if record.get("width") is None or record.get("height") is None:
            record["width"], record["height"] = _image_size(_image_path(data_dir, record), where)
        records.append(record)
    return records


def load_image(data_dir: Path | str, record: dict) -> Image.Image:
    """The record's image as an RGB PIL image (fully loaded). InputError if it is missing, unreadable, or
    its size disagrees with the record's `width`/`height` (region pixels would not match)."""
    path = _image_path(Path(data_dir), record)
    where = f"record {record.get('id', '?')}"
    try:
        img = preprocess.load_image(path)  # the one loader that training, export checks and the runtime share
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    w, h = record.get("width"), record.get("height")
    if w is not None and h is not None and img.size != (w, h):
        raise InputError(f"{where}: image {path} is {img.size[0]}x{img.size[1]}, record says {w}x{h}")
    return img
