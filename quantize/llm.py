"""LLM variants: llama.cpp quantization of the bundle's full-precision GGUF, and what came out of it.

`quantize_gguf` calls `llama_cpp.llama_model_quantize` (the C function behind `llama-quantize`) from Python.
`gguf_summary` reads a GGUF with the gguf package: per-tensor types, bits per weight (tensor bytes x 8 /
parameters), and the tensors whose type differs from the one the variant asks for (`fallbacks`): llama.cpp
falls back when a row size is not a multiple of the type's block (k-quants: 256; hidden 576 -> Q4_K becomes
Q5_0, Q6_K becomes Q8_0), and its `_M` / `_S` mixes deliberately give some tensors (output, attn_v,
ffn_down) more bits. Both show up; the reason says which.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chatspot_edge.errors import InputError


@dataclass(frozen=True)
class LlmType:
    name: str  # variant key and manifest `quant`, e.g. "Q4_K_M"
    ftype: str  # llama_cpp.LLAMA_FTYPE_MOSTLY_*
    base: str  # the ggml type the variant asks for (GGMLQuantizationType name)


_TYPES = [
    LlmType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"),
    LlmType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K"),
    LlmType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K"),
    LlmType("Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K"),
    LlmType("Q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0"),
    LlmType("Q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_1"),
    LlmType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K"),
    LlmType("Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K"),
    LlmType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0"),
    LlmType("Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1"),
    LlmType("IQ4_NL", "LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL"),
    LlmType("IQ4_XS", "LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS"),
    LlmType("Q3_K_L", "LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K"),
    LlmType("Q3_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K"),
    LlmType("Q3_K_S", "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q3_K"),
    LlmType("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K"),
]
LLM_TYPES = {t.name: t for t in _TYPES}
# full-precision sources, best first (F16 keeps more mantissa than BF16)
SOURCE_ORDER = ("F32", "F16", "BF16")


def llm_type(name: str) -> LlmType:
    key = name.strip().upper()
    if key not in LLM_TYPES:
        raise InputError(f"unknown LLM quantization {name!r} (choose from {', '.join(t.lower() for t in LLM_TYPES)})")
    return LLM_TYPES[key]


@dataclass(frozen=True)
class LlmRecipe:
    """A llama.cpp type plus per-tensor overrides, as `llama-quantize TYPE --tensor-type PATTERN=TYPE` makes:
    written "Q4_K_M:ffn_down=Q6_K" (type, then `:pattern=type` per override; a pattern is a regex searched in
    the GGUF tensor name, first match wins, as in llama.cpp). `name` is the variant's key in the manifest."""
    type: LlmType
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return ":".join([self.type.name, *(f"{p}={t}" for p, t in self.overrides)])


def llm_recipe(spec: str) -> LlmRecipe:
    """"q4_k_m" or "q4_k_m:ffn_down=q6_k[:attn_v=q8_0...]" -> LlmRecipe (InputError on an unknown type, an
    override without `=`, a bad regex, or a ggml type llama.cpp cannot quantize a matrix to)."""
    import gguf

    head, *rest = spec.strip().split(":")
    overrides = []
    for item in rest:
        pattern, sep, typ = item.partition("=")
        if not sep or not pattern or not typ:
            raise InputError(f"LLM override {item!r} in {spec!r}: write PATTERN=TYPE (e.g. ffn_down=q6_k)")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"LLM override pattern {pattern!r}: not a regular expression ({e})") from None
        typ = typ.strip().upper()
        if typ not in gguf.GGMLQuantizationType.__members__ or typ in ("I8", "I16", "I32", "I64", "F64"):
            raise InputError(f"LLM override type {typ!r}: not a ggml weight type (e.g. Q8_0, Q6_K, Q5_0, F16)")
        overrides.append((pattern, typ))
    return LlmRecipe(llm_type(head), tuple(overrides))


def llm_file_name(quant: str) -> str:
    """Variant name -> GGUF file name: "Q4_K_M" -> llm-q4_k_m.gguf, "Q4_K_M:ffn_down=Q6_K" ->
    llm-q4_k_m-ffn_down-q6_k.gguf."""
    return "llm-" + re.sub(r"[^a-z0-9_.-]+", "-", quant.lower()).strip("-") + ".gguf"


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _lib():
    from chatspot_edge.runtime.llama import _lib as runtime_lib  # backend init + llama.cpp logs silenced

    return runtime_lib()


