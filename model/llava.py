"""Import a Hugging Face LLaVA checkpoint folder (`LlavaForConditionalGeneration`) into `ChatSpotModel`.

CLIP or SigLIP tower with LLaVA's `vision_feature_layer` / `vision_feature_select_strategy`, the
multi-modal projector, and the Llama LLM are copied weight for weight; logits equal transformers' own.
Images go through our one preprocessing (squash-resize to the tower's square size, normalization inside
the graph) instead of CLIP's resize + center crop, which would cut regions out of the picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatspot_edge.errors import InputError
from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.model.config import ChatSpotConfig, VisionConfig
from chatspot_edge.model.prompt import LLAVA_SYSTEM, LLAVA_TEMPLATE, LLAVA_TURN
from chatspot_edge.model.tokenizer import add_chatspot_tokens
from chatspot_edge.referring import BOX_END, BOX_START, IMAGE_TOKEN, REGION_TOKEN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        d = json.loads(pre.read_text())
        if "image_mean" in d and "image_std" in d:
            return tuple(d["image_mean"]), tuple(d["image_std"])
    return CLIP_MEAN, CLIP_STD


def import_llava(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(ChatSpotModel, tokenizer) from a LLaVA folder. `<box>`, `</box>`, `<region>` are added to the
    tokenizer when missing (their embeddings start at the mean embedding); `region_token` is off."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    folder = Path(folder)
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input folder
        raise InputError(f"{folder}: cannot load as a Hugging Face LLaVA checkpoint ({e})") from None
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    c = hf.config
    vc = c.vision_config
    kind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(vc.model_type)
    if kind is None:
        raise InputError(f"{folder}: vision tower {vc.model_type!r} is not supported (CLIP or SigLIP)")
    mean, std = _image_stats(folder)
    side = vc.image_size // vc.patch_size
    layers = c.vision_feature_layer
    channels = vc.hidden_size * (len(layers) if isinstance(layers, list) else 1)
    vision = VisionConfig(kind=kind, image_size=(vc.image_size, vc.image_size), mean=mean, std=std, channels=channels,
                          grid=(side, side), stride=vc.patch_size, hf_config=vc.to_dict(), feature_layer=layers,
                          select_strategy=c.vision_feature_select_strategy)

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != c.image_token_id:
        raise InputError(f"{folder}: tokenizer's {IMAGE_TOKEN} id {image_id} != config image_token_id {c.image_token_id}")
    ids = add_chatspot_tokens(tokenizer)
    llm = LlamaForCausalLM(LlamaConfig(**c.text_config.to_dict()))
    llm.model.load_state_dict(hf.model.language_model.state_dict())
    llm.lm_head.load_state_dict(hf.lm_head.state_dict())
    if len(tokenizer) > llm.config.vocab_size:
        from chatspot_edge.model.presets import resize_vocab

        resize_vocab(llm, len(tokenizer))
    act = getattr(c, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise InputError(f"{folder}: projector activation {act!r} is not supported (gelu)")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else c.text_config.eos_token_id
    cfg = ChatSpotConfig(
        preset="llava", vision=vision, text=llm.config.to_dict(), projector="mlp2x_gelu",
        projector_bias=bool(getattr(c, "multimodal_projector_bias", True)), region_token=False,
        image_token_id=image_id, box_start_id=ids[BOX_START], box_end_id=ids[BOX_END],
        region_token_id=ids[REGION_TOKEN],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0),
        eos_token_id=eos, system_prompt=LLAVA_SYSTEM, prompt_template=LLAVA_TEMPLATE,
        assistant_end=tokenizer.eos_token or "</s>", turn_template=LLAVA_TURN,
        provenance={"imported_from": str(folder), "format": "LlavaForConditionalGeneration"},
    )
    model = ChatSpotModel(cfg, llm=llm)
    model.vision.backbone.tower.load_state_dict(hf.model.vision_tower.state_dict())
    model.projector.load_state_dict(hf.model.multi_modal_projector.state_dict())
    return model.to(dtype).eval(), tokenizer
