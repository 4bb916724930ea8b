"""The machine a benchmark ran on: CPU, cores, ggml-relevant flags, memory, versions, and two quick rates.

`machine_info()` is cheap (files and library metadata). `measure_rates()` takes about 1-3 s: memory copy
bandwidth (numpy, 256 MB arrays, best of N, single and multi threaded) and matmul rate (fp32 sgemm, and bf16
through torch where torch is importable) per thread count. Those two numbers are the denominators of the
roofline bounds in `chatspot_edge.benchmarks.limits`.

Conventions (documented in the JSON under `machine.rates.notes`):
- copy bandwidth counts bytes read + bytes written (a 256 MB copy moves 512 MB);
- the decode bound uses the best copy bandwidth, a generous (upper) bound for a read-mostly stream;
- matmul rates are the best of a few square products of size 1024 (fp32) / 1024 (bf16).
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

import numpy as np

GGML_FLAG_RE = re.compile(r"^(avx2|avx512\w*|amx\w*|avx_vnni|avxvnni|f16c|fma|bmi2|sse4_2|neon|asimd\w*|sve\w*|dotprod|i8mm)$")
LIBRARIES = ("numpy", "torch", "transformers", "onnxruntime", "llama_cpp_python", "gguf", "onnx", "psutil")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" not in line:
                    if out:
                        break  # the first processor's block is enough
                    continue
                k, v = line.split(":", 1)
                out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def cpu_model() -> str:
    info = _cpuinfo()
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        if info.get(key):
            return info[key]
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    info = _cpuinfo()
    flags = (info.get("flags") or info.get("Features") or "").split()
    return sorted({f for f in flags if GGML_FLAG_RE.match(f)})


def memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil absent or unsupported platform
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import chatspot_edge

        out["chatspot_edge"] = chatspot_edge.__version__
    except ImportError:
        pass
    return out


def llama_system_info() -> str | None:
    """ggml's CPU feature report from llama-cpp-python (None where it is not installed or does not run here),
    read in a child process (`runtime.build_guard`): loading a build for another CPU here could kill this one."""
    from chatspot_edge.runtime.build_guard import llama_lib_dir, probe_system_info

    lib = llama_lib_dir()
    try:
        return probe_system_info(lib).strip() if lib is not None and lib.is_dir() else None
    except Exception:  # noqa: BLE001 - a build that does not run here, or no llama_cpp
        return None


def gpu_info() -> dict[str, Any] | None:
    """Name, memory and CUDA version of GPU 0 when torch sees one (torch imported only if already loaded)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_bytes": int(p.total_memory), "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda, "count": torch.cuda.device_count()}


def machine_label() -> str:
    """How tables name this machine: 'CPU model (N cores)', N the cores this process may use."""
    return f"{cpu_model()} ({cpu_count()} cores)"


def machine_info(label: str | None = None) -> dict[str, Any]:
    model = cpu_model()
    cores = cpu_count()
    info: dict[str, Any] = {
        "label": label or machine_label(),
        "hostname": socket.gethostname(),
        "cpu": model,
        "cores": cores,
        "cpu_count_os": os.cpu_count(),
        "arch": platform.machine(),
        "cpu_flags": cpu_flags(),
        "memory_bytes": memory_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "llama_cpp_system_info": llama_system_info(),
        "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "CHATSPOT_EXTRA_BUFTS")
                if k in os.environ},
    }
    try:
        info["load_avg"] = list(os.getloadavg())  # a busy machine shows here: compare with `cores`
    except (AttributeError, OSError):
        pass
    gpu = gpu_info()
    if gpu:
        info["gpu"] = gpu
    return info


# -- rates -------------------------------------------------------------------------------------------------


def copy_bandwidths(mb: int = 256, repeats: int = 5, threads: int = 1) -> tuple[float, float]:
    """Best copy bandwidth in bytes/s (read + write bytes) of `mb` MB: (one thread, split over `threads`)."""
    n = mb * (1 << 20) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in

    def best_of(fn, k):
        best = float("inf")
        for _ in range(k):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return 2 * src.nbytes / best

    one = best_of(lambda: np.copyto(dst, src), repeats)
    if threads <= 1:
        return one, one
    step = -(-n // threads)
    bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL while copying
        many = best_of(lambda: list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds)), repeats)
    return one, many


def numpy_sgemm_rate(n: int = 1024, repeats: int = 3) -> float:
    """fp32 FLOP/s of numpy's BLAS (its own thread count)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def torch_matmul_rates(threads: int, n: int = 1024, repeats: int = 3) -> dict[str, float]:
    """{"fp32": FLOP/s, "bf16": FLOP/s} of torch.mm on the CPU with `threads` threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(n, n).to(dtype)
            b = torch.randn(n, n).to(dtype)
            try:
                torch.mm(a, b)
            except RuntimeError:
                continue
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t)
            out[name] = 2 * n ** 3 / best
    finally:
        torch.set_num_threads(old)
    return out


def measure_rates(threads: tuple[int, ...] = (2,), use_torch: bool = True) -> dict[str, Any]:
    """Memory bandwidth and matmul rates (about 1 s, plus importing torch). Rates per thread count under
    `matmul_gflops`."""
    torch_ok = False
    if use_torch:
        try:
            import torch  # noqa: F401 - imported before the clock starts

            torch_ok = True
        except ImportError:
            pass
    t0 = time.perf_counter()
    cores = cpu_count()
    bw1, bwn = copy_bandwidths(threads=cores)
    rates: dict[str, Any] = {
        "copy_bandwidth_gbs_1t": round(bw1 / 1e9, 2),
        "copy_bandwidth_gbs": round(max(bw1, bwn) / 1e9, 2),
        "copy_bandwidth_threads": cores,
        "numpy_sgemm_gflops": round(numpy_sgemm_rate() / 1e9, 1),
        "matmul_gflops": {},
    }
    if torch_ok:
        for t in sorted(set(threads)):
            rates["matmul_gflops"][str(t)] = {k: round(v / 1e9, 1) for k, v in torch_matmul_rates(t).items()}
    rates["seconds"] = round(time.perf_counter() - t0, 2)
    rates["notes"] = ("copy bandwidth counts read + written bytes of a 256 MB float32 copy (best of 5; the "
                      "multi-threaded figure splits it over all cores); matmul: best of 3 square 1024 products, "
                      "torch per thread count, numpy with its BLAS default threads")
    return rates


def matmul_rate(rates: dict[str, Any], threads: int) -> float | None:
    """Best measured matmul FLOP/s usable with `threads` threads (torch fp32 / bf16, else numpy)."""
    per = (rates.get("matmul_gflops") or {}).get(str(threads))
    best = max(per.values()) if per else None
    if best is None:
        best = rates.get("numpy_sgemm_gflops")
    return best * 1e9 if best else None
