"""Persistent ggml CPU thread pools for a llama.cpp context (builds without OpenMP).

A llama.cpp build without OpenMP runs ggml's own thread pool; a context with no pool attached gets a new one,
threads started and joined, at EVERY `llama_decode` (ggml_graph_compute's "disposable" pool). llama.cpp's own
programs (llama-cli, llama-bench) attach persistent pools; llama-cpp-python's bindings do not expose that, so
this module reaches it with ctypes, through the CPU backend's registry (a build whose CPU backend is a loadable
variant works too). With OpenMP the pools are bookkeeping only and need not be attached.

Imports nothing of chatspot_edge: `benchmarks/raw_llama.py` loads this file by path for its clean-process baseline.
"""

from __future__ import annotations

import ctypes


class ThreadPools:
    """ggml CPU thread pools for one context, through the CPU backend's registry (so a build whose CPU backend
    is a loadable variant works too): one pool per distinct thread count, attached with `llama_attach_threadpool`."""

    def __init__(self, llama_cpp, ctx, decode: int, prefill: int):
        from llama_cpp._ctypes_extensions import load_shared_library

        base = llama_cpp.llama_cpp._base_path
        ggml, ggml_base = load_shared_library("ggml", base), load_shared_library("ggml-base", base)
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml_base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        ggml_base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        ggml_base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        ggml_base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        ggml_base.ggml_threadpool_params_init.restype = None
        ggml_base.ggml_threadpool_params_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
        dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        reg = ggml_base.ggml_backend_dev_backend_reg(dev) if dev else None
        new = ggml_base.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new") if reg else None
        free = ggml_base.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free") if reg else None
        if not (new and free):
            raise RuntimeError("this ggml CPU backend offers no thread pool API")
        self._new = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(new)
        self._free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free)
        self._params_init = ggml_base.ggml_threadpool_params_init
        self._attach = llama_cpp.llama_cpp._lib.llama_attach_threadpool
        self._attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._attach.restype = None
        self._detach = llama_cpp.llama_cpp._lib.llama_detach_threadpool
        self._detach.argtypes = [ctypes.c_void_p]
        self._detach.restype = None
        self.ctx = ctx
        self.pools: dict[int, int] = {}
        self.set(decode, prefill)

    def _pool(self, n: int) -> int:
        if n not in self.pools:
            # struct ggml_threadpool_params: a cpumask of GGML_MAX_N_THREADS bools and five scalars; the buffer is
            # larger than any version's struct, and only ggml reads or writes it
            params = ctypes.create_string_buffer(16384)
            self._params_init(params, n)
            pool = self._new(params)
            if not pool:
                raise RuntimeError(f"ggml could not start a pool of {n} threads")
            self.pools[n] = pool
        return self.pools[n]

    def set(self, decode: int, prefill: int) -> None:
        self._attach(self.ctx, self._pool(decode), self._pool(prefill))
        for n in [n for n in self.pools if n not in (decode, prefill)]:
            self._free(self.pools.pop(n))

    def close(self) -> None:
        self._detach(self.ctx)
        for pool in self.pools.values():
            self._free(pool)
        self.pools.clear()
