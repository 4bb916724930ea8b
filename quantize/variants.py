"""Add quantized variants to a bundle (SPEC section 3: `llm_variants`, `vision_variants`).

Atomic: the new bundle is assembled in a temporary sibling folder (`chatspot_edge.files.atomic_dir`): every
existing file is hard-linked there (copied where links are not possible), the new files are written next
to them, the manifest is rewritten with fresh checksums, the result is verified, and only then does it
replace the bundle. A failure or an interrupt at any point leaves the bundle exactly as it was. Existing
files are never written through (a rebuilt variant's link is removed first), so the links cannot leak a
change into the old bundle.

Idempotent: a variant already in the manifest is skipped unless `force`; when nothing is left to do the
bundle is not touched at all.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from chatspot_edge.errors import InputError
from chatspot_edge.export.manifest import MANIFEST, region_graph, tool_versions, verify_bundle, write_manifest
from chatspot_edge.files import atomic_dir

from chatspot_edge.quantize.llm import (SOURCE_ORDER, default_threads, gguf_summary, llm_file_name, llm_recipe,
                                        quantize_gguf)
from chatspot_edge.quantize.vision import (COREML_NOTE, COREML_VARIANTS, build_int8, compare, coreml_variant,
                                           parse_precision, region_to_int8, spotworld_images, to_fp16,
                                           vision_file_name)

Log = Callable[[str], None]
REGION_INT8_FILE = "region-int8.onnx"  # the int8 vision variant's own region graph


def _split(names: Sequence[str] | str | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for n in str(item).split(","):
            if n.strip() and n.strip() not in out:
                out.append(n.strip())
    return out


def source_llm(manifest: dict) -> dict:
    """The highest-precision GGUF entry of the bundle (F32, then F16, then BF16)."""
    entries = [manifest["llm"], *(manifest.get("llm_variants") or {}).values()]
    for q in SOURCE_ORDER:
        for e in entries:
            if str(e.get("quant", "")).upper() == q:
                return e
    raise InputError(f"the bundle has no full-precision GGUF ({'/'.join(SOURCE_ORDER)}) to quantize from "
                     f"(default LLM is {manifest['llm'].get('quant')})")


def _link_tree(src: Path, dst: Path, manifest: dict) -> None:
    """Hard-link (or copy) every listed file of bundle `src` and its manifest into `dst`."""
    for name in [*manifest["files"], MANIFEST]:
        a, b = src / name, dst / name
        b.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)


def _fresh(path: Path) -> Path:
    """Make room for a rebuilt file or folder (never write through a link shared with the old bundle)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def _fallback_lines(quant: str, fb: dict[str, dict]) -> list[str]:
    if not fb:
        return [f"  {quant}: every matrix got the requested type"]
    groups = Counter((v["type"], v["reason"]) for v in fb.values())
    lines = [f"  {quant}: {len(fb)} matrices stored with another type than {next(iter(fb.values()))['requested']}:"]
    for (typ, reason), n in groups.most_common():
        names = [k for k, v in fb.items() if (v["type"], v["reason"]) == (typ, reason)]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        lines.append(f"    {n} -> {typ} ({reason}): {shown}")
    return lines


def _check_gguf_loads(path: Path) -> None:
    from chatspot_edge.runtime.llama import LlamaModel

    m = LlamaModel(path, n_ctx=64, threads=1, n_seq_max=1, quantized=True)
    m.close()


