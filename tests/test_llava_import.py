"""Import of a Hugging Face LLaVA folder: logits equal transformers' own LlavaForConditionalGeneration."""

import pytest
import torch

from chatspot_edge.model.checkpoint import load_checkpoint, save_checkpoint
from chatspot_edge.model.processor import Processor


def _tiny_llava(tmp_path, tower: str, select: str, layer):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              SiglipVisionConfig)

    from chatspot_edge.model.tokenizer import smollm2_tokenizer

    tok = smollm2_tokenizer()  # byte-level BPE with <image> etc. already added
    image_id = tok.convert_tokens_to_ids("<image>")
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8)
    vc = CLIPVisionConfig(projection_dim=32, **common) if tower == "clip" else SiglipVisionConfig(**common)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_id,
                      vision_feature_select_strategy=select, vision_feature_layer=layer)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    folder = tmp_path / f"llava-{tower}"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("tower,select,layer", [("clip", "default", -2), ("clip", "full", [-3, -1]),
                                                ("siglip", "full", -1)])
def test_llava_logits_match_transformers(tmp_path, tower, select, layer):
    hf, folder = _tiny_llava(tmp_path, tower, select, layer)
    model, tok = load_checkpoint(folder)
    assert model.config.region_token is False
    proc = Processor(tok, model.config)
    enc = proc.encode_prompt("What is in <box>[0.100,0.200,0.450,0.610]</box>?")
    ids = torch.tensor([enc.ids])
    pixels = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # transformers takes normalized float pixels; ours normalizes inside the graph
    mean = torch.tensor(model.config.vision.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.vision.std).view(1, 3, 1, 1)
    pv = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv).logits
        ours = model(ids, pixels=pixels).logits
        other = model(ids, pixels=255 - pixels).logits
    assert (other - ours).abs().max() > 1e-2  # the image moves the logits 1000x past the tolerance below
    # our tokenizer gained <box> etc. only if missing: vocab rows beyond HF's are new
    assert torch.allclose(ours[..., : ref.shape[-1]], ref, atol=1e-5), (ours[..., : ref.shape[-1]] - ref).abs().max()


def test_llava_import_saves_as_our_checkpoint(tmp_path):
    _, folder = _tiny_llava(tmp_path, "clip", "default", -2)
    model, tok = load_checkpoint(folder)
    save_checkpoint(model, tok, tmp_path / "ours")
    again, _ = load_checkpoint(tmp_path / "ours")
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
