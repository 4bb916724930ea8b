"""LLM -> GGUF (architecture `llama`) with our own writer on top of the `gguf` package.

What goes in, so that upstream llama.cpp loads and runs the file on its own:
- every hyper-parameter llama.cpp reads for `llama` (context / embedding / feed-forward length, block count,
  head counts, rope dimension count, rope base and scaling, RMS eps, vocab size, file type);
- the tensors under their GGUF names (`model.llama_gguf.hf_to_gguf_names`), q/k rows permuted to llama.cpp's
  rope layout (`permute_qk`); a tied head writes no `output.weight` (llama.cpp reuses `token_embd`);
- the tokenizer: byte-level BPE (`gpt2`) with the matching pre-tokenizer name, all tokens (added ones
  included), merges, token types (special added tokens CONTROL: `<image>`, `<box>`, ChatML markers, matched
  only when special text is parsed and not rendered by default; other added tokens USER_DEFINED: the
  chatspot-loc-v1 `<loc_k>`, matched as one token in any text and rendered as text), BOS/EOS/PAD/UNK ids,
  `add_bos_token` false and a ChatML (or the checkpoint's own) Jinja chat template. Llama-2 style SentencePiece-BPE tokenizers
  (LLaVA-1.5) go through `gguf.vocab.LlamaHfVocab` as model `llama`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from chatspot_edge.errors import InputError
from chatspot_edge.model.llama_gguf import gguf_name, hf_to_gguf_names, permute_qk

LLM_DTYPES = {
    # name -> (GGML type of 2-D weights, file type, manifest quant)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32, "F32"),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16, "F16"),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16, "BF16"),
}

# HF buffers that are not weights (transformers recomputes them)
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)

# Hugging Face pre-tokenizer structures -> llama.cpp `tokenizer.ggml.pre` names (same splitting rules).
#   smollm: individual digits, then the GPT-2 regex (SmolLM / SmolLM2; digit splitting matters for coordinates)
#   gpt-2:  the GPT-2 regex alone
_PRE_SMOLLM = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]
_PRE_GPT2 = [{"type": "ByteLevel", "use_regex": True}]


def _jinja_str(text: str) -> str:
    """Escape text for a single-quoted Jinja string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def chatml_template(system: str) -> str:
    """A Jinja ChatML template (llama.cpp recognises it as `chatml`); `system` is used when no system message
    is given."""
    sys_text = _jinja_str(system)
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + sys_text + "<|im_end|>\\n' }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def vicuna_template(system: str) -> str:
    """LLaVA-1.5 (Vicuna v1) conversation as a Jinja template."""
    sys_text = _jinja_str(system)
    return (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}{{ '" + sys_text + "' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + '</s>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    )


# -- tokenizer ---------------------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None


def _matches(node: dict, pattern: dict) -> bool:
    return all(node.get(k) == v for k, v in pattern.items())


def _pre_tokenizer_name(tj: dict) -> str:
    pre = tj.get("pre_tokenizer") or {}
    seq = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if tj.get("normalizer") not in (None, {}):
        raise InputError(f"tokenizer: normalizer {tj['normalizer'].get('type')!r} has no llama.cpp equivalent")
    for name, pattern in (("smollm", _PRE_SMOLLM), ("gpt-2", _PRE_GPT2)):
        if len(seq) == len(pattern) and all(_matches(n, p) for n, p in zip(seq, pattern)):
            if seq[-1].get("add_prefix_space"):
                raise InputError("tokenizer: ByteLevel add_prefix_space=True is not supported by the exporter")
            return name
    kinds = [n.get("type") for n in seq]
    raise InputError(f"tokenizer: pre-tokenizer {kinds} has no known llama.cpp equivalent")


def _special_ids(tokenizer) -> dict[str, int | None]:
    ids = {}
    for k in ("bos", "eos", "pad", "unk"):
        ids[k] = getattr(tokenizer, f"{k}_token_id", None)
    return ids


def _added_tokens(tokenizer) -> dict[int, Any]:
    """id -> AddedToken (content, special)."""
    return dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def tokenizer_vocab(tokenizer, n_vocab: int, chat_template: str | None = None) -> GGUFVocab:
    """The GGUF tokenizer metadata for a Hugging Face fast tokenizer, padded to the model's `n_vocab` rows."""
    if not getattr(tokenizer, "is_fast", True) or not hasattr(tokenizer, "backend_tokenizer"):
        raise InputError("tokenizer: a fast (tokenizer.json) tokenizer is required for export")
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    m = tj["model"]
    ids = _special_ids(tokenizer)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    added = _added_tokens(tokenizer)
    if m.get("type") == "BPE" and not m.get("byte_fallback") and (tj.get("decoder") or {}).get("type") == "ByteLevel":
        pre = _pre_tokenizer_name(tj)
        vocab: dict[str, int] = tokenizer.get_vocab()
        n_tok = max(vocab.values()) + 1
        if n_tok > n_vocab:
            raise InputError(f"tokenizer has {n_tok} tokens but the model only {n_vocab} embedding rows")
        tokens = [f"[PAD{i}]" for i in range(n_vocab)]
        types = [int(gguf.TokenType.UNUSED)] * n_vocab
        for t, i in vocab.items():
            tokens[i] = t
            types[i] = int(gguf.TokenType.NORMAL)
        for i, at in added.items():
            # special added tokens (ChatML markers, <image>, <box>, </box>, <region>) are CONTROL: llama.cpp
            # matches them as one token when parsing special text, like Hugging Face does. Other added tokens
            # (<loc_k>) are USER_DEFINED: llama.cpp matches them in any text, special parsing or not, and
            # renders them as their text
            types[i] = int(gguf.TokenType.CONTROL if at.special else gguf.TokenType.USER_DEFINED)
        merges = [" ".join(p) if isinstance(p, (list, tuple)) else p for p in m.get("merges", [])]
        return GGUFVocab("gpt2", pre, tokens, types, merges, None, ids["bos"], ids["eos"], ids["pad"], ids["unk"],
                         False, template)
    if m.get("type") == "BPE" and m.get("byte_fallback"):
        return _llama_hf_vocab(tokenizer, n_vocab, ids, template)
    raise InputError(f"tokenizer: model type {m.get('type')!r} is not supported by the exporter")


def _llama_hf_vocab(tokenizer, n_vocab: int, ids: dict, template: str | None) -> GGUFVocab:
    """Llama-2 style (SentencePiece BPE with byte fallback, e.g. LLaVA-1.5) via `gguf.vocab.LlamaHfVocab`."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        try:
            hv = gguf.vocab.LlamaHfVocab(Path(d))
        except (FileNotFoundError, TypeError) as e:
            raise InputError(f"tokenizer: not a Llama SentencePiece-BPE tokenizer ({e})") from None
        rows = list(hv.all_tokens())
    if len(rows) > n_vocab:
        raise InputError(f"tokenizer has {len(rows)} tokens but the model only {n_vocab} embedding rows")
    tokens = [r[0].decode("utf-8") if isinstance(r[0], bytes) else r[0] for r in rows]
    scores = [float(r[1]) for r in rows]
    types = [int(r[2]) for r in rows]
    for i, at in _added_tokens(tokenizer).items():
        if at.special and i < len(types):
            types[i] = int(gguf.TokenType.CONTROL)
    for i in range(len(rows), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    add_bos = bool(getattr(tokenizer, "add_bos_token", True))
    return GGUFVocab("llama", "default", tokens, types, [], scores, ids["bos"], ids["eos"], ids["pad"], ids["unk"],
                     add_bos, template)


def _write_vocab(w: gguf.GGUFWriter, v: GGUFVocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.token_types)
    if v.merges:
        w.add_token_merges(v.merges)
    for val, fn in ((v.bos_id, w.add_bos_token_id), (v.eos_id, w.add_eos_token_id), (v.pad_id, w.add_pad_token_id),
                    (v.unk_id, w.add_unk_token_id)):
        if val is not None and val >= 0:
            fn(int(val))
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


# -- hyper-parameters and tensors ----------------------------------------------------------------------------------


def _rope(cfg) -> tuple[float, dict[str, Any] | None]:
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", None))
    theta = 10000.0 if theta is None else float(theta)
    scaling = dict(rp) if rp else dict(getattr(cfg, "rope_scaling", None) or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, (None if kind in (None, "default") else scaling)


def _llama3_rope_freqs(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """`rope_freqs.weight` for Llama-3 style scaling (as llama.cpp's converter computes it)."""
    factor = scaling.get("factor", 8.0)
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _tensors(llm, n_head: int, n_head_kv: int) -> Iterator[tuple[str, np.ndarray]]:
    cfg = llm.config
    tmap = hf_to_gguf_names(cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf, t in llm.state_dict().items():
        if hf.endswith(_SKIP_SUFFIXES):
            continue
        if hf == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        a = t.detach().to(torch.float32).cpu().numpy()
        if ".self_attn.q_proj." in hf:
            a = permute_qk(a, n_head)
        elif ".self_attn.k_proj." in hf:
            a = permute_qk(a, n_head_kv)
        try:
            name = gguf_name(tmap, hf)
        except KeyError:
            raise InputError(f"LLM tensor {hf!r} has no llama.cpp counterpart") from None
        yield name, np.ascontiguousarray(a)


def write_llm_gguf(
    llm,
    tokenizer,
    path: str | Path,
    dtype: str = "f16",
    name: str = "chatspot-edge",
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Write the Hugging Face `LlamaForCausalLM` `llm` and its tokenizer as a llama-architecture GGUF.

    dtype: "f32", "f16" or "bf16" for the 2-D weights (1-D norm weights / biases stay F32).
    chat_template: the Jinja chat template to embed (default: the tokenizer's own, if any). Returns {"quant", "n_embd", "n_ctx_train", "n_vocab",
    "n_tensors"}."""
    if dtype not in LLM_DTYPES:
        raise InputError(f"unknown LLM dtype {dtype!r} (choose from {', '.join(LLM_DTYPES)})")
    qtype, ftype, quant = LLM_DTYPES[dtype]
    cfg = llm.config
    if getattr(cfg, "model_type", "llama") not in ("llama",):
        raise InputError(f"LLM model_type {cfg.model_type!r}: only llama is exported")
    n_head = int(cfg.num_attention_heads)
    n_head_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_head)
    n_vocab = int(llm.get_input_embeddings().weight.shape[0])
    vocab = tokenizer_vocab(tokenizer, n_vocab, chat_template)
    theta, scaling = _rope(cfg)
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise InputError(f"LLM activation {act!r}: llama.cpp's llama architecture uses silu")

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    extra: list[tuple[str, np.ndarray]] = []
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(scaling["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        elif kind == "llama3":
            extra.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          _llama3_rope_freqs(scaling, head_dim, theta)))
        else:
            raise InputError(f"rope scaling {kind!r} is not supported by llama.cpp's llama architecture")
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(w, vocab)

    n = 0
    for tname, a in [*_tensors(llm, n_head, n_head_kv), *extra]:
        if a.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(tname, a.astype(np.float32))
        else:
            w.add_tensor(tname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"quant": quant, "n_embd": hidden, "n_ctx_train": int(cfg.max_position_embeddings), "n_vocab": n_vocab,
            "n_tensors": n}
