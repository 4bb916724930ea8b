"""Export measurements on a real preset: export time, bundle sizes, llama.cpp / onnxruntime parity with torch.

    python -m chatspot_edge.export.parity --preset smol --work /tmp/parity [--out report.json]

Writes the checkpoint of `build_preset(preset)` (pretrained), exports an F16 bundle (the default) and an F32
bundle, then compares on the F32 one: logits of llama.cpp (F32 KV cache, no flash attention) vs torch for a
text-only prompt and for an image + region prompt (embeddings injected), ONNX vision / region graphs vs torch,
and the greedy answer of the whole chain vs torch `generate`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def run(preset: str, work: Path, threads: int = 2, max_new_tokens: int = 8) -> dict:
    from chatspot_edge.export import export_bundle, verify_bundle
    from chatspot_edge.export.llama_check import LlamaCheck, split_segments
    from chatspot_edge.export.onnx_vision import onnx_session
    from chatspot_edge.model.checkpoint import save_checkpoint
    from chatspot_edge.model.preprocess import region_crops
    from chatspot_edge.model.presets import build_preset
    from chatspot_edge.model.processor import Processor

    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"preset": preset, "threads": threads}
    model, tok = build_preset(preset)
    ckpt = save_checkpoint(model, tok, work / f"{preset}-ckpt")
    report["checkpoint_bytes"] = (ckpt / "model.safetensors").stat().st_size

    bundles = {}
    for dtype in ("f16", "f32"):
        t = time.perf_counter()
        b = export_bundle(ckpt, work / f"{preset}-bundle-{dtype}", llm_dtype=dtype)
        report[f"export_s_{dtype}"] = round(time.perf_counter() - t, 2)
        m = verify_bundle(b)
        report[f"bytes_{dtype}"] = {name: e["bytes"] for name, e in m["files"].items()}
        bundles[dtype] = (b, m)

    b, m = bundles["f32"]
    cfg = model.config
    proc = Processor(tok, cfg)
    rng = np.random.default_rng(0)
    h, w = cfg.vision.image_size
    images = [rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8) for _ in range(3)]

    vision = onnx_session(b / "vision.onnx", threads)
    reads_crops = cfg.region_token and cfg.region_crop == "original"

    def region_feed(ref, boxes, img) -> tuple[dict, torch.Tensor]:
        """(the region graph's feed, the torch region encoder's appearance source) for one image: the crops
        of `boxes` (the random image stands in for the original) or the resized image itself."""
        if reads_crops:
            crops = region_crops(img[0], boxes, cfg.region_crop_size)
            return {"image_embeds": ref, "boxes": boxes, "crops": crops}, torch.from_numpy(crops)
        return {"image_embeds": ref, "boxes": boxes, "image": img}, torch.from_numpy(img)

    region = onnx_session(b / "region.onnx", threads) if cfg.region_token else None
    errs, rerrs, t_onnx, t_torch = [], [], [], []
    for img in images:
        t = time.perf_counter()
        emb = vision.run(["image_embeds"], {"image": img})[0]
        t_onnx.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            ref = model.encode_image(torch.from_numpy(img)).numpy()
        t_torch.append(time.perf_counter() - t)
        errs.append(_rel(emb, ref))
        if region is not None:
            boxes = np.array([[0.1, 0.2, 0.45, 0.61], [0.4, 0.5, 0.4, 0.5], [0, 0, 1, 1]], np.float32)
            feed, source = region_feed(ref, boxes, img)
            got = region.run(["region_embeds"], feed)[0]
            with torch.no_grad():
                rref = model.region(torch.from_numpy(ref), torch.from_numpy(boxes), source).numpy()
            rerrs.append(_rel(got, rref))
    report["onnx_vision_max_rel_err"] = max(errs)
    report["onnx_region_max_rel_err"] = max(rerrs) if rerrs else None
    report["vision_ms_onnx_median"] = round(1000 * float(np.median(t_onnx)), 1)
    report["vision_ms_torch_median"] = round(1000 * float(np.median(t_torch)), 1)

    text = proc.prompt.render("Count the shapes and tell me the color of the largest one. 12,345 héllo")
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    enc = proc.encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    img = images[0]
    boxes_t = torch.tensor(enc.boxes, dtype=torch.float32)
    bb = torch.zeros(len(enc.boxes), dtype=torch.long)
    crops = torch.from_numpy(region_crops(img[0], enc.boxes, cfg.region_crop_size)) if reads_crops else None
    with torch.no_grad():
        ref_text = model.llm(torch.tensor([text_ids])).logits[0].numpy()
        img_emb = model.encode_image(torch.from_numpy(img))
        reg = model.encode_regions(img_emb, boxes_t, bb, torch.from_numpy(img), crops).numpy() if cfg.region_token else None
        ref_mm = model(torch.tensor([enc.ids]), pixels=torch.from_numpy(img), boxes=boxes_t, box_batch=bb,
                       crops=crops).logits[0].numpy()
        ref_gen = model.generate([enc.ids], torch.from_numpy(img), [enc.boxes], max_new_tokens=max_new_tokens,
                                 crops=crops)[0]
    replace = {cfg.image_token_id: img_emb[0].numpy()}
    if reg is not None:
        replace[cfg.region_token_id] = reg
    segs = split_segments(enc.ids, replace)
    first_image = enc.ids.index(cfg.image_token_id)
    for dtype in ("f32", "f16"):
        bd, md = bundles[dtype]
        with LlamaCheck(bd / md["llm"]["file"], n_ctx=512, n_threads=threads) as lc:
            got_text = lc.feed([text_ids], logits="all")
            lc.reset()
            got_mm = lc.feed(segs, logits="all")
            t = time.perf_counter()
            gen = lc.greedy(segs, max_new_tokens)
            dt = time.perf_counter() - t
        report[f"llama_{dtype}"] = {
            "text_tokens": len(text_ids),
            "text_max_abs_logit_diff": float(np.abs(got_text - ref_text).max()),
            "multimodal_tokens": len(enc.ids),
            "multimodal_max_abs_logit_diff": float(np.abs(got_mm - ref_mm).max()),
            "after_image_max_abs_logit_diff": float(np.abs(got_mm - ref_mm)[first_image:].max()),
            "max_abs_logit": float(np.abs(ref_mm).max()),
            "argmax_agreement": float(np.mean(got_mm.argmax(-1) == ref_mm.argmax(-1))),
            "greedy_equal_torch": gen == ref_gen,
            "greedy_s": round(dt, 3),
        }
    report["greedy_torch"] = tok.decode(ref_gen)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smol")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles in --work")
    a = ap.parse_args()
    rep = run(a.preset, a.work, a.threads)
    text = json.dumps(rep, indent=2, ensure_ascii=False)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
