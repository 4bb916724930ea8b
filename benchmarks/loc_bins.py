"""What chatspot-loc-v1's N bins cost in box precision, on a dataset's own boxes (no model involved):

    python -m chatspot_edge.benchmarks.loc_bins DATA [--split test] [--bins 16,24,32,64,100,1000] [--out FILE.json]

For each N: every object box of the split (and the grounding targets and OCR regions alone) written with
`chatspot-loc-v1` and read back (bin centres, same-bin boxes widened), its IoU with the exact box; and the
share of object boxes still at IoU >= 0.5 when each coordinate is first moved by +-d of the image side
(random sign, seeded): what the grid leaves to a model that is d off. docs/referring.md has the table for
SpotWorld seed 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from chatspot_edge.referring import LOC_FORMAT, ReferringFormat, box, iou


def _quantized_iou(b: tuple[float, ...], fmt: ReferringFormat) -> float:
    (back,) = fmt.parse(fmt.write(box(*b, 1, 1)))
    return iou(back.coords, b)


def measure(records: list[dict], bins: list[int], offsets: tuple[float, ...] = (0.01, 0.02), seed: int = 0) -> dict:
    groups: dict[str, list[tuple[float, ...]]] = {"objects": [], "grounding_targets": [], "ocr_regions": []}
    for r in records:
        w, h = r["width"], r["height"]
        norm = lambda p: (p[0] / w, p[1] / h, p[2] / w, p[3] / h)  # noqa: E731
        objs = r.get("objects") or []
        groups["objects"] += [norm(o["box"]) for o in objs]
        if r.get("task") == "grounding":
            groups["grounding_targets"].append(norm(objs[r["target"]["object"]]["box"]))
        if r.get("task") == "region_ocr" and (r.get("region") or {}).get("kind") == "box":
            groups["ocr_regions"].append(norm(r["region"]["pixels"]))
    out: dict = {"counts": {k: len(v) for k, v in groups.items()}, "bins": {}}
    for n in bins:
        fmt = ReferringFormat(LOC_FORMAT, n)
        row: dict = {}
        for name, boxes in groups.items():
            ious = np.array([_quantized_iou(b, fmt) for b in boxes]) if boxes else np.zeros(0)
            row[name] = {"iou_ge_0.5": float(np.mean(ious >= 0.5)) if len(ious) else None,
                         "mean_iou": float(ious.mean()) if len(ious) else None,
                         "min_iou": float(ious.min()) if len(ious) else None}
        rng = np.random.default_rng(seed)
        for d in offsets:
            ok = []
            for b in groups["objects"]:
                moved = np.clip(np.asarray(b) + rng.choice([-d, d], 4), 0.0, 1.0)
                if moved[2] <= moved[0] or moved[3] <= moved[1]:
                    ok.append(False)
                    continue
                (back,) = fmt.parse(fmt.write(box(*moved, 1, 1)))
                ok.append(iou(back.coords, b) >= 0.5)
            row[f"objects_off_{d:g}_iou_ge_0.5"] = float(np.mean(ok)) if ok else None
        out["bins"][n] = row
    return out


def main(argv: list[str] | None = None) -> int:
    from chatspot_edge.data import load_split
    from chatspot_edge.errors import InputError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--bins", default="16,24,32,64,100,1000")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        res = measure(load_split(args.data, args.split), [int(b) for b in args.bins.split(",")])
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"{args.data} {args.split}: {res['counts']}")
    for n, row in res["bins"].items():
        print(f"N={n:>4}: grounding targets {pct(row['grounding_targets']['iou_ge_0.5'])} "
              f"(mean {row['grounding_targets']['mean_iou'] or 0:.3f}), objects {pct(row['objects']['iou_ge_0.5'])} "
              f"(min {row['objects']['min_iou'] or 0:.3f}), OCR mean {row['ocr_regions']['mean_iou'] or 0:.3f}, "
              f"off 0.01: {pct(row['objects_off_0.01_iou_ge_0.5'])}, "
              f"off 0.02: {pct(row['objects_off_0.02_iou_ge_0.5'])}")
    if args.out:
        from chatspot_edge.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