def quantize_bundle(bundle: str | Path, llm: Sequence[str] | str | None = None,
                    vision: Sequence[str] | str | None = None, coreml: bool = False, force: bool = False,
                    threads: int | None = None, int8_method: str = "auto", data: str | Path | None = None,
                    calib: int = 32, n_eval_images: int = 16, timing_runs: int = 20, imatrix: bool = False,
                    imatrix_records: int | None = None, imatrix_source: str = "text",
                    checkpoint: str | Path | None = None, log: Log = print) -> dict:
    """Add LLM variants (`llm`: e.g. "q8_0,q4_k_m"), ONNX vision variants (`vision`: "fp16,int8") and, with
    `coreml`, Core ML compressed vision packages to `bundle`. With `imatrix`, the LLM variants are quantized
    with an importance matrix computed on `imatrix_records` SpotWorld train conversations (`quantize.imatrix`)
    and named "<TYPE>-imatrix" (the plain variants stay): `imatrix_source` "text" runs llama-imatrix on their
    text, "multimodal" the torch `checkpoint`'s forward pass (default: the manifest's) with their images and
    regions. An LLM type may carry per-tensor overrides ("q4_k_m:ffn_down=q6_k", `llm.llm_recipe`). Returns a summary:
    {"added": [...], "skipped": [...], "fallbacks": {quant: {...}}, "vision": {precision: {...}}}."""
    from chatspot_edge.quantize.imatrix import DEFAULT_RECORDS, IMATRIX_SOURCES, IMATRIX_SUFFIX

    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    llm_types = [llm_recipe(n) for n in _split(llm)]
    suffix = IMATRIX_SUFFIX if imatrix else ""
    if imatrix and not llm_types:
        raise InputError("--imatrix quantizes LLM variants: give --llm TYPES too")
    if imatrix_source not in IMATRIX_SOURCES:
        raise InputError(f"--imatrix-source {imatrix_source!r}: choose {' or '.join(IMATRIX_SOURCES)}")
    if imatrix and imatrix_source == "multimodal":
        checkpoint = checkpoint or (manifest["model"].get("provenance") or {}).get("checkpoint")
        if not checkpoint or not Path(checkpoint).is_dir():
            raise InputError(f"--imatrix-source multimodal needs the torch checkpoint ({checkpoint or 'none recorded'}"
                             " in the manifest): give --checkpoint")
    precisions = [parse_precision(n) for n in _split(vision)]
    if not (llm_types or precisions or coreml):
        raise InputError("nothing to quantize: give --llm and/or --vision (or --coreml)")
    if calib < 1:
        raise InputError("--calib must be at least 1")
    threads = int(threads or default_threads())
    have_llm = manifest.get("llm_variants") or {}
    have_vis = manifest.get("vision_variants") or {}
    have_cml = manifest.get("coreml_variants") or {}
    todo_llm = [t for t in llm_types if force or t.name + suffix not in have_llm]
    todo_vis = [p for p in precisions if force or p not in have_vis]
    todo_cml = [k for k in COREML_VARIANTS if coreml and (force or k not in have_cml)]
    skipped = ([t.name + suffix for t in llm_types if t not in todo_llm] + [p for p in precisions if p not in todo_vis]
               + [f"coreml-{k}" for k in COREML_VARIANTS if coreml and k not in todo_cml])
    for s in skipped:
        log(f"skip {s}: already in the bundle (--force rebuilds it)")
    summary: dict[str, Any] = {"added": [], "skipped": skipped, "fallbacks": {}, "vision": {}}
    if not (todo_llm or todo_vis or todo_cml):
        log(f"{bundle}: nothing to do")
        return summary
    coreml_src = None
    if todo_cml:
        c = manifest["vision"].get("coreml")
        coreml_src = c.get("file") if isinstance(c, dict) else None
        if not coreml_src:
            raise InputError(f"{bundle}: no Core ML vision package to compress (export with --coreml first)")
    source = source_llm(manifest) if todo_llm else None

    manifest = dict(manifest)
    work = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.quantize-", dir=bundle.parent))
    try:
        with atomic_dir(bundle) as tmp:
            _link_tree(bundle, tmp, manifest)
            if todo_llm:
                variants = dict(have_llm)
                imat_info = None
                if imatrix:
                    from chatspot_edge.quantize.imatrix import collect_imatrix, compute_imatrix

                    imat_file = work / "imatrix.gguf"
                    calib_data = Path(data) if data is not None else None
                    if imatrix_source == "multimodal":
                        imat_info = collect_imatrix(Path(checkpoint), imat_file, manifest, calib_data,
                                                    imatrix_records or DEFAULT_RECORDS, threads, log=log)
                    else:
                        imat_info = compute_imatrix(tmp / source["file"], imat_file, manifest, calib_data,
                                                    imatrix_records or DEFAULT_RECORDS, threads, log=log)
                for t in todo_llm:
                    name = llm_file_name(t.name + suffix)
                    log(f"LLM {t.name + suffix}: {source['file']} -> {name}")
                    part = work / name
                    if imatrix:
                        from chatspot_edge.quantize.imatrix import quantize_with_imatrix

                        quantize_with_imatrix(tmp / source["file"], part, t.type.name, imat_file, threads,
                                              t.overrides)
                    else:
                        quantize_gguf(tmp / source["file"], part, t.type.name, threads, t.overrides)
                    _check_gguf_loads(part)
                    shutil.move(str(part), str(_fresh(tmp / name)))
                    s = gguf_summary(tmp / name, t.type.name, t.overrides)
                    variants[t.name + suffix] = {
                        "file": name, "quant": t.name + suffix, "n_embd": int(source["n_embd"]),
                        "n_ctx": int(source["n_ctx"]),
                        "bytes": s["bytes"], "bits_per_weight": s["bits_per_weight"], "source": source["file"],
                        "tensor_types": s["tensor_types"],
                        "fallback_tensors": {k: v["type"] for k, v in s["fallbacks"].items()},
                        **({"type": t.type.name} if imatrix or t.overrides else {}),
                        **({"overrides": dict(t.overrides)} if t.overrides else {}),
                        **({"imatrix": imat_info} if imatrix else {}),
                    }
                    summary["fallbacks"][t.name + suffix] = s["fallbacks"]
                    summary["added"].append(t.name + suffix)
                    for line in [f"  {s['bytes'] / 1e6:.1f} MB, {s['bits_per_weight']:.2f} bits per weight",
                                 *_fallback_lines(t.type.name, s["fallbacks"])]:
                        log(line)
                manifest["llm_variants"] = variants
            if todo_vis:
                manifest["vision_variants"] = _vision_variants(manifest, tmp, work, todo_vis, dict(have_vis), threads,
                                                               int8_method, data, calib, n_eval_images, timing_runs,
                                                               summary, log)
            if todo_cml:
                cml = dict(have_cml)
                for key in todo_cml:
                    fname = COREML_VARIANTS[key][0]
                    log(f"Core ML {key}: {coreml_src} -> {fname}")
                    info = coreml_variant(tmp / coreml_src, _fresh(work / fname), key)
                    shutil.move(str(work / fname), str(_fresh(tmp / fname)))
                    size = sum(p.stat().st_size for p in (tmp / fname).rglob("*") if p.is_file())
                    base = manifest["vision"]["coreml"]
                    cml[key] = {"file": fname, **info, "bytes": size,
                                **{k: base[k] for k in ("input_dtype",) if k in base}}
                    summary["added"].append(f"coreml-{key}")
                manifest["coreml_variants"] = cml
                log(f"  Core ML: {COREML_NOTE}")
            vv = manifest.get("vision_variants") or {}
            if "int8" in vv and "int8" in (manifest.get("coreml_variants") or {}):
                vv["int8"] = {**vv["int8"], "coreml": {"file": manifest["coreml_variants"]["int8"]["file"],
                                                       "precision": "int8"}}
            prov = dict(manifest["model"].get("provenance") or {})
            prov["quantize"] = {"utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                "tools": tool_versions(("coremltools",) if todo_cml else ())}
            manifest["model"] = {**manifest["model"], "provenance": prov}
            write_manifest(tmp, manifest)
            verify_bundle(tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _vision_variants(manifest: dict, tmp: Path, work: Path, todo: list[str], variants: dict, threads: int,
                     int8_method: str, data, calib: int, n_eval: int, runs: int, summary: dict, log: Log) -> dict:
    base = manifest["vision"]
    src = tmp / base["file"]
    size = (int(manifest["image"]["height"]), int(manifest["image"]["width"]))
    resize = manifest["image"].get("resize", "bicubic")
    eval_images = spotworld_images(n_eval, size, resize, data, split="test")
    io = {k: base[k] for k in ("inputs", "outputs", "opset") if k in base}
    for p in todo:
        name = vision_file_name(p)
        part = work / name
        log(f"vision {p}: {base['file']} -> {name}")
        if p == "fp16":
            info = to_fp16(src, part)
            meas = compare(src, {"fp16": part}, eval_images, threads, runs)
            info.update(meas["fp16"], fp32_ms=meas["fp32"].get("ms"))
        else:
            images = spotworld_images(calib, size, resize, data, split="train")
            info = build_int8(src, part, images, eval_images, int8_method, threads, runs, log=log)
        shutil.move(str(part), str(_fresh(tmp / name)))
        entry = {"file": name, "precision": p, **io, **info, "bytes": (tmp / name).stat().st_size,
                 "measured_on": f"{len(eval_images)} SpotWorld test images, onnxruntime CPU, {threads} threads"}
        base_region = region_graph(manifest, base)
        if p == "int8" and base_region:
            # the region graph's weights are mostly matrix products: int8 keeps them at a quarter of the size
            region = REGION_INT8_FILE
            entry["region_graph"] = rg = region_to_int8(tmp / base_region, _fresh(work / region), src, eval_images,
                                                        threads)
            shutil.move(str(work / region), str(_fresh(tmp / region)))
            log(f"  region graph int8: {base_region} -> {region}, {rg['bytes'] / 1e6:.2f} MB, "
                f"cosine mean {rg['cosine_mean']:.6f} min {rg['cosine_min']:.6f}")
        variants[p] = entry
        summary["vision"][p] = entry
        summary["added"].append(p)
        log(f"  {entry['bytes'] / 1e6:.2f} MB, {entry.get('ms', float('nan')):.2f} ms "
            f"(fp32 {entry.get('fp32_ms') or float('nan'):.2f} ms), cosine mean {entry['cosine_mean']:.5f} "
            f"min {entry['cosine_min']:.5f}")
    return variants
