"""chatspot-loc-v1's location tokens on the model side: give a model + tokenizer the format, and a hook to
initialize the `<loc_k>` embedding rows from a function of k.

    model, tok = build_preset("mini", referring=ReferringFormat("chatspot-loc-v1", 32))   # or:
    set_referring(model, tok, ReferringFormat("chatspot-loc-v1", 32))   # any text-v1 model (e.g. a checkpoint)
    init_loc_embeddings(model, lambda k, n: my_rows(k, n))               # [N] bin indices -> [N, d] rows

The rows start at the mean embedding, like the other added tokens (`presets.resize_vocab`). The hook is the
place to tie them to something that knows positions (e.g. the 2D position encoding of the image tokens,
evaluated at the bin centres `bin_centres(N)`).
"""

from __future__ import annotations

from typing import Callable

import torch

from chatspot_edge.errors import InputError
from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.referring import ReferringFormat, loc_centre

LocInit = Callable[[torch.Tensor, int], torch.Tensor]  # (k: LongTensor [N], N) -> rows [N, d]


def loc_token_ids(model: ChatSpotModel) -> range:
    """Token ids of `<loc_0>`..`<loc_{N-1}>` (empty for a text-v1 model)."""
    fmt = model.config.referring_format
    if not fmt.is_loc:
        return range(0)
    first = int(model.config.referring["loc_token_id"])
    return range(first, first + fmt.bins)


def bin_centres(bins: int) -> torch.Tensor:
    """Normalized coordinates the bins decode to, `[N]`: (k + 0.5) / N."""
    return torch.tensor([loc_centre(k, bins) for k in range(bins)], dtype=torch.float32)


def mean_embedding(model: ChatSpotModel) -> LocInit:
    """The default initialization: every `<loc_k>` row is the mean of the other embedding rows."""
    ids = loc_token_ids(model)
    emb = model.llm.get_input_embeddings().weight
    keep = torch.ones(emb.shape[0], dtype=torch.bool)
    keep[ids.start:ids.stop] = False
    mean = emb.detach()[keep].mean(0)
    return lambda k, n: mean.expand(len(k), -1)


@torch.no_grad()
def init_loc_embeddings(model: ChatSpotModel, fn: LocInit | None = None) -> None:
    """Set the input-embedding rows of `<loc_0>`..`<loc_{N-1}>` to `fn(k, N)` (k: LongTensor `[N]` of bin
    indices; returns `[N, d]`). Default: `mean_embedding(model)`. A tied output head follows the rows; an
    untied one gets the same values."""
    ids = loc_token_ids(model)
    if not ids:
        raise InputError(f"the model speaks {model.config.referring_format.name}: it has no <loc_k> tokens")
    n = len(ids)
    rows = (fn or mean_embedding(model))(torch.arange(n), n)
    emb = model.llm.get_input_embeddings().weight
    if tuple(rows.shape) != (n, emb.shape[1]):
        raise ValueError(f"loc initialization returned {tuple(rows.shape)}, expected ({n}, {emb.shape[1]})")
    emb[ids.start:ids.stop] = rows.to(emb)
    head = model.llm.get_output_embeddings()
    if head is not None and head.weight is not emb:
        head.weight[ids.start:ids.stop] = rows.to(head.weight)


def set_referring(model: ChatSpotModel, tokenizer, fmt: ReferringFormat) -> None:
    """Make `model` + `tokenizer` speak `fmt`, in place. For chatspot-loc-v1: add `<loc_0>`..`<loc_{N-1}>` to
    the tokenizer (one id each), grow the embedding (and tied head) to fit, initialize the new rows with
    `init_loc_embeddings` (mean embedding) and record format, bins and the first id in the config.

    A text-v1 model can learn the loc format; a loc model keeps its format and bins (other bins or back to
    text would strand its trained location rows): InputError."""
    from chatspot_edge.model.presets import resize_vocab
    from chatspot_edge.model.tokenizer import add_loc_tokens

    current = model.config.referring_format
    if current == fmt:
        return
    if current.is_loc:
        raise InputError(f"the model speaks {current.name} with {current.bins} bins; it cannot switch to "
                         f"{fmt.name}{f' with {fmt.bins} bins' if fmt.bins else ''}")
    if not fmt.is_loc:
        return
    first = add_loc_tokens(tokenizer, fmt.bins)
    if len(tokenizer) > model.llm.get_input_embeddings().weight.shape[0]:
        resize_vocab(model.llm, len(tokenizer))
    model.config.text["vocab_size"] = int(model.llm.get_input_embeddings().weight.shape[0])
    model.config.referring = {**fmt.to_dict(), "loc_token_id": first}
    init_loc_embeddings(model)
