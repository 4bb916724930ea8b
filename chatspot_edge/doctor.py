"""`chatspot-edge doctor [BUNDLE]`: this machine as llama.cpp and the runtime see it, and what of a bundle runs here.

Prints the CPU and its instruction sets, the ggml options a build for it gets, the instruction sets the installed
llama.cpp library (and `make native`'s tools) were compiled for and whether they run here, threads, library
versions, and for a bundle each LLM / vision variant tried for real: the GGUF loaded and one token decoded, the
ONNX graph run once on a blank image. Returns the exit code: 0 when everything listed runs here, 1 when something
does not (the line says what and how to fix it); a broken bundle raises BundleError (exit 2).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from chatspot_edge.cpu import (SYSTEM_INFO_NEEDS, X86_OPTIONS, build_instruction_sets, cpu_features, ggml_cmake_flags,
                               is_x86, missing_instruction_sets)
from chatspot_edge.errors import BuildError

Out = Callable[[str], None]
_ARM_SETS = {"NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "MATMUL_INT8", "SVE", "SME"}


def _cpu_sets(features: set[str]) -> tuple[list[str], list[str]]:
    """(instruction sets ggml can use that this CPU has, those it lacks), in llama_print_system_info names."""
    names = [n for n in SYSTEM_INFO_NEEDS if (n in _ARM_SETS) != is_x86()]
    have = [n for n in names if all(f in features for f in SYSTEM_INFO_NEEDS[n])]
    return have, [n for n in names if n not in have]


def _build_line(label: str, lib_dir: Path, fix: str, out: Out) -> bool:
    from chatspot_edge.runtime.build_guard import probe_system_info

    try:
        info = probe_system_info(lib_dir, fix)
    except BuildError as e:
        out(f"  {label}: DOES NOT RUN HERE: {e}")
        return False
    except (RuntimeError, OSError) as e:
        out(f"  {label}: cannot be read ({e})")
        return False
    sets = sorted(build_instruction_sets(info))
    extras = [k for k in ("OPENMP", "LLAMAFILE", "REPACK") if f"{k} = 1" in info]
    variants = sorted(p.name for p in lib_dir.glob("*ggml-cpu-*"))
    missing = missing_instruction_sets(info, cpu_features())
    out(f"  {label}: {lib_dir}")
    out(f"    compiled for: {' '.join(sets) or '(baseline)'}; {', '.join(extras) or 'no OpenMP / llamafile / repack'}"
        + (f"; portable: {len(variants)} CPU variants, this CPU gets the one above" if variants else ""))
    if missing:
        out(f"    DOES NOT RUN HERE: needs {', '.join(missing)}; rebuild it for this CPU with `{fix}`")
        return False
    out("    runs here: yes")
    return True


def doctor(bundle: str | Path | None = None, threads: int | None = None, out: Out = print) -> int:
    from chatspot_edge.benchmarks.machine import cpu_count, cpu_model, library_versions, memory_bytes
    from chatspot_edge.llama_tools import tools_dir
    from chatspot_edge.runtime.build_guard import llama_lib_dir

    ok = True
    feats = cpu_features()
    have, lack = _cpu_sets(feats)
    mem = memory_bytes()
    out(f"CPU: {cpu_model()} ({platform.machine()}), {cpu_count()} cores available to this process, "
        f"{mem / 2**30:.1f} GiB memory" if mem else f"CPU: {cpu_model()} ({platform.machine()})")
    if os.environ.get("CHATSPOT_CPUINFO"):
        out(f"  (flags read from CHATSPOT_CPUINFO={os.environ['CHATSPOT_CPUINFO']})")
    out(f"  instruction sets ggml uses: {' '.join(have) or '-'}")
    out(f"  lacks: {' '.join(lack) or '-'}" + ("; AMX: yes (its kernels are never built)" if "amx_int8" in feats else ""))
    if is_x86():
        on = [f[2:-3] for f in ggml_cmake_flags(feats) if f.endswith("=ON")]
        out(f"  a build for this CPU (`make setup`, `make native`): -DGGML_NATIVE=OFF + {' '.join(on)} ON, AMX off")

    out("llama.cpp:")
    lib = llama_lib_dir()
    if lib is None or not lib.is_dir():
        out("  llama-cpp-python: not installed (`make setup`)")
        ok = False
    else:
        ok &= _build_line("llama-cpp-python library", lib, "make setup", out)
    tdir = tools_dir()
    if tdir is not None and any(tdir.glob("libllama*")):
        ok &= _build_line("tools (make native)", tdir, "make native", out)
    else:
        out(f"  tools (llama-bench, llama-quantize, llama-imatrix): {tdir or 'not built (`make native`)'}")

    n = threads or cpu_count()
    out(f"threads: {cpu_count()} cores available; the runtime uses {n} (--threads); "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    versions = library_versions()
    out("versions: python " + platform.python_version() + ", "
        + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if bundle is not None:
        ok &= _bundle(Path(bundle), n, lib_ok=ok, out=out)
    out("OK: everything above runs here" if ok else "NOT OK: see the lines above")
    return 0 if ok else 1


def _bundle(bundle: Path, threads: int, lib_ok: bool, out: Out) -> bool:
    """Try each variant: load the GGUF and decode one token; run each ONNX vision graph once."""
    import numpy as np

    from chatspot_edge.export.manifest import region_graph, variant_entries, verify_bundle

    manifest = verify_bundle(bundle)
    out(f"bundle {bundle}: {manifest['model'].get('name')} ({manifest['model'].get('preset')}), checksums OK")
    ok = True
    for name, entry, default in variant_entries(manifest, "llm"):
        path = bundle / entry["file"]
        size = f"{path.stat().st_size / 1e6:.1f} MB"
        if not lib_ok:
            out(f"  LLM {name} ({size}): not tried: llama.cpp does not run here")
            ok = False
            continue
        try:
            from chatspot_edge.runtime.llama import LlamaModel

            t0 = time.perf_counter()
            m = LlamaModel(path, n_ctx=64, threads=threads, n_seq_max=1,
                           quantized=str(entry.get("quant", "")).upper().startswith(("Q", "IQ", "TQ")))
            m.decode_tokens(m.tokenize("Hello"), seq=0, pos=0)
            m.greedy()
            m.close()
            out(f"  LLM {name}{' (default)' if default else ''} ({size}): runs here "
                f"(loaded + 1 token in {(time.perf_counter() - t0) * 1e3:.0f} ms)")
        except Exception as e:  # noqa: BLE001 - report any failure of this variant, then go on
            out(f"  LLM {name} ({size}): DOES NOT RUN HERE: {e}")
            ok = False
    h, w = int(manifest["image"]["height"]), int(manifest["image"]["width"])
    for name, entry, default in variant_entries(manifest, "vision"):
        files = [entry["file"]] + ([region_graph(manifest, entry)] if region_graph(manifest, entry) else [])
        try:
            from chatspot_edge.runtime.vision import OnnxVision

            t0 = time.perf_counter()
            emb = OnnxVision(bundle / entry["file"], threads=threads)(np.zeros((h, w, 3), np.uint8))
            out(f"  vision {name}{' (default)' if default else ''} ({' + '.join(files)}): runs here "
                f"(onnxruntime, {emb.shape[1]} embeddings in {(time.perf_counter() - t0) * 1e3:.0f} ms with loading)")
        except Exception as e:  # noqa: BLE001
            out(f"  vision {name}: DOES NOT RUN HERE: {e}")
            ok = False
    for name, entry in (manifest.get("coreml_variants") or {}).items():
        where = "macOS: not tried by doctor" if sys.platform == "darwin" else "predicts on macOS only: not here"
        out(f"  Core ML vision {name} ({entry['file']}): {where}")
    return ok
