"""Roofline bounds: how fast each measured stage could be on this machine, and what fraction it reaches.

Choices (also written into the JSON under `variants[].limits.notes`):

- Decode (one token, batch 1) is memory bound. Bytes read per token = every GGUF tensor's bytes, except that
  an untied token-embedding table is a lookup (one row read); with tied embeddings (no `output.weight`)
  the output matmul reads the whole table every token, so it counts in full. Plus the KV cache read at the
  measured context length (K and V, f16 by default). Bound: best measured copy bandwidth / bytes per token.
- Prefill is compute bound: FLOPs = 2 x (LLM parameters without the embedding / output tables) x tokens
  + attention (QK^T and AV: 4 x layers x heads x head_dim x the causal context summed over the prompt)
  + one output matmul (llama.cpp computes logits for the last position only). Image embeddings enter
  as rows, so they count as tokens. Bound: best measured matmul rate (fp32 or bf16, same thread count).
- Vision: FLOPs of Conv / MatMul / Gemm nodes of the ONNX graph (and their integer / QLinear forms):
  2 x MACs, from ONNX shape inference at the manifest's input size, or, where inference leaves shapes
  open, from one run of the graph on a zero image. Elementwise ops are not counted. (The PyTorch
  reference counts the same with `torch.utils.flop_counter.FlopCounterMode`: equal for the tiny preset.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MATMUL_OPS = ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul")
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv")


# -- GGUF ----------------------------------------------------------------------------------------------------


def gguf_stats(path: str | Path) -> dict[str, Any]:
    """Shapes and byte counts of a llama GGUF: what decode reads per token, what prefill computes per token."""
    from chatspot_edge.runtime.gguf_header import read_gguf_header

    h = read_gguf_header(path)  # header only: no pass over the vocabulary arrays

    def field(key, default=None):
        return h.kv.get(key, default)

    arch = field("general.architecture", "llama")
    n_layer = int(field(f"{arch}.block_count", 0))
    n_embd = int(field(f"{arch}.embedding_length", 0))
    n_head = int(field(f"{arch}.attention.head_count", 1))
    n_head_kv = int(field(f"{arch}.attention.head_count_kv", n_head))
    tensors = {t["name"]: t for t in h.tensors}
    total_bytes = sum(t["bytes"] for t in h.tensors)
    emb = tensors.get("token_embd.weight")
    tied = "output.weight" not in tensors
    n_vocab = int(emb["shape"][-1]) if emb is not None else int(field(f"{arch}.vocab_size", 0))
    emb_bytes = int(emb["bytes"]) if emb is not None else 0
    weights_read = total_bytes if tied else total_bytes - emb_bytes + (emb_bytes // max(n_vocab, 1))
    params_ex = sum(t["params"] for n, t in tensors.items() if n not in ("token_embd.weight", "output.weight"))
    types: dict[str, int] = {}
    for t in h.tensors:
        types[t["type"]] = types.get(t["type"], 0) + t["bytes"]
    return {
        "file_bytes": Path(path).stat().st_size, "tensor_bytes": total_bytes, "decode_weight_bytes": weights_read,
        "embedding_bytes": emb_bytes, "tied_embeddings": tied, "params_excluding_embeddings": params_ex,
        "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "n_vocab": n_vocab,
        "head_dim": n_embd // max(n_head, 1), "tensor_bytes_by_type": types,
    }


def kv_bytes_per_token_read(stats: dict[str, Any], context: int, kv_bytes: int = 2) -> int:
    """Bytes of K and V read by one decode step at `context` cached positions."""
    return 2 * stats["n_layer"] * context * stats["n_head_kv"] * stats["head_dim"] * kv_bytes


def prefill_flops(stats: dict[str, Any], n_tokens: int, n_past: int = 0) -> float:
    """FLOPs of prefilling `n_tokens` after `n_past` cached positions (logits for the last one only)."""
    dense = 2.0 * stats["params_excluding_embeddings"] * n_tokens
    # causal context summed over the new positions: sum_{i=1..n} (n_past + i)
    ctx_sum = n_tokens * n_past + n_tokens * (n_tokens + 1) / 2
    attn = 4.0 * stats["n_layer"] * stats["n_head"] * stats["head_dim"] * ctx_sum
    head = 2.0 * stats["n_vocab"] * stats["n_embd"]
    return dense + attn + head


# -- ONNX ----------------------------------------------------------------------------------------------------


def onnx_flops(path: str | Path) -> dict[str, Any]:
    """{"flops": 2 x MACs of conv / matmul nodes, "nodes": counted, "unknown": nodes without shapes, "shapes":
    "static" | "executed"}. Shapes come from ONNX shape inference; where that leaves some open (e.g. the
    dynamic "same" padding of EfficientNet), the graph is run once on a zero image with those tensors added
    as outputs (onnxruntime) and the real shapes are read back."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for inp in model.graph.input:  # pin symbolic dims (batch) to 1 so inference yields numbers
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    shapes = _static_shapes(model)
    result = _count(model, shapes)
    result["shapes"] = "static"
    if result["unknown"]:
        try:
            shapes.update(_executed_shapes(path, model, result.pop("missing")))
            result = _count(model, shapes)
            result["shapes"] = "executed"
        except Exception as e:  # noqa: BLE001 - onnxruntime absent or the graph does not run: keep the partial count
            result["shapes_error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    result.pop("missing", None)
    return result


def _static_shapes(model) -> dict[str, list[int | None]]:
    from onnx import numpy_helper, shape_inference

    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - keep whatever shapes the graph already holds
        inferred = model
    g = inferred.graph
    shapes: dict[str, list[int | None]] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for i in g.initializer:
        shapes[i.name] = list(i.dims)
    for n in g.node:
        if n.op_type == "Constant" and n.attribute:
            try:
                shapes[n.output[0]] = list(numpy_helper.to_array(n.attribute[0].t).shape)
            except Exception:  # noqa: BLE001
                pass
    for _ in range(3):  # weights reached through Identity nodes
        for n in g.node:
            if n.op_type == "Identity" and n.input[0] in shapes and n.output[0] not in shapes:
                shapes[n.output[0]] = shapes[n.input[0]]
    return shapes


def _operands(n) -> tuple[str, str] | None:
    """(weight-or-B input, output) names whose shapes give a node's MACs, with its A input for matmuls."""
    if n.op_type in CONV_OPS:
        w_idx = 3 if n.op_type == "QLinearConv" else 1
        return (n.input[w_idx], n.output[0]) if len(n.input) > w_idx else None
    if n.op_type in MATMUL_OPS or n.op_type == "Gemm":
        return (n.input[0], n.output[0])
    return None


def _count(model, shapes: dict) -> dict[str, Any]:
    import numpy as np

    def known(name):
        s = shapes.get(name)
        return s if s and all(isinstance(x, int) and x > 0 for x in s) else None

    flops = 0.0
    counted = unknown = 0
    missing: set[str] = set()
    for n in model.graph.node:
        ops = _operands(n)
        if ops is None:
            continue
        a, out = known(ops[0]), known(ops[1])
        if a is None or out is None:
            unknown += 1
            missing.update(name for name, s in zip(ops, (a, out)) if s is None)
            continue
        if n.op_type in CONV_OPS:  # a = weight [Cout, Cin/group, kh, kw]
            flops += 2.0 * float(np.prod(out)) * float(np.prod(a[1:]))
        else:
            k = a[-1]
            if n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute):
                k = a[0]
            flops += 2.0 * float(np.prod(out)) * k
        counted += 1
    return {"flops": flops, "nodes": counted, "unknown": unknown, "missing": missing}


