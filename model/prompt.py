"""Prompt format: one template shared by training, export (the manifest's `prompt`) and the runtime.

The rendered prompt is split into segments at `<image>` and `<region>`, so the runtime can feed text tokens
and float embeddings to llama.cpp in separate batches and keep the KV cache of the [system + image] prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatspot_edge.referring import IMAGE_TOKEN

CHATML_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n"
)
CHATML_END = "<|im_end|>"
CHATML_TURN = "\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
# no `<box>` in the system text: every `</box>` in a prompt is a region
DEFAULT_SYSTEM = "You are ChatSpot. Answer questions about the image and its marked regions."
LLAVA_TEMPLATE = "{system} USER: {image}\n{question} ASSISTANT:"
LLAVA_TURN = " USER: {question} ASSISTANT:"
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class PromptFormat:
    """`template` holds `{system}`, `{image}` and `{question}`; `stop` ends an assistant turn; `turn` is the
    text of a later question in a multi-turn chat (after the previous answer and its stop string)."""

    system: str
    template: str
    stop: tuple[str, ...]
    turn: str = ""

    def render(self, question: str) -> str:
        """The full prompt for one question; `<image>` stands where the image embeddings go."""
        return self.template.format(system=self.system, image=IMAGE_TOKEN, question=question)

    def split(self) -> tuple[str, str]:
        """(prefix up to and including `<image>`, suffix template with `{question}`): the prefix is what a
        session keeps in the KV cache across questions."""
        head, tail = self.template.split("{image}", 1)
        return head.format(system=self.system) + IMAGE_TOKEN, tail

    def followup(self, question: str) -> str:
        """Text after the cached prefix for a question on the same image."""
        return self.split()[1].format(question=question)

    def manifest(self) -> dict:
        return {"system": self.system, "template": self.template, "stop": list(self.stop), "turn": self.turn}


def strip_image_token(human_text: str) -> str:
    """LLaVA-style first turns start with `<image>\\n`; the template places the image itself."""
    t = human_text.replace(IMAGE_TOKEN + "\n", "", 1) if human_text.startswith(IMAGE_TOKEN) else human_text
    return t.replace(IMAGE_TOKEN, "").strip()
