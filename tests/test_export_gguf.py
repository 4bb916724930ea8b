"""LLM -> GGUF: metadata, tokenizer parity with llama.cpp, and F32 logit parity (text and injected embeddings)."""

from __future__ import annotations

import random

import gguf
import numpy as np
import pytest
import torch

from chatspot_edge.export.gguf_writer import chatml_template, write_llm_gguf
from chatspot_edge.export.llama_check import LlamaCheck, split_segments
from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.model.llama_gguf import read_llama_gguf
from chatspot_edge.model.presets import build_preset
from chatspot_edge.model.preprocess import region_crops
from chatspot_edge.model.processor import Processor

pytestmark = pytest.mark.llama

CONTROL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<box>", "</box>", "<region>")


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


@pytest.fixture(scope="module")
def gguf_f32(tiny, tmp_path_factory):
    model, tok = tiny
    path = tmp_path_factory.mktemp("gguf") / "llm-f32.gguf"
    write_llm_gguf(model.llm, tok, path, "f32", chat_template=chatml_template(model.config.system_prompt))
    return path


@pytest.fixture(scope="module")
def llama(gguf_f32):
    with LlamaCheck(gguf_f32, n_ctx=512, n_threads=2) as lc:
        yield lc


def _field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


# -- metadata ----------------------------------------------------------------------------------------------------


def test_metadata_and_tensors(tiny, gguf_f32):
    model, tok = tiny
    text = model.llm.config
    r = gguf.GGUFReader(str(gguf_f32))
    arch = _field(r, gguf.Keys.General.ARCHITECTURE)
    assert arch == "llama"
    L, A, R, T = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope, gguf.Keys.Tokenizer
    assert _field(r, L.CONTEXT_LENGTH.format(arch=arch)) == text.max_position_embeddings
    assert _field(r, L.EMBEDDING_LENGTH.format(arch=arch)) == 64
    assert _field(r, L.BLOCK_COUNT.format(arch=arch)) == 2
    assert _field(r, L.FEED_FORWARD_LENGTH.format(arch=arch)) == 128
    assert _field(r, A.HEAD_COUNT.format(arch=arch)) == 4
    assert _field(r, A.HEAD_COUNT_KV.format(arch=arch)) == 2
    assert _field(r, R.DIMENSION_COUNT.format(arch=arch)) == 16
    assert _field(r, R.FREQ_BASE.format(arch=arch)) == pytest.approx(10000.0)
    assert _field(r, A.LAYERNORM_RMS_EPS.format(arch=arch)) == pytest.approx(1e-5)
    assert _field(r, L.VOCAB_SIZE.format(arch=arch)) == len(tok) == 49156
    assert _field(r, gguf.Keys.General.FILE_TYPE) == gguf.LlamaFileType.ALL_F32
    assert _field(r, T.MODEL) == "gpt2" and _field(r, T.PRE) == "smollm"
    tokens = _field(r, T.LIST)
    types = _field(r, T.TOKEN_TYPE)
    assert len(tokens) == len(types) == 49156
    for t in CONTROL:
        assert types[tok.convert_tokens_to_ids(t)] == gguf.TokenType.CONTROL, t
    assert types[tok.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    assert _field(r, T.BOS_ID) == tok.bos_token_id and _field(r, T.EOS_ID) == tok.eos_token_id
    assert _field(r, T.PAD_ID) == tok.pad_token_id and _field(r, T.UNK_ID) == tok.unk_token_id
    assert _field(r, T.ADD_BOS) is False
    assert "<|im_start|>" in _field(r, T.CHAT_TEMPLATE)
    assert len(_field(r, T.MERGES)) == 48900
    names = {t.name for t in r.tensors}
    assert gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight" not in names  # tied: llama.cpp reuses token_embd
    # round trip through the reader (un-permutes q/k) gives back the torch weights exactly
    _, state, _ = read_llama_gguf(gguf_f32)
    for k, v in model.llm.state_dict().items():
        if k in state:
            torch.testing.assert_close(state[k], v.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,ggml", [("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)])