def _executed_shapes(path: str | Path, model, names: set[str]) -> dict[str, list[int]]:
    """Run the graph once on zeros with `names` exposed as outputs; their shapes."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    existing = {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    extra = [n for n in names if n not in existing and n not in inits]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {}
    types = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feed[i.name] = np.zeros(shape, dtype=types.get(i.type, np.float32))
    outs = sess.run(extra, feed)
    return {n: list(np.asarray(o).shape) for n, o in zip(extra, outs)}


# -- bounds --------------------------------------------------------------------------------------------------


def variant_limits(stats: dict[str, Any], vision_flops: float | None, rates: dict[str, Any], threads: int,
                   measured: dict[str, Any]) -> dict[str, Any]:
    """Bounds (upper limits on speed / lower limits on time) and the measured fraction of each."""
    from chatspot_edge.benchmarks.machine import matmul_rate

    bw = (rates.get("copy_bandwidth_gbs") or 0) * 1e9
    mm = matmul_rate(rates, threads)
    n_prompt = int(measured.get("n_prompt_cold") or 0)
    ctx = int(measured.get("decode_context") or n_prompt or 1)
    out: dict[str, Any] = {"bandwidth_gbs": bw / 1e9 or None, "matmul_gflops": mm / 1e9 if mm else None}
    per_tok = stats["decode_weight_bytes"] + kv_bytes_per_token_read(stats, ctx)
    out["decode_bytes_per_token"] = per_tok
    if bw:
        bound = bw / per_tok
        out["decode_tok_s_bound"] = bound
        for key in ("decode_tok_s", "raw_llama_decode_tok_s"):
            if measured.get(key):
                out[f"{key}_fraction"] = measured[key] / bound
    if n_prompt and mm:
        fl = prefill_flops(stats, n_prompt)
        out["prefill_flops"] = fl
        out["prefill_tok_s_bound"] = n_prompt / (fl / mm)
        if measured.get("prefill_tok_s"):
            out["prefill_tok_s_fraction"] = measured["prefill_tok_s"] / out["prefill_tok_s_bound"]
    if vision_flops and mm:
        out["vision_flops"] = vision_flops
        out["vision_ms_bound"] = vision_flops / mm * 1e3
        if measured.get("vision_ms"):
            out["vision_fraction"] = out["vision_ms_bound"] / measured["vision_ms"]
    out["notes"] = ("decode: GGUF tensor bytes read per token (tied embeddings count in full, an untied "
                    "embedding table one row) + f16 KV read at the decode context, over the best copy "
                    "bandwidth; prefill: 2 x non-embedding params x tokens + attention + one output matmul, "
                    "over the best matmul rate at this thread count; vision: 2 x MACs of the ONNX conv / "
                    "matmul nodes over the same rate. fraction = measured / bound (speed) or bound / measured (time)")
    return out
