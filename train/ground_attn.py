"""Grounding attention supervision: an auxiliary loss that teaches attention heads to FIND the object a box answer
names, by looking at the image cells that show it.

Why (docs/results.md, "Why grounding stays at 0"): given where an object starts, the trained mini reads its
extent (x2, y2 within one bin 53-71% of the time), but it cannot find the object by its description ("the
purple circle": x1 within one bin 12-15%, what a constant bin scores), even after 22,000 grounding questions
or 300 steps of nothing else. The answer's cross-entropy reaches the heads that would have to search the 49
image tokens only through the loc token they end up writing: a weak, late signal for a content search.
This loss gives that search a direct signal.

At every position that predicts a coordinate of a box ANSWER (`<box>` and the loc tokens after it, chatspot-loc-v1:
`<box><loc_x1><loc_y1><loc_x2><loc_y2></box>` in the labels), a few supervised heads' attention over the image
tokens (renormalized over the N image tokens, so the head may still attend elsewhere) must put its mass on the
cells that show the answer's box (`train.cell_align.cells_covered`):

    L = -mean_{query, layer, head} log sum_{c in cells(box)} softmax_c(q . k_c / sqrt(d_head))

q and k are the heads' own rotary-embedded query and key, recomputed from the layer's input (captured by a
forward pre-hook), so the model's forward, its attention kernel and everything exported are unchanged: at run
time nothing differs but the weights. The box comes from the answer itself (the bins decoded to their extent,
[k / N, (k + 1) / N)), so any data with box answers works; text-v1 answers are not parsed (loc models only).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from chatspot_edge.errors import InputError
from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.train.cell_align import cells_covered

BOX_COORDS = 4  # an answer box: x1, y1, x2, y2
SUPERVISED_HEADS = (0,)  # which query heads of each supervised layer the loss trains


def supervised_layers(n_layers: int) -> list[int]:
    """Which decoder layers' heads are supervised: the last two thirds (the first third gathers the question's
    words at the answer position first). mini's 6 blocks: 2..5."""
    return list(range(n_layers // 3, n_layers))


def box_answer_queries(labels: torch.Tensor, model: ChatSpotModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions that predict a box answer's coordinates, in a teacher-forced batch `labels` `[B, T]`
    (IGNORE_INDEX outside answers): (batch index `[G]`, position `[G]`, normalized box `[G, 4]` of the answer
    they belong to). A position p predicts labels[p + 1], so a box answer `<box> l1 l2 l3 l4` at t..t+4 gives
    the queries t..t+3."""
    cfg = model.config
    fmt = cfg.referring_format
    if not fmt.is_loc:
        raise InputError("grounding attention supervision reads box answers written in chatspot-loc-v1 "
                         "(adapt --referring loc)")
    loc0, n = int(cfg.referring["loc_token_id"]), fmt.bins
    B, T = labels.shape
    starts = (labels[:, : T - BOX_COORDS] == cfg.box_start_id).nonzero(as_tuple=False).tolist()
    qb, qt, boxes = [], [], []
    lab = labels.tolist()
    for b, t in starts:
        bins = [lab[b][t + 1 + i] - loc0 for i in range(BOX_COORDS)]
        if not all(0 <= k < n for k in bins):
            continue  # a point, or not a loc answer
        if t + 1 + BOX_COORDS < T and lab[b][t + 1 + BOX_COORDS] != cfg.box_end_id:
            continue  # a polygon
        x1, y1, x2, y2 = bins
        box = (x1 / n, y1 / n, (x2 + 1) / n, (y2 + 1) / n)
        for i in range(BOX_COORDS):
            qb.append(b)
            qt.append(t + i)
            boxes.append(box)
    return (torch.tensor(qb, dtype=torch.long), torch.tensor(qt, dtype=torch.long),
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


def cell_mask(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """bool `[G, N]`: the cells (row-major) that show each normalized box `[G, 4]`."""
    out = torch.zeros(boxes.shape[0], grid[0] * grid[1], dtype=torch.bool)
    for g, box in enumerate(boxes.tolist()):
        out[g, cells_covered(tuple(box), grid)] = True
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (Hugging Face layout) of `x [..., H, hd]` with `cos`/`sin` `[..., hd]`."""
    return x * cos[..., None, :] + _rotate_half(x) * sin[..., None, :]


@contextmanager
def attention_inputs(model: ChatSpotModel, layers: list[int]):
    """Within the block, each listed decoder layer's attention input (the normed hidden states `[B, T, d]` and the
    rotary (cos, sin) `[B, T, hd]`) is recorded in the yielded dict {layer: (hidden, cos, sin)} at every forward."""
    decoder_layers = model.llm.get_decoder().layers
    seen: dict[int, tuple] = {}
    handles = []
    for i in layers:
        def hook(module, args, kwargs, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            seen[i] = (hidden, cos, sin)
        handles.append(decoder_layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def image_attention(model: ChatSpotModel, seen: dict[int, tuple], layer: int, qb: torch.Tensor, qt: torch.Tensor,
                    img_pos: torch.Tensor, heads: tuple[int, ...] = (0,)) -> torch.Tensor:
    """Log attention `[G, h, N]` of query heads `heads` of decoder layer `layer` at positions (qb, qt) `[G]` over
    the N image tokens at positions `img_pos` `[G, N]` of the same samples, renormalized over those N tokens,
    from the layer's recorded input (`attention_inputs`): the model's own rotary query and key, so it equals the
    layer's attention weights restricted to the image tokens."""
    hidden, cos, sin = seen[layer]
    text = model.config.text
    H = text["num_attention_heads"]
    KVH = text.get("num_key_value_heads") or H
    hd = text.get("head_dim") or text["hidden_size"] // H
    if cos.shape[0] == 1 and hidden.shape[0] > 1:
        cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
    attn = model.llm.get_decoder().layers[layer].self_attn
    h_idx = torch.tensor(heads, dtype=torch.long, device=hidden.device)
    q = attn.q_proj(hidden[qb, qt]).view(-1, H, hd)[:, h_idx]  # [G, h, hd]
    q = _rope(q, cos[qb, qt], sin[qb, qt])
    hk = hidden[qb[:, None], img_pos]  # [G, N, d]
    k = attn.k_proj(hk).view(hk.shape[0], hk.shape[1], KVH, hd)[:, :, h_idx // (H // KVH)]  # [G, N, h, hd]
    k = _rope(k, cos[qb[:, None], img_pos], sin[qb[:, None], img_pos])
    scores = torch.einsum("ghd,gnhd->ghn", q.float(), k.float()) / math.sqrt(hd)
    return torch.log_softmax(scores, dim=-1)


def image_positions(input_ids: torch.Tensor, model: ChatSpotModel) -> torch.Tensor:
    """`[B, N]`: the positions of each sample's N image tokens (one image per sample), in cell (row-major) order."""
    cfg = model.config
    n = cfg.vision.grid[0] * cfg.vision.grid[1]
    img = (input_ids == cfg.image_token_id).nonzero(as_tuple=False)
    if img.shape[0] != input_ids.shape[0] * n:
        raise ValueError(f"grounding attention needs one image of {n} tokens per sample")
    return img[:, 1].reshape(input_ids.shape[0], n)


def grounding_attention_loss(model: ChatSpotModel, seen: dict[int, tuple], input_ids: torch.Tensor,
                             labels: torch.Tensor, heads: tuple[int, ...] = SUPERVISED_HEADS) -> torch.Tensor | None:
    """The loss above over the layers recorded in `seen` (`attention_inputs`) for the teacher-forced batch
    `input_ids` / `labels` `[B, T]`; `heads`: which query heads of each layer. None when the batch has no box
    answer."""
    qb, qt, boxes = box_answer_queries(labels, model)
    if qb.numel() == 0 or not seen:
        return None
    dev = input_ids.device
    qb, qt = qb.to(dev), qt.to(dev)
    target = cell_mask(boxes, tuple(model.config.vision.grid)).to(dev)  # [G, N]
    img_pos = image_positions(input_ids, model)[qb]
    losses = []
    for layer in sorted(seen):
        logp = image_attention(model, seen, layer, qb, qt, img_pos, heads)
        hit = torch.logsumexp(logp.masked_fill(~target[:, None, :], float("-inf")), dim=-1)  # [G, h]
        losses.append(-hit.mean())
    return torch.stack(losses).mean()
