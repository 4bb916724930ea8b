"""llama.cpp's own tools built by `make native` (top-level CMakeLists.txt): llama-bench, llama-quantize, llama-imatrix.

The tools are found in $CHATSPOT_LLAMA_TOOLS, else `native/bin` of this clone (the link `make native` writes),
else on PATH. Before one runs, `runtime.build_guard` checks that their llama.cpp library (beside them) was built
for instruction sets this CPU has. Each tool runs in a clean process: the environment without the OpenMP
settings `chatspot_edge` adds to its own process (`openmp.runtime_env`), so llama-bench measures what a llama.cpp
user gets.

    bench = llama_bench("model.gguf", threads=2)       # {"pp_tok_s", "tg_tok_s", ...}: llama-bench pp128 / tg64
    imatrix("model-f16.gguf", "calib.txt", "imatrix.gguf")
    quantize("model-f16.gguf", "model-q4_k_m.gguf", "Q4_K_M", imatrix="imatrix.gguf")
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

from chatspot_edge.errors import InputError

TOOLS_ENV = "CHATSPOT_LLAMA_TOOLS"
FIX = "make native"
REPO_NATIVE = Path(__file__).resolve().parents[1] / "native" / "bin"


def tools_dir() -> Path | None:
    """The folder holding llama-bench / llama-quantize / llama-imatrix, or None."""
    if os.environ.get(TOOLS_ENV):
        return Path(os.environ[TOOLS_ENV])
    if (REPO_NATIVE / "llama-bench").exists():
        return REPO_NATIVE
    found = shutil.which("llama-quantize")
    return Path(found).parent if found else None


def tool(name: str, bin_dir: Path | None = None) -> Path:
    """Path of llama.cpp tool `name` (e.g. "llama-imatrix") in `bin_dir` (default: `tools_dir()`), checked to run on
    this CPU; InputError if absent."""
    d = Path(bin_dir) if bin_dir is not None else tools_dir()
    path = d / name if d is not None else None
    if path is None or not path.is_file():
        raise InputError(f"{name} not found: build llama.cpp's tools with `{FIX}` (or set {TOOLS_ENV}=DIR)")
    if any(path.parent.glob("libllama*")):  # a build with its libraries beside it (ours): guard it
        from chatspot_edge.runtime.build_guard import check_llama_build

        check_llama_build(path.parent, fix=FIX, what="llama.cpp's tools")
    return path


def run_tool(name: str, args: Sequence[str], timeout: float | None = None,
             bin_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool in a clean process; RuntimeError with the tool's last lines when it fails."""
    from chatspot_edge.openmp import runtime_env

    proc = subprocess.run([str(tool(name, bin_dir)), *map(str, args)], capture_output=True, text=True,
                          env=runtime_env(), timeout=timeout)
    if proc.returncode != 0:
        tail = " | ".join([l for l in proc.stderr.strip().splitlines() if l.strip()][-3:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {tail}")
    return proc


def llama_bench(gguf: str | Path, threads: int = 2, n_prompt: int = 128, n_gen: int = 64, repetitions: int = 3,
                extra: Sequence[str] = (), bin_dir: Path | None = None) -> dict[str, Any]:
    """llama-bench on one GGUF: prompt processing (pp `n_prompt`) and generation (tg `n_gen`) in tokens/s
    (llama-bench's mean over `repetitions`, after its warm-up), with its build and settings. `bin_dir`: another
    build's tools (default: `tools_dir()`)."""
    args = ["-m", gguf, "-p", n_prompt, "-n", n_gen, "-t", threads, "-r", repetitions, "-o", "json", *extra]
    rows = json.loads(run_tool("llama-bench", args, bin_dir=bin_dir).stdout)
    out: dict[str, Any] = {"threads": threads, "repetitions": repetitions}
    for r in rows:
        key = "pp" if r.get("n_prompt") and not r.get("n_gen") else "tg"
        out[f"{key}_tokens"] = r["n_prompt"] if key == "pp" else r["n_gen"]
        out[f"{key}_tok_s"] = round(float(r["avg_ts"]), 2)
        out[f"{key}_tok_s_stdev"] = round(float(r["stddev_ts"]), 2)
        out.setdefault("build", {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                      "type_k", "flash_attn", "n_batch", "poll")})
    return out


def imatrix(gguf: str | Path, text_file: str | Path, out: str | Path, n_ctx: int = 512, threads: int = 2,
            chunks: int | None = None, timeout: float | None = None) -> str:
    """llama-imatrix: the importance matrix of `gguf`'s matrices on the text of `text_file` (special tokens parsed,
    chunks of `n_ctx` tokens), written as GGUF to `out`. Returns the tool's log (stderr)."""
    args = ["-m", gguf, "-f", text_file, "-o", out, "-c", n_ctx, "-t", threads, "--parse-special", "--no-ppl",
            "--output-format", "gguf"]
    if chunks:
        args += ["--chunks", chunks]
    return run_tool("llama-imatrix", args, timeout=timeout).stderr


def quantize(src: str | Path, dst: str | Path, quant: str, imatrix: str | Path | None = None,
             threads: int = 2, timeout: float | None = None, tensor_types: Sequence[tuple[str, str]] = ()) -> str:
    """llama-quantize `src` -> `dst` as `quant` (e.g. Q4_K_M), with an importance matrix when given and
    `--tensor-type pattern=type` for each of `tensor_types`."""
    args = ["--imatrix", imatrix] if imatrix else []
    for pattern, typ in tensor_types:
        args += ["--tensor-type", f"{pattern}={typ.lower()}"]
    args += [src, dst, quant.upper(), threads]
    return run_tool("llama-quantize", args, timeout=timeout).stderr
