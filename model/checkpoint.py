"""Checkpoints (SPEC section 2): a folder with `config.json`, `model.safetensors` and the tokenizer files.

Writes are atomic (a temporary sibling folder, then a rename). `load_checkpoint` also takes a Hugging Face
LLaVA folder (`LlavaForConditionalGeneration`) and imports it into the same model class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chatspot_edge.errors import InputError
from chatspot_edge.files import atomic_dir
from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.model.config import ARCHITECTURE, ChatSpotConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED_HEAD = "llm.lm_head.weight"


def model_state(model: ChatSpotModel) -> dict[str, torch.Tensor]:
    """State dict without the tied LM head (safetensors stores no aliases), contiguous, cloned."""
    state = model.state_dict()
    if model.llm.config.tie_word_embeddings:
        state.pop(TIED_HEAD, None)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_checkpoint(model: ChatSpotModel, tokenizer, out: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.config.save(tmp / CONFIG)
        save_file(model_state(model), str(tmp / WEIGHTS), metadata={"format": "pt", "architecture": ARCHITECTURE})
        tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def is_llava_folder(path: Path) -> bool:
    try:
        cfg = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return "LlavaForConditionalGeneration" in (cfg.get("architectures") or []) or cfg.get("model_type") == "llava"


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ChatSpotModel, object]:
    """(model in eval mode, tokenizer) from one of our checkpoints or a Hugging Face LLaVA folder."""
    from chatspot_edge.model.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / CONFIG).is_file():
        raise InputError(f"{path}: not a checkpoint (no {CONFIG})")
    if is_llava_folder(path):
        from chatspot_edge.model.llava import import_llava

        return import_llava(path, dtype=dtype)
    try:
        config = ChatSpotConfig.load(path / CONFIG)
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{path / CONFIG}: not a ChatSpot Edge config ({e})") from None
    if not (path / WEIGHTS).is_file():
        raise InputError(f"{path}: missing {WEIGHTS}")
    model = ChatSpotModel(config)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == TIED_HEAD and model.llm.config.tie_word_embeddings)]
    if missing or unexpected:
        raise InputError(f"{path / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.llm.config.tie_word_embeddings:
        model.llm.tie_weights()
    return model.to(dtype).eval(), load_tokenizer(path)
