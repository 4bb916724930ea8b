"""Answerers: the same evaluation code scores a torch checkpoint or an exported bundle."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from chatspot_edge.evaluation.protocol import Request
from chatspot_edge.model.preprocess import region_crops, resize_pixels
from chatspot_edge.model.processor import Processor


class TorchAnswerer:
    """Greedy answers of a `ChatSpotModel` in PyTorch, batched (left padding). Pixels go to the model's device:
    `device` moves the model there first (None: wherever the model is). `autocast`: e.g. torch.bfloat16."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_new_tokens: int = 40,
                 autocast: torch.dtype | None = None, device: str | torch.device | None = None):
        if device is not None:
            model = model.to(device)
        self.device = next(model.parameters()).device
        self.model = model.eval()
        self.proc = Processor(tokenizer, model.config)
        self.referring = self.proc.referring  # the format of its grounding answers
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.autocast = autocast
        self._pixels: OrderedDict[str, np.ndarray] = OrderedDict()
        cfg = model.config
        self.crop_size = cfg.region_crop_size if cfg.region_token and cfg.region_crop == "original" else None

    def _image(self, req: Request) -> np.ndarray:
        if req.image_key not in self._pixels:
            self._pixels[req.image_key] = resize_pixels(req.image(), self.model.config.vision.image_size)
            while len(self._pixels) > 256:
                self._pixels.popitem(last=False)
        return self._pixels[req.image_key]

    def _crops(self, reqs: Sequence[Request], encs) -> torch.Tensor | None:
        """Region crops of every request's boxes, in order (models that read the original image)."""
        if self.crop_size is None:
            return None
        parts = [region_crops(r.image(), e.boxes, self.crop_size) for r, e in zip(reqs, encs) if e.boxes]
        h, w = self.crop_size
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros((0, h, w, 4), np.uint8)).to(self.device)

    def answer(self, requests: Sequence[Request]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i:i + self.batch_size]
            encs = [self.proc.encode_prompt(r.question) for r in chunk]
            pixels = torch.from_numpy(np.stack([self._image(r) for r in chunk])).to(self.device)
            kind = self.device.type  # autocast takes "cuda", not "cuda:0"
            ctx = (torch.autocast(kind, dtype=self.autocast) if self.autocast is not None
                   else torch.autocast(kind, enabled=False))
            with ctx:
                ids = self.model.generate([e.ids for e in encs], pixels, [e.boxes for e in encs],
                                          max_new_tokens=self.max_new_tokens, stop_ids=self.proc.stop_ids,
                                          crops=self._crops(chunk, encs))
            out += [self.proc.decode(x).strip() for x in ids]
        return out
