"""Image-cell / word alignment: an auxiliary loss that makes each image token say what is in its cell.

Counting ("how many red shapes?") and grounding ("locate the black cross") are answered from the image tokens
alone, and after stage 1 the image tokens of an image are 86-91% one shared vector (docs/results.md, session
10): the query's words have nothing in the image to match. The region embeddings had the same problem and the
contrastive region-text alignment (`ChatSpotModel.region_alignment_loss`) fixed it for region questions; this
is the same idea for the cells of the image grid, using what a SpotWorld-style record knows about its image
(SPEC 5: `objects` with `box` in pixels, `color`, `shape`).

For every word w (an object's colour or shape name, as the token the answers and questions use: " red",
" triangle"; a word of several tokens by its first) present in a micro-batch, every image cell c of the
micro-batch is scored by its image embedding read through the LLM's final norm and tied head, logit(c, w);
the loss is -log of the softmax mass, over ALL the micro-batch's cells, that falls on the cells showing w:

    L_w = -log sum_{c in P_w} softmax_c(logit(c, w)),   L = mean_w L_w

so a cell learns to point at the words of its object and away from those of other cells and other images
(background cells are negatives for every word). A cell shows an object when it holds the object's box centre
or when the box covers at least half of the smaller of the two (cell, box) areas. Only the head rows of the
batch's words are computed (`[B * N, W]`), not the 49k-way vocabulary.
"""

from __future__ import annotations

import torch

from chatspot_edge.model.chatspot import ChatSpotModel

# words the alignment ties to cells: SpotWorld's colour and shape names (model-side constants, so a record from
# another generator that uses the same SPEC-5 keys works too)
CELL_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
CELL_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
COVER_FRACTION = 0.5  # share of the smaller of (cell, box) the overlap must reach, besides the centre's cell


def word_token_ids(tokenizer, words=CELL_COLORS + CELL_SHAPES) -> dict[str, int]:
    """word -> the first token of " word" (the form in answers and questions)."""
    return {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}


def cells_covered(box: tuple[float, float, float, float], grid: tuple[int, int]) -> list[int]:
    """Row-major indices of the grid cells that show a normalized box `(x1, y1, x2, y2)`: the cell of its centre
    and every cell whose overlap with it is >= COVER_FRACTION of the smaller of the two areas."""
    gh, gw = grid
    x1, y1, x2, y2 = box
    cx, cy = min(gw - 1, max(0, int((x1 + x2) / 2 * gw))), min(gh - 1, max(0, int((y1 + y2) / 2 * gh)))
    out = {cy * gw + cx}
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    cell = 1.0 / (gh * gw)
    for r in range(max(0, int(y1 * gh)), min(gh, int(y2 * gh) + 1)):
        for c in range(max(0, int(x1 * gw)), min(gw, int(x2 * gw) + 1)):
            ox = min(x2, (c + 1) / gw) - max(x1, c / gw)
            oy = min(y2, (r + 1) / gh) - max(y1, r / gh)
            if ox > 0 and oy > 0 and ox * oy >= COVER_FRACTION * min(cell, area):
                out.add(r * gw + c)
    return sorted(out)


def cell_targets(records: list[dict], grid: tuple[int, int], word_ids: dict[str, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For B records: `words` LongTensor `[W]` (token ids of the colour / shape words of their objects) and
    `targets` bool `[W, B, N]` (N = gh * gw): which cells of which image show that word. Objects without a
    known colour or shape (rendered text) and records without `objects` add nothing; W may be 0."""
    n = grid[0] * grid[1]
    shows: dict[int, torch.Tensor] = {}
    for b, rec in enumerate(records):
        w, h = float(rec["width"]), float(rec["height"])
        for obj in rec.get("objects") or ():
            words = [x for x in (obj.get("color"), obj.get("shape")) if x in word_ids]
            if not words or obj.get("shape") not in CELL_SHAPES:
                continue
            x1, y1, x2, y2 = obj["box"]
            cells = cells_covered((x1 / w, y1 / h, x2 / w, y2 / h), grid)
            for word in words:
                tid = word_ids[word]
                if tid not in shows:
                    shows[tid] = torch.zeros(len(records), n, dtype=torch.bool)
                shows[tid][b, cells] = True
    ids = sorted(shows)
    targets = torch.stack([shows[t] for t in ids]) if ids else torch.zeros(0, len(records), n, dtype=torch.bool)
    return torch.tensor(ids, dtype=torch.long), targets


def cell_alignment_loss(model: ChatSpotModel, image_embeds: torch.Tensor, words: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """The loss above for image embeddings `[B, N, d]` (projected, with their 2D position), `words` `[W]`,
    `targets` `[W, B, N]`. 0 (in the graph) when the batch has no word."""
    if words.numel() == 0:
        return image_embeds.sum() * 0.0
    out = model.llm.get_output_embeddings()
    # an ordinary head's rows; under train.added_rows (tied, split table) the input embedding's, the same rows
    head = out.weight[words] if hasattr(out, "weight") else model.llm.get_input_embeddings()(words)  # [W, d]
    cells = model.llm.get_decoder().norm(image_embeds.flatten(0, 1))  # [B * N, d]
    logq = torch.log_softmax((cells @ head.T).float(), dim=0)  # [B * N, W]: which cell says the word
    pos = targets.flatten(1).T.to(logq.device)  # [B * N, W]
    return -torch.logsumexp(logq.masked_fill(~pos, float("-inf")), dim=0).mean()
