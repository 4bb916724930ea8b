"""Llama weights between Hugging Face names and GGUF names, in both directions.

One table serves the smol preset (read SmolLM2 out of its GGUF) and the exporter (write our LLM into a GGUF):
names come from `gguf.get_tensor_name_map`, and q/k rows are permuted between Hugging Face's rotary layout
(two halves) and llama.cpp's (interleaved pairs) with `permute_qk` / `unpermute_qk`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch


def permute_qk(w: np.ndarray | torch.Tensor, n_head: int) -> Any:
    """HF q_proj/k_proj rows -> llama.cpp rope layout (`convert_hf_to_gguf.py`'s `permute`).

    `w`: `[n_head * head_dim, in]` (or a bias `[n_head * head_dim]`); for k pass n_head = n_head_kv."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w: np.ndarray | torch.Tensor, n_head: int) -> Any:
    """Inverse of `permute_qk`: llama.cpp rope layout -> HF rows."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_to_gguf_names(n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)


def gguf_name(tmap: gguf.TensorNameMap, hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"no GGUF name for tensor {hf_name!r}")
    return name


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def read_llama_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read a llama-architecture GGUF (any quantization) into float32 HF tensors.

    Returns (LlamaConfig kwargs, HF state dict, tokenizer metadata). Quantized tensors are dequantized,
    so the result is the model as llama.cpp computes it (no better than the stored quantization)."""
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
    k = gguf.Keys.LLM
    a = gguf.Keys.Attention
    n_layers = int(_field(reader, k.BLOCK_COUNT.format(arch=arch)))
    n_head = int(_field(reader, a.HEAD_COUNT.format(arch=arch)))
    n_head_kv = int(_field(reader, a.HEAD_COUNT_KV.format(arch=arch), n_head))
    hidden = int(_field(reader, k.EMBEDDING_LENGTH.format(arch=arch)))
    tokens = _field(reader, gguf.Keys.Tokenizer.LIST)
    names = {t.name: t for t in reader.tensors}
    config = dict(
        vocab_size=int(_field(reader, k.VOCAB_SIZE.format(arch=arch), len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, k.FEED_FORWARD_LENGTH.format(arch=arch))),
        num_hidden_layers=n_layers,
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        max_position_embeddings=int(_field(reader, k.CONTEXT_LENGTH.format(arch=arch), 2048)),
        rms_norm_eps=float(_field(reader, a.LAYERNORM_RMS_EPS.format(arch=arch), 1e-5)),
        rope_theta=float(_field(reader, gguf.Keys.Rope.FREQ_BASE.format(arch=arch), 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, gguf.Keys.Tokenizer.BOS_ID),
        eos_token_id=_field(reader, gguf.Keys.Tokenizer.EOS_ID),
        pad_token_id=_field(reader, gguf.Keys.Tokenizer.PAD_ID),
    )
    head_dim = hidden // n_head
    hf_names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        hf_names.append("lm_head.weight")
    for i in range(n_layers):
        p = f"model.layers.{i}."
        hf_names += [p + s + ".weight" for s in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    tmap = hf_to_gguf_names(n_layers)
    state: dict[str, torch.Tensor] = {}
    for hf in hf_names:
        t = names[gguf_name(tmap, hf)]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if hf.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif hf.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_head_kv)
        state[hf] = torch.from_numpy(np.ascontiguousarray(w))
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (n_head * head_dim, hidden)
    tok = dict(
        model=_field(reader, gguf.Keys.Tokenizer.MODEL),
        pre=_field(reader, gguf.Keys.Tokenizer.PRE),
        tokens=tokens,
        token_types=_field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE),
        merges=_field(reader, gguf.Keys.Tokenizer.MERGES),
        bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"],
        pad_token_id=config["pad_token_id"],
        unk_token_id=_field(reader, gguf.Keys.Tokenizer.UNK_ID),
        add_bos_token=bool(_field(reader, gguf.Keys.Tokenizer.ADD_BOS, False)),
        chat_template=_field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE),
    )
    return config, state, tok
