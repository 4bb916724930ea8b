"""Next-token KL divergence of a bundle's LLM (+ vision) variant against the full-precision torch model.

Teacher forcing on evaluation records: the prompt (system + image + question, exactly as training encodes
it) followed by the dataset's reference answer. At every position that predicts an answer token (and the
turn end) the torch model's next-token distribution P and llama.cpp's Q are compared:
KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)), and top-1 agreement argmax P == argmax Q.

Both sides see the same token ids (the Processor's). The llama.cpp side gets its image / region embeddings
from the bundle's ONNX graphs (the vision variant under test, and `region.onnx`), so a combination's KL
measures the whole on-device chain; with the F32 GGUF and the fp32 graph it is ~0. llama.cpp runs with an
F32 KV cache and flash attention off (`export.llama_check.LlamaCheck`), so the numbers measure the weights'
quantization, not the runtime's F16 KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from chatspot_edge.export.llama_check import LlamaCheck, split_segments


@dataclass
class Example:
    ids: list[int]  # full sequence (image ids expanded, `<region>` after each `</box>` when enabled)
    targets: list[int]  # positions t whose next-token distribution predicts ids[t + 1] (answer tokens)
    pixels: np.ndarray  # uint8 [H, W, 3], resized
    boxes: list[tuple[float, float, float, float]]  # normalized, in `<region>` order
    original: object = None  # the original image (PIL), which region crops are read from


def build_examples(records: Sequence[dict], load: Callable[[dict], object], processor, size: tuple[int, int],
                   resize: str = "bicubic", turns: int | None = 1) -> list[Example]:
    """Each record's first `turns` question/answer pairs (None: all) encoded as training encodes them."""
    from chatspot_edge.model.chatspot import IGNORE_INDEX
    from chatspot_edge.model.preprocess import region_source, resize_pixels

    out = []
    for rec in records:
        conv = rec["conversations"][:2 * turns] if turns else rec["conversations"]
        if len(conv) < 2:
            continue
        enc = processor.encode_conversation(conv)
        targets = [t for t in range(len(enc.ids) - 1) if enc.labels[t + 1] != IGNORE_INDEX]
        if not targets:
            continue
        img = load(rec)
        out.append(Example(list(enc.ids), targets, resize_pixels(img, size, resize), list(enc.boxes),
                           region_source(img)))
    return out


def torch_inputs(model, ex: Example):
    """The LLM's input embeddings `[1, T, d]` for `ex` (token, image and region embeddings, as in training)."""
    import torch

    ids = torch.tensor([ex.ids])
    px = torch.from_numpy(np.array(ex.pixels))[None]
    boxes = torch.tensor(ex.boxes, dtype=torch.float32).reshape(-1, 4) if ex.boxes else None
    box_batch = torch.zeros(len(ex.boxes), dtype=torch.long) if ex.boxes else None
    crops = None
    if ex.boxes and model.region is not None and model.region.crop == "original":
        from chatspot_edge.model.preprocess import region_crops

        crops = torch.from_numpy(region_crops(ex.original, ex.boxes, model.config.region_crop_size))
    return model.embed(ids, model.encode_image(px), boxes, box_batch, px, crops)


def torch_logprobs(model, examples: Sequence[Example]) -> list[np.ndarray]:
    """Log-probabilities `[len(targets), V]` (float32) of the torch model at each example's target positions."""
    import torch

    out = []
    model = model.float().eval()
    with torch.no_grad():
        for ex in examples:
            hidden = model.llm.model(inputs_embeds=torch_inputs(model, ex)).last_hidden_state[0, ex.targets]
            logits = model.llm.lm_head(hidden).double()
            out.append(torch.log_softmax(logits, -1).float().numpy())
    return out


class Embedder:
    """The bundle's ONNX vision variant + region graph: image / region embeddings for llama.cpp."""

    def __init__(self, vision_path: Path, region_path: Path | None, threads: int = 2):
        from chatspot_edge.quantize.vision import session
        from chatspot_edge.runtime.vision import OnnxRegion

        self.vision = session(vision_path, threads)
        self.region = OnnxRegion(region_path, threads=threads) if region_path is not None else None

    def __call__(self, ex: Example) -> tuple[np.ndarray, np.ndarray | None]:
        name, out = self.vision.get_inputs()[0].name, self.vision.get_outputs()[0].name
        img = self.vision.run([out], {name: ex.pixels[None]})[0]
        reg = None
        if self.region is not None and ex.boxes:
            reg = self.region(img, np.asarray(ex.boxes, dtype=np.float32), ex.pixels, ex.original)
        return img[0].astype(np.float32), reg


class LlamaScorer(LlamaCheck):
    """LlamaCheck (F32 KV, no flash attention) that returns logits only at the requested positions."""

    def logits_at(self, segments, positions: Sequence[int]) -> np.ndarray:
        self.reset()
        every = self.feed(segments, logits="all")  # [T, n_vocab], one row per fed position
        return every[np.asarray(positions, dtype=np.int64)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


CLEAR_MARGIN = 0.1  # reference top-1 probability minus its runner-up's: below this a position is a near-tie


def kl_stats(reference: Sequence[np.ndarray], logits: Sequence[np.ndarray]) -> dict[str, float]:
    """KL(P_ref || Q) per position (P from reference log-probs, Q from raw logits): mean, p99, max, and top-1
    agreement, over all positions of all examples; also top-1 agreement at the positions where the reference
    is not torn between two tokens (`top1_clear`: margin >= CLEAR_MARGIN) and how many positions are near-ties
    (where any rounding can flip the argmax)."""
    kls, agree, margin = [], [], []
    for lp, z in zip(reference, logits):
        lp = lp.astype(np.float64)
        lq = _log_softmax(z)
        kls.append(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0))
        agree.append(lp.argmax(-1) == lq.argmax(-1))
        top2 = np.exp(np.sort(lp, axis=-1)[:, -2:])
        margin.append(top2[:, 1] - top2[:, 0])
    k = np.concatenate(kls) if kls else np.zeros(0)
    a = np.concatenate(agree) if agree else np.zeros(0, bool)
    clear = np.concatenate(margin) >= CLEAR_MARGIN if margin else np.zeros(0, bool)
    if k.size == 0:
        return {"kl_mean": None, "kl_p99": None, "kl_max": None, "top1": None, "n_positions": 0}
    return {"kl_mean": float(k.mean()), "kl_p99": float(np.percentile(k, 99)), "kl_max": float(k.max()),
            "top1": float(a.mean()), "n_positions": int(k.size),
            "top1_clear": float(a[clear].mean()) if clear.any() else None, "near_ties": int((~clear).sum())}


def llama_logits(gguf: Path, examples: Sequence[Example], embeds: Sequence[tuple[np.ndarray, np.ndarray | None]],
                 image_token_id: int, region_token_id: int | None, threads: int = 2) -> list[np.ndarray]:
    """llama.cpp logits at each example's target positions, image / region embeddings injected."""
    n_ctx = max(64, max(len(e.ids) for e in examples) + 8)
    out = []
    with LlamaScorer(gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads) as llm:
        for ex, (img, reg) in zip(examples, embeds):
            replace = {image_token_id: img}
            if region_token_id is not None and reg is not None and len(reg):
                replace[region_token_id] = reg
            out.append(llm.logits_at(split_segments(ex.ids, replace), ex.targets))
    return out


def variant_kl(gguf: Path, examples, embeds, reference, image_token_id: int, region_token_id: int | None,
               threads: int = 2) -> dict[str, float]:
    return kl_stats(reference, llama_logits(gguf, examples, embeds, image_token_id, region_token_id, threads))