def _ggml_type(name: str) -> int:
    llama_cpp = _lib()
    return int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}"))


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, threads: int | None = None,
                  overrides: Sequence[tuple[str, str]] = ()) -> None:
    """`src` (F32/F16/BF16 GGUF) -> `dst` quantized as `quant` (e.g. "Q4_K_M") with llama.cpp.

    overrides: (regex on tensor names, ggml type name) pairs that replace llama.cpp's choice for matching
    tensors (e.g. ("^blk\\.3\\.", "F16")), as `llama-quantize --tensor-type` does."""
    llama_cpp = _lib()
    t = llm_type(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(llama_cpp, t.ftype))
    params.nthread = int(threads or default_threads())
    keep = None
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        keep = [p.encode() for p, _ in overrides]
        for i, ((_, typ), pat) in enumerate(zip(overrides, keep)):
            arr[i].pattern = pat
            arr[i].type = _ggml_type(typ)
        arr[len(overrides)].pattern = None  # terminator
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama_model_quantize {Path(src).name} -> {quant} failed (code {rc}); "
                           f"set CHATSPOT_LLAMA_LOG=1 for llama.cpp's log")




def gguf_tensors(path: str | Path) -> list[dict[str, Any]]:
    """[{name, type, shape (ggml order: row size first), params, bytes}] of a GGUF's tensors (header only)."""
    from chatspot_edge.runtime.gguf_header import read_gguf_header

    return read_gguf_header(path).tensors


def block_size(type_name: str) -> int:
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])


def gguf_summary(path: str | Path, quant: str | None = None,
                 overrides: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Sizes and types of a GGUF; with `quant`, the tensors that did not get the requested type (those an
    override asked for listed with that reason).

    bits_per_weight = 8 x (all tensor bytes) / (all parameters), norms and embeddings included."""
    tensors = gguf_tensors(path)
    params = sum(t["params"] for t in tensors)
    nbytes = sum(t["bytes"] for t in tensors)
    types: dict[str, int] = {}
    for t in tensors:
        types[t["type"]] = types.get(t["type"], 0) + 1
    out: dict[str, Any] = {"bytes": Path(path).stat().st_size, "tensor_bytes": nbytes, "parameters": params,
                           "bits_per_weight": round(8.0 * nbytes / max(params, 1), 4),
                           "tensor_types": dict(sorted(types.items()))}
    if quant is not None and quant.upper() in LLM_TYPES:
        out["fallbacks"] = fallbacks(tensors, LLM_TYPES[quant.upper()].base, overrides)
    return out


def fallbacks(tensors: list[dict[str, Any]], requested: str,
              overrides: Sequence[tuple[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """{name: {"type", "requested", "row", "reason"}} for every matrix (>= 2-D) not stored as `requested`.
    1-D tensors (norms) are always F32 in llama.cpp and are not listed."""
    blk = block_size(requested)
    out = {}
    for t in tensors:
        if len(t["shape"]) < 2 or t["type"] == requested:
            continue
        row = t["shape"][0]
        asked = next((typ for pat, typ in overrides if re.search(pat, t["name"])), None)
        if asked is not None and t["type"] == asked:
            reason = f"override {asked} requested for this tensor"
        elif row % blk:
            reason = f"row size {row} is not a multiple of {requested}'s block of {blk}"
        else:
            reason = "llama.cpp's per-tensor choice for this variant (more bits for sensitive tensors)"
        out[t["name"]] = {"type": t["type"], "requested": requested, "row": row, "reason": reason}
    return out


def layer_of(name: str) -> str:
    m = re.match(r"blk\.(\d+)\.", name)
    return f"blk.{m.group(1)}" if m else name.rsplit(".", 1)[0]


def n_layers(tensors: list[dict[str, Any]]) -> int:
    ids = [int(m.group(1)) for t in tensors if (m := re.match(r"blk\.(\d+)\.", t["name"]))]
    return max(ids) + 1 if ids else 0


def tensor_errors(src: str | Path, quantized: str | Path, top: int = 12) -> list[dict[str, Any]]:
    """Relative weight error ||W - deq(Q(W))|| / ||W|| of each quantized matrix (numpy dequantization with the
    gguf package): the cheap, static view of which tensors lose most. Largest first."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    out = []
    for t in gguf.GGUFReader(str(quantized)).tensors:
        s = a.get(t.name)
        if s is None or len(t.shape) < 2 or t.tensor_type == s.tensor_type:
            continue
        try:
            w = gguf.quants.dequantize(s.data, s.tensor_type).astype(np.float32).ravel()
            q = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).ravel()
        except (NotImplementedError, KeyError, ValueError):
            continue
        rel = float(np.linalg.norm(w - q) / max(float(np.linalg.norm(w)), 1e-12))
        out.append({"tensor": t.name, "type": t.tensor_type.name, "rel_error": round(rel, 5)})
    out.sort(key=lambda r: -r["rel_error"])
    return out[:top]
