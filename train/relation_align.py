"""Relation-word alignment: the relative view's word choice (`model.position.RelationWords`) learns what the
relation words mean from the question / answer pairs themselves.

The LLM's answer loss reaches the word choice only through the LLM, which ignores the region's relation word
until the choice is informative: after `make demo`'s recipe the choice is still nearly uniform (mean probability
of the true word 0.20 against 1/7). This loss supervises the choice directly, per question about two or more
regions, at each region after the first (the one placed relative to the first):

- the answer names a relation word ("left", "The red circle is to the left of the blue star."): that word;
- the answer is yes / no and the question names exactly one relation word ("Is the object in A larger than the
  object in B? Answer yes or no."): "yes" -> the word holds (-log p), "no" -> it does not (-log (1 - p)).

Nothing here is specific to SpotWorld: it reads the words of the conversation, as the region-text alignment
reads the answer's tokens.
"""

from __future__ import annotations

import re

import torch

from chatspot_edge.model.chatspot import ChatSpotModel
from chatspot_edge.model.position import relative_features
from chatspot_edge.model.region import reference_index

_YES_NO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)


def _word_pattern(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _strip_markup(text: str) -> str:
    """The question without its `<box>...</box>` / `<image>` markup (coordinates are not words)."""
    return re.sub(r"<box>.*?</box>|<image>", " ", text)


def relation_target(question: str, answer: str, words: tuple[str, ...]) -> tuple[int, int]:
    """(word index, sign) for one question / answer pair: sign +1 (the word holds), -1 (it does not) or 0 (no
    target; word index -1)."""
    pattern = _word_pattern(words)
    lower = [w.lower() for w in words]
    named = pattern.findall(answer)
    yes_no = _YES_NO.match(answer)
    if named and not yes_no:
        return lower.index(named[0].lower()), 1
    asked = {w.lower() for w in pattern.findall(_strip_markup(question))}
    if yes_no and len(asked) == 1:
        return lower.index(asked.pop()), 1 if yes_no.group(1).lower() == "yes" else -1
    return -1, 0


def region_relation_targets(conversations: list[dict], box_segments: list[int],
                            words: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """Per region of an encoded conversation (`box_segments`: each region's question, from 1): the word index and
    sign of its question's relation target, for every region after the first of its question (the first is the
    reference; it gets no target)."""
    pairs = [(conversations[i]["value"], conversations[i + 1]["value"]) for i in range(0, len(conversations) - 1, 2)]
    word, sign, seen = [], [], set()
    for k in box_segments:
        w, s = relation_target(*pairs[k - 1], words) if k in seen else (-1, 0)
        seen.add(k)
        word.append(w)
        sign.append(s)
    return word, sign


def relation_alignment_loss(model: ChatSpotModel, boxes: torch.Tensor, box_batch: torch.Tensor,
                            box_segment: torch.Tensor | None, word: torch.Tensor, sign: torch.Tensor
                            ) -> torch.Tensor | None:
    """Mean over the regions with a target (`sign` != 0, `[R]`; `word` `[R]` indices into the model's relation
    words) of -log p(word) (sign +1) or -log (1 - p(word)) (sign -1), p the relative view's word choice for the
    region placed relative to its question's first region. None when no region has a target."""
    view = model.region.relative if model.region is not None else None
    if view is None or view.words is None:
        raise ValueError("relation alignment needs a model with relation words (config.region_relation_words)")
    keep = sign != 0
    if not bool(keep.any()):
        return None
    ref = reference_index(box_batch, box_segment)
    b = boxes.to(next(view.parameters()).dtype)
    feats = relative_features(b[keep], b[ref][keep], view.n_freq)
    p = view.words.probabilities(feats)  # [M, K]
    pw = p.gather(1, word[keep].clamp(min=0)[:, None])[:, 0].clamp(1e-6, 1 - 1e-6)
    return torch.where(sign[keep] > 0, -torch.log(pw), -torch.log1p(-pw)).mean()
