"""The multimodal importance matrix (`quantize.imatrix.collect_imatrix`): what each matrix's entry sums, that the
image and region positions are in it, and the GGUF imatrix file it writes (llama.cpp's own tools read it in
test_native_tools.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
from chatspot_edge.model.presets import build_preset
from chatspot_edge.model.processor import Processor
from chatspot_edge.quantize.imatrix import _train_examples, collect_imatrix, write_imatrix
from chatspot_edge.quantize.kl import torch_inputs

MANIFEST = {"image": {"height": 64, "width": 64, "resize": "bicubic"}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, tok = build_preset("tiny", seed=0)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("imx") / "ck")


def _read(path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    r = gguf.GGUFReader(str(path))
    return r, {t.name: np.asarray(t.data, dtype=np.float64).ravel() for t in r.tensors}


def test_entries_are_the_llms_matrices_with_their_input_squares(ckpt, tmp_path):
    out = tmp_path / "imatrix.gguf"
    info = collect_imatrix(ckpt, out, MANIFEST, None, records=3, threads=1, log=lambda s: None)
    r, t = _read(out)
    model, tok = load_checkpoint(ckpt)
    n = model.llm.config.num_hidden_layers
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    names = {f"blk.{i}.{k}.weight" for i in range(n) for k in kinds} | {"token_embd.weight"}  # tied output head
    assert {k.rsplit(".", 1)[0] for k in t} == names
    assert r.get_field(gguf.Keys.IMatrix.CHUNK_SIZE).contents() == 512
    assert "images and regions" in r.get_field(gguf.Keys.IMatrix.DATASETS).contents()[0]

    # blk.0.attn_q's entry: the squared columns of layer 0's normalized input, summed over every position of the
    # same three conversations, image and region embeddings included; counts: the number of positions
    examples, _ = _train_examples(MANIFEST, Processor(tok, model.config), None, 3, 0)
    assert sum(len(e.ids) for e in examples) == info["tokens"]
    layer0 = model.llm.model.layers[0].input_layernorm
    with torch.no_grad():
        xs = [layer0(torch_inputs(model, e))[0].double() for e in examples]
        text_only = [layer0(model.llm.get_input_embeddings()(torch.tensor([e.ids])))[0].double() for e in examples]
    want = sum(x.square().sum(0) for x in xs).numpy()
    np.testing.assert_allclose(t["blk.0.attn_q.weight.in_sum2"], want, rtol=1e-4)
    assert t["blk.0.attn_q.weight.counts"][0] == info["tokens"]
    np.testing.assert_allclose(t["blk.0.attn_q.weight.in_sum2"], t["blk.0.attn_k.weight.in_sum2"])  # one input
    # the placeholder rows would give another matrix: the image / region embeddings are what is counted
    wrong = sum(x.square().sum(0) for x in text_only).numpy()
    assert not np.allclose(t["blk.0.attn_q.weight.in_sum2"], wrong, rtol=1e-2)
    assert info["records"] == 3 and "included" in info["image_embeddings"]


def test_write_imatrix_layout(tmp_path):
    out = tmp_path / "m.gguf"
    write_imatrix(out, {"blk.0.ffn_down.weight": (np.arange(4, dtype=np.float32), 7)}, "x", 2, 512)
    r, t = _read(out)
    (s,) = [x for x in r.tensors if x.name.endswith(".in_sum2")]
    assert list(s.shape) == [4, 1]  # ggml order: row size first, one matrix (no experts)
    assert t["blk.0.ffn_down.weight.counts"].tolist() == [7.0]
    assert r.get_field(gguf.Keys.IMatrix.CHUNK_COUNT).contents() == 2
    assert not list(tmp_path.glob("*.tmp"))