def test_half_dtypes_norms_stay_f32(tiny, tmp_path, dtype, ggml):
    model, tok = tiny
    path = tmp_path / f"llm-{dtype}.gguf"
    info = write_llm_gguf(model.llm, tok, path, dtype)
    assert info["quant"] == dtype.upper()
    r = gguf.GGUFReader(str(path))
    for t in r.tensors:
        want = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else ggml
        assert t.tensor_type == want, t.name
    ids = tok("Describe <box>[0.100,0.200,0.450,0.610]</box> please.", add_special_tokens=False)["input_ids"]
    with LlamaCheck(path, n_ctx=128) as lc:
        got = lc.feed([ids], logits="all")
    with torch.no_grad():
        ref = model.llm(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 5e-2 * max(1.0, np.abs(ref).max())


def test_untied_head_writes_output_weight(tiny, tmp_path):
    model, tok = tiny
    cfg = model.config
    text = dict(cfg.text, tie_word_embeddings=False)
    torch.manual_seed(1)
    untied = ChatSpotModel(type(cfg).from_dict({**cfg.to_dict(), "text": text})).eval()
    assert untied.llm.lm_head.weight.data_ptr() != untied.llm.get_input_embeddings().weight.data_ptr()
    path = tmp_path / "untied.gguf"
    write_llm_gguf(untied.llm, tok, path, "f32")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight" in names
    ids = tok("<|im_start|>user\nhello 42<|im_end|>", add_special_tokens=False)["input_ids"]
    with LlamaCheck(path, n_ctx=64) as lc:
        got = lc.feed([ids], logits="all")
    with torch.no_grad():
        ref = untied.llm(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_chat_template_matches_prompt_format(tiny, gguf_f32):
    """llama.cpp's own template engine renders our prompt format exactly."""
    import ctypes

    import llama_cpp as lc

    model, _ = tiny
    proc = Processor(tiny[1], model.config)
    with LlamaCheck(gguf_f32, vocab_only=True) as chk:
        tmpl = lc.llama_model_chat_template(chk.llm.model, None)
        assert tmpl and b"<|im_start|>" in tmpl
        msgs = (lc.llama_chat_message * 2)(
            lc.llama_chat_message(role=b"system", content=model.config.system_prompt.encode()),
            lc.llama_chat_message(role=b"user", content=b"<image>\nWhat is this?"),
        )
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_chat_apply_template(tmpl, msgs, 2, True, buf, 4096)
        assert 0 < n < 4096
    assert buf.raw[:n].decode() == proc.prompt.render("What is this?")


# -- tokenizer parity --------------------------------------------------------------------------------------------

_WORDS = ["the", "red", "triangle", "circle", "box", "What", "is", "in", "region", "color", "shape", "left", "of",
          "don't", "it's", "we'll", "I'm", "they've", "x", "y", "HELLO", "camelCase", "snake_case", "a-b", "e.g."]
_UNICODE = ["héllo", "naïve", "Straße", "世界", "日本語", "Привет", "مرحبا", "😀", "👍🏽", "ñ", "Å", "∑x²", "—", "…",
            "€100", "ß", "한국어", "\u00a0", "Ω", "🇫🇷"]
_PUNCT = list(".,;:!?()[]{}<>\"'`~@#$%^&*-_=+/\\|")
_WS = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "    \t", "\n   "]


def _coord(rng: random.Random) -> str:
    n = rng.choice([2, 4, 4, 6, 8])
    return "<box>[" + ",".join(f"{rng.random():.3f}" for _ in range(n)) + "]</box>"


def _piece(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.25:
        return rng.choice(_WORDS)
    if k < 0.40:
        return str(rng.randint(0, 10 ** rng.randint(1, 9)))
    if k < 0.50:
        return f"{rng.uniform(-1000, 1000):.{rng.randint(0, 4)}f}"
    if k < 0.60:
        return _coord(rng)
    if k < 0.68:
        return rng.choice(CONTROL)
    if k < 0.78:
        return rng.choice(_UNICODE)
    if k < 0.88:
        return rng.choice(_PUNCT)
    return rng.choice(_WS)


def _strings(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "\n", "0", "00", "1234567890", "<box>[0.100,0.200,0.450,0.610]</box>", "<box>[0.412,0.533]</box>",
           "<image>\n<box>[0.1,0.2]</box><region>", "  leading", "trailing  ", "a\n\n\nb"]
    while len(out) < n:
        parts = [_piece(rng) for _ in range(rng.randint(1, 12))]
        sep = rng.choice(["", " ", " ", " "])
        out.append(sep.join(parts))
    return out


def test_tokenizer_parity_with_llama_cpp(tiny, gguf_f32):
    _, tok = tiny
    strings = _strings(1200)
    hf = tok(strings, add_special_tokens=False)["input_ids"]
    mismatches = []
    with LlamaCheck(gguf_f32, vocab_only=True) as lc:
        for s, ref in zip(strings, hf):
            got = lc.tokenize(s, special=True, add_bos=False)
            if got != ref:
                mismatches.append((s, got, ref))
                continue
            if lc.detokenize(got, special=True) != s:
                mismatches.append((s, "detok", lc.detokenize(got, special=True)))
            elif tok.decode(ref, skip_special_tokens=False) != s:
                mismatches.append((s, "hf-detok", tok.decode(ref)))
    assert not mismatches, f"{len(mismatches)} / {len(strings)} mismatches, first: {mismatches[:3]!r}"
    # digits are split one by one (coordinates tokenize the same everywhere)
    with LlamaCheck(gguf_f32, vocab_only=True) as lc:
        ids = lc.tokenize("[0.450,0.610]")
    assert len(ids) == 1 + 5 + 1 + 5 + 1


# -- logit parity (F32 GGUF, F32 KV cache, flash attention off) --------------------------------------------------


def test_text_logits_match_torch(tiny, llama):
    model, tok = tiny
    text = ("<|im_start|>system\nYou are ChatSpot.<|im_end|>\n<|im_start|>user\nWhat is at "
            "<box>[0.100,0.200,0.450,0.610]</box>? 1234 héllo<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llama.reset()
    got = llama.feed([ids], logits="all")
    with torch.no_grad():
        ref = model.llm(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4


def test_image_and_region_embedding_injection_matches_torch(tiny, llama):
    """Prompt = [prefix tokens] [N image embeddings] [tokens] [region embedding] [tokens], positions continuing."""
    model, tok = tiny
    proc = Processor(tok, model.config)
    enc = proc.encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    assert enc.ids.count(model.config.image_token_id) == model.config.num_image_tokens
    assert enc.ids.count(model.config.region_token_id) == 1
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=g)
    boxes = torch.tensor(enc.boxes, dtype=torch.float32)
    crops = torch.from_numpy(region_crops(pixels[0].numpy(), enc.boxes, model.config.region_crop_size))
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        region = model.encode_regions(image_embeds, boxes, torch.zeros(1, dtype=torch.long), pixels, crops)
        ref = model(torch.tensor([enc.ids]), pixels=pixels, boxes=boxes, crops=crops,
                    box_batch=torch.zeros(1, dtype=torch.long)).logits[0].numpy()
        # the inputs matter: another image, or another region, moves the logits 20x past the parity tolerance
        inverted, moved = 255 - pixels, [[0.6, 0.6, 0.9, 0.9]]
        other_image = model(torch.tensor([enc.ids]), pixels=inverted, boxes=boxes, box_batch=torch.zeros(1, dtype=torch.long),
                            crops=torch.from_numpy(region_crops(inverted[0].numpy(), enc.boxes,
                                                                model.config.region_crop_size))).logits[0].numpy()
        other_region = model(torch.tensor([enc.ids]), pixels=pixels, boxes=torch.tensor(moved),
                             box_batch=torch.zeros(1, dtype=torch.long),
                             crops=torch.from_numpy(region_crops(pixels[0].numpy(), moved,
                                                                 model.config.region_crop_size))).logits[0].numpy()
    assert np.abs(other_image - ref).max() > 2e-3 and np.abs(other_region - ref).max() > 2e-3
    segs = split_segments(enc.ids, {model.config.image_token_id: image_embeds[0].numpy(),
                                    model.config.region_token_id: region.numpy()})
    kinds = [isinstance(s, np.ndarray) for s in segs]
    # tokens, image rows, tokens, region row (+ tokens after it when the region follows its `</box>`)
    assert kinds[:4] == [False, True, False, True] and kinds[4:] in ([], [False])
    llama.reset()
    got = llama.feed(segs, logits="all")
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4
    # the KV cache continues: a follow-up token after the prompt equals torch on the longer sequence
    nxt = int(np.argmax(got[-1]))
    more = llama.feed([[nxt]], logits="last")
    with torch.no_grad():
        ref2 = model(torch.tensor([enc.ids + [nxt]]), pixels=pixels, boxes=boxes, crops=crops,
                     box_batch=torch.zeros(1, dtype=torch.long)).logits[0, -1].numpy()
    assert np.abs(more - ref2).max() <= 1e-4
