"""Text side of the model: prompts and conversations to token ids, labels and region boxes.

One place decides how a question becomes ids, for training, evaluation of checkpoints and (through the
manifest's prompt) the runtime: write every region (of questions AND answers) in the model's referring
format (datasets stay in chatspot-text-v1; a chatspot-loc-v1 model gets `<loc_k>` tokens), render the
template, put `<region>` placeholders where the model has region embeddings, expand `<image>` to N ids, and
parse each region's normalized box from its text as the model reads it (a loc region: its bin centres).
"""

from __future__ import annotations

from dataclasses import dataclass

from chatspot_edge.model.config import ChatSpotConfig
from chatspot_edge.model.prompt import PromptFormat, strip_image_token
from chatspot_edge.model.chatspot import IGNORE_INDEX
from chatspot_edge.referring import with_region_tokens

Box = tuple[float, float, float, float]


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int] | None
    boxes: list[Box]  # normalized, one per `<region>` id, in order
    # independent turns only (`encode_turns`): per token, 0 for the shared [system + image] prefix and k for
    # turn k; and the token's position (each turn starts right after the prefix)
    segments: list[int] | None = None
    positions: list[int] | None = None
    box_segments: list[int] | None = None  # the turn (question) of each box, from 1


class Processor:
    def __init__(self, tokenizer, config: ChatSpotConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.prompt = PromptFormat(config.system_prompt, config.prompt_template, (config.assistant_end,), config.turn_template)
        self.n_image = config.num_image_tokens
        self.referring = config.referring_format

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand_image(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.n_image if t == self.config.image_token_id else [t])
        return out

    def convert(self, text: str) -> str:
        """`text` with its regions written in the model's referring format."""
        return self.referring.convert(text)

    def question_boxes(self, question: str) -> list[Box]:
        """Normalized boxes of the question's regions as the model reads them (a point is a zero-size box)."""
        return self.referring.boxes(self.convert(question)) if self.config.region_token else []

    def render(self, question: str, render) -> str:
        """`render(question)` with its regions in the model's format and the `<region>` placeholders where the
        config puts them (if enabled)."""
        q = self.convert(strip_image_token(question))
        if not self.config.region_token:
            return render(q)
        return with_region_tokens(q, render, self.config.region_placement, self.referring.bins)

    def encode_prompt(self, question: str) -> Encoded:
        """Ids of a full prompt for one question (generation starts right after)."""
        text = self.render(question, self.prompt.render)
        return Encoded(self._expand_image(self._ids(text)), None, self.question_boxes(question))

    def encode_conversation(self, conversations: list[dict]) -> Encoded:
        """LLaVA-style turns -> ids and labels (answer tokens and the turn end only; the rest IGNORE_INDEX).

        The first human turn uses the full template (system + image); later turns continue in the chat format."""
        head, tail = self.prompt.split()
        ids: list[int] = []
        labels: list[int] = []
        boxes: list[Box] = []
        box_segments: list[int] = []
        end = self.config.assistant_end
        first = True
        for i in range(0, len(conversations) - 1, 2):
            human, gpt = conversations[i], conversations[i + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise ValueError("conversations must alternate human / gpt turns")
            qb = self.question_boxes(human["value"])
            boxes += qb
            box_segments += [i // 2 + 1] * len(qb)
            if first:
                prompt_text = self.render(human["value"], lambda q: head + tail.format(question=q))
            else:
                prompt_text = self.render(human["value"], lambda q: self.prompt.turn.format(question=q))
            p = self._expand_image(self._ids(prompt_text))
            a = self._ids(self.convert(gpt["value"]) + end)
            ids += p + a
            labels += [IGNORE_INDEX] * len(p) + a
            first = False
        return Encoded(ids, labels, boxes, box_segments=box_segments)

    def encode_turns(self, conversations: list[dict], max_turns: int | None = None,
                     max_tokens: int | None = None) -> Encoded:
        """LLaVA-style turns as INDEPENDENT questions on one shared [system + image] prefix: every turn is
        written as the runtime writes a follow-up question on a cached image (`PromptFormat.followup`: no
        earlier question or answer in between) and gets the positions right after the prefix; `segments`
        say which turn each token is, so that attention can be limited to prefix + own turn (what
        `train.adapt` builds). One image read, up to `max_turns` questions learned; turns that would pass
        `max_tokens` in all are left out whole."""
        head, tail = self.prompt.split()
        end = self.config.assistant_end
        ids = self._expand_image(self._ids(head))
        n_prefix = len(ids)
        labels = [IGNORE_INDEX] * n_prefix
        segments, positions = [0] * n_prefix, list(range(n_prefix))
        boxes: list[Box] = []
        box_segments: list[int] = []
        pairs = [(conversations[i], conversations[i + 1]) for i in range(0, len(conversations) - 1, 2)]
        for k, (human, gpt) in enumerate(pairs[:max_turns] if max_turns else pairs, start=1):
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise ValueError("conversations must alternate human / gpt turns")
            p = self._ids(self.render(human["value"], lambda q: tail.format(question=q)))
            a = self._ids(self.convert(gpt["value"]) + end)
            if max_tokens is not None and k > 1 and len(ids) + len(p) + len(a) > max_tokens:
                break
            ids += p + a
            labels += [IGNORE_INDEX] * len(p) + a
            segments += [k] * (len(p) + len(a))
            positions += list(range(n_prefix, n_prefix + len(p) + len(a)))
            qb = self.question_boxes(human["value"])
            boxes += qb
            box_segments += [k] * len(qb)
        return Encoded(ids, labels, boxes, segments, positions, box_segments)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        ids = [self.config.eos_token_id]
        if self.config.assistant_end:
            ids += self._ids(self.config.assistant_end)[:1]
        return tuple(sorted(set(i for i in ids if i is not None and i >= 0)))

