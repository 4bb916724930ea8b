"""Device classes: the memory a bundle may use, the threads and the context length on a 4 GB phone, an 8 GB
phone and a laptop, and which of a bundle's variants fit, from the manifest alone (`estimate`) or from a
benchmark's measured peak RSS (`assess`).

Where the budgets come from (the whole argument is in docs/phones.md):
- Android gives an app no fixed native-memory quota: the low-memory killer (lmkd) kills by priority when the
  system runs short, the foreground app last. What the platform itself plans for one app is its Java heap size,
  set per RAM size in AOSP's `frameworks/native/build/phone-xhdpi-{4096,8192}-dalvik-heap.mk`:
  `dalvik.vm.heapsize=512m` (the `largeHeap` ceiling) on both, `heapgrowthlimit` 192m on 4 GB and 256m on 8 GB.
  lmkd has been seen killing a 419 MB foreground app on a 4 GB tablet (airsdk/Adobe-Runtime-Support#3113).
  So: phone-4gb 512 MB peak RSS in all (the largeHeap ceiling, not a comfortable target); phone-8gb 1 GB (the
  same class of phone with twice the RAM left after the system, ~2x).
- Weights mmap'd from the GGUF are clean pages: under pressure the kernel drops them instead of killing the
  app, but decode reads every weight for every token, so a model whose weights do not stay resident thrashes
  on flash. The mmap budget caps the GGUF (and the rest of the process must fit beside it).
- Threads: the performance cores (llama.cpp decode is bandwidth bound and slows down on the little cores):
  2 on a 4 GB phone (2 x Cortex-A76/A78 + 6 x A55 parts), 4 on an 8 GB phone (1 + 3 big cores), 4 on a laptop.
- Context: one image (49-196 tokens) and a few region questions fit in 1024; chat sessions get more room with RAM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatspot_edge.errors import InputError

MB = 1e6


@dataclass(frozen=True)
class DeviceClass:
    name: str
    ram_gb: int
    threads: int
    n_ctx: int
    peak_rss_mb: int  # the whole process at its peak (anonymous + file pages it touched)
    mmap_mb: int  # the GGUF weights (mmap'd, read every token)
    note: str


PROFILES: dict[str, DeviceClass] = {
    "phone-4gb": DeviceClass("phone-4gb", 4, threads=2, n_ctx=1024, peak_rss_mb=512, mmap_mb=320,
                             note="Android largeHeap ceiling on 4 GB (AOSP phone-xhdpi-4096: heapsize 512m)"),
    "phone-8gb": DeviceClass("phone-8gb", 8, threads=4, n_ctx=2048, peak_rss_mb=1024, mmap_mb=768,
                             note="twice the 4 GB phone's room (AOSP phone-xhdpi-8192 keeps heapsize 512m)"),
    "laptop": DeviceClass("laptop", 16, threads=4, n_ctx=4096, peak_rss_mb=4096, mmap_mb=3072,
                          note="a quarter of a 16 GB laptop"),
}

# What the process holds besides the model files, measured on x86-64 (`chatspot-edge bench` of the mini bundle,
# peak RSS minus the files it loads; docs/phones.md): Python + numpy + PIL + onnxruntime + llama.cpp code and
# arenas, llama.cpp's compute buffers at n_batch 512. ONNX graphs are read into memory (protobuf + initialized
# tensors + onnxruntime's optimized copy): about twice their size.
RUNTIME_BASE_MB = 140.0
ONNX_MEMORY_FACTOR = 2.0
# ggml's CPU backend repacks some weight types into an interleaved copy in anonymous memory (extra buffer types:
# Q4_0, IQ4_NL and Q4_K on AVX2 and on ARM with dotprod) while the loader has the file pages mapped: at the peak
# both are resident. Extra peak bytes as a share of the GGUF, measured (smol, AMD EPYC, 2026-11-26 benchmark):
# Q4_0 327 MB peak RSS vs 262 MB without the copy; Q4_K_M (16 of its matrices are Q4_K) 297 vs 276 MB.
REPACK_SHARE = {"Q4_0": 0.7, "IQ4_NL": 0.7, "Q4_K_M": 0.2, "Q4_K_S": 0.6}


def profile(name: str) -> DeviceClass:
    try:
        return PROFILES[name]
    except KeyError:
        raise InputError(f"unknown device class {name!r}: one of {', '.join(PROFILES)}") from None


def kv_bytes(manifest: dict, n_ctx: int, kv_type_bytes: int = 2) -> int:
    """Bytes of the f16 K and V caches at `n_ctx` positions, from the manifest's model shape."""
    llm = (manifest.get("model") or {}).get("llm") or {}
    n_embd = int(manifest["llm"]["n_embd"])
    n_layer, n_head = int(llm.get("n_layer", 0)), int(llm.get("n_head", 0) or 1)
    n_head_kv = int(llm.get("n_head_kv", n_head) or n_head)
    if not n_layer:
        raise InputError("manifest model.llm has no n_layer: re-export the bundle to estimate its memory")
    return 2 * n_layer * n_ctx * n_head_kv * (n_embd // n_head) * kv_type_bytes


def _file_bytes(manifest: dict, name: str | None) -> int:
    if not name:
        return 0
    entry = (manifest.get("files") or {}).get(name)
    if entry is None:
        raise InputError(f"manifest lists no file {name!r}")
    return int(entry["bytes"])


def estimate(manifest: dict, llm: str | None, vision: str | None, device: DeviceClass) -> dict[str, Any]:
    """Memory of one variant on `device`, from the manifest alone (no file is opened, nothing is loaded)."""
    from chatspot_edge.export.manifest import find_variant, region_graph

    llm_name, llm_entry, _ = find_variant(manifest, "llm", llm)
    vis_name, vis_entry, _ = find_variant(manifest, "vision", vision)
    gguf = _file_bytes(manifest, llm_entry["file"])
    onnx = _file_bytes(manifest, vis_entry["file"]) + _file_bytes(manifest, region_graph(manifest, vis_entry))
    n_ctx = min(device.n_ctx, int(llm_entry.get("n_ctx") or device.n_ctx))
    kv = kv_bytes(manifest, n_ctx)
    repack = REPACK_SHARE.get(str(llm_entry.get("quant", "")).upper(), 0.0) * gguf
    peak = RUNTIME_BASE_MB * MB + gguf + repack + ONNX_MEMORY_FACTOR * onnx + kv
    fits_rss, fits_mmap = peak <= device.peak_rss_mb * MB, gguf <= device.mmap_mb * MB
    return {"device": device.name, "llm": llm_name, "vision": vis_name, "n_ctx": n_ctx, "threads": device.threads,
            "mmap_mb": gguf / MB, "onnx_mb": onnx / MB, "kv_mb": kv / MB, "repack_mb": repack / MB,
            "peak_rss_mb_est": peak / MB,
            "budget_peak_rss_mb": device.peak_rss_mb, "budget_mmap_mb": device.mmap_mb,
            "fits": fits_rss and fits_mmap,
            "why": "" if fits_rss and fits_mmap else "; ".join(
                ([f"peak RSS ~{peak / MB:.0f} MB > {device.peak_rss_mb} MB"] if not fits_rss else [])
                + ([f"GGUF {gguf / MB:.0f} MB > {device.mmap_mb} MB mmap budget"] if not fits_mmap else []))}


def variant_pairs(manifest: dict) -> list[tuple[str, str]]:
    """Every (LLM variant, vision variant) pair of a bundle, default first."""
    from chatspot_edge.export.manifest import variant_entries

    llms = [name for name, _, _ in variant_entries(manifest, "llm")]
    visions = [name for name, _, _ in variant_entries(manifest, "vision")]
    return [(lv, vv) for lv in llms for vv in visions]


def dry_run(bundle: str | Path, devices: list[str] | None = None) -> list[dict[str, Any]]:
    """Every variant pair of `bundle` against every device class (or `devices`), from manifest.json alone."""
    from chatspot_edge.export.manifest import read_manifest

    manifest = read_manifest(Path(bundle))
    rows = []
    for name in devices or list(PROFILES):
        dev = profile(name)
        rows += [estimate(manifest, lv, vv, dev) for lv, vv in variant_pairs(manifest)]
    return rows


def assess(result: dict[str, Any], device: DeviceClass) -> list[dict[str, Any]]:
    """A benchmark result's measured variants against `device`'s budgets (measured peak RSS, GGUF bytes)."""
    out = []
    for v in result.get("variants") or []:
        files = v.get("files") or {}
        gguf = sum(b for f, b in files.items() if f.endswith(".gguf"))
        rss = v.get("peak_rss_mb")
        fits_rss = rss is not None and rss <= device.peak_rss_mb
        fits_mmap = gguf <= device.mmap_mb * MB
        out.append({"device": device.name, "llm": v.get("llm"), "vision": v.get("vision"),
                    "threads": v.get("threads"), "n_ctx": v.get("n_ctx"), "peak_rss_mb": rss, "mmap_mb": gguf / MB,
                    "budget_peak_rss_mb": device.peak_rss_mb, "budget_mmap_mb": device.mmap_mb,
                    "fits": bool(fits_rss and fits_mmap) if rss is not None else None})
    return out


def profiles_table() -> str:
    rows = ["| device class | RAM | threads | context | peak RSS budget | mmap'd GGUF budget | grounded in |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for d in PROFILES.values():
        rows.append(f"| {d.name} | {d.ram_gb} GB | {d.threads} | {d.n_ctx} | {d.peak_rss_mb} MB | {d.mmap_mb} MB | "
                    f"{d.note} |")
    return "\n".join(rows)


def format_estimates(rows: list[dict[str, Any]]) -> str:
    out = ["| device class | LLM | vision | context | GGUF (mmap) MB | ONNX MB | KV MB | peak RSS MB (estimate) | "
           "budget MB (RSS / mmap) | fits |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['device']} | {r['llm']} | {r['vision']} | {r['n_ctx']} | {r['mmap_mb']:.1f} | "
                   f"{r['onnx_mb']:.1f} | {r['kv_mb']:.1f} | {r['peak_rss_mb_est']:.0f} | "
                   f"{r['budget_peak_rss_mb']} / {r['budget_mmap_mb']} | {'yes' if r['fits'] else 'NO: ' + r['why']} |")
    return "\n".join(out + [""] + verdicts(rows))


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per device class: does the bundle run there, and with which variant (the smallest peak)."""
    lines = []
    for dev in dict.fromkeys(r["device"] for r in rows):
        mine = [r for r in rows if r["device"] == dev]
        ok = sorted((r for r in mine if r["fits"]), key=lambda r: r["peak_rss_mb_est"])
        if ok:
            best = ok[0]
            lines.append(f"{dev}: runs ({len(ok)} of {len(mine)} variant pairs fit; smallest {best['llm']} + "
                         f"{best['vision']}, ~{best['peak_rss_mb_est']:.0f} MB peak of {best['budget_peak_rss_mb']} MB)")
        else:
            least = min(mine, key=lambda r: r["peak_rss_mb_est"])
            lines.append(f"{dev}: does NOT fit (smallest {least['llm']} + {least['vision']}: {least['why']})")
    return lines


def format_assessment(rows: list[dict[str, Any]], label: str = "") -> str:
    out = ["| machine | device class | LLM | vision | threads | context | peak RSS MB (measured) | GGUF MB | "
           "budget MB (RSS / mmap) | fits |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        out.append(f"| {label} | {r['device']} | {r['llm']} | {r['vision']} | {r['threads']} | {r['n_ctx'] or '-'} | "
                   f"{rss} | {r['mmap_mb']:.1f} | {r['budget_peak_rss_mb']} / {r['budget_mmap_mb']} | {fits} |")
    return "\n".join(out)


def report_section(results: list[dict[str, Any]]) -> str:
    """`bench report`'s device-class section: each result's variants against every class's budgets."""
    parts = ["\n## Device classes\n", profiles_table(), "",
             "Each measured variant against each class's budgets (peak RSS as measured on the benchmark's "
             "machine; the same code on an arm64 phone maps the same files). A run made with `--profile` is "
             "judged against its own class only.\n"]
    for r in results:
        label = r.get("_label") or (r.get("machine") or {}).get("label") or ""
        names = [r["profile"]["name"]] if isinstance(r.get("profile"), dict) else list(PROFILES)
        rows = [row for n in names for row in assess(r, profile(n))]
        parts.append(format_assessment(rows, label))
        parts.append("")
    return "\n".join(parts) + "\n"


def profile_record(device: DeviceClass) -> dict[str, Any]:
    return asdict(device)
