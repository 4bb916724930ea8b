"""Trace one `ask` through the runtime, stage by stage, to explain why two machines' greedy answers differ.

    python -m chatspot_edge.evaluation.answer_trace BUNDLE IMAGE QUESTION_JSON OUT.npz [--llm V] [--vision V]
        [--perturb EPS]

QUESTION_JSON is `[question, kind, coords]` (kind: point / box / polygon, coords in original-image pixels, as
`Session.ask` takes them). OUT.npz holds what each stage produced: `pixels` (uint8 [H, W, 3], the vision
graph's input), `crops` (uint8 [R, h, w, 4], when the region graph reads crops), `image_embeds` [1, N, d],
`region_embeds` [R, d], and `logits` [steps, n_vocab] (the LLM's logits before each greedy token); the answer
is printed as JSON. `--perturb EPS` multiplies the image embeddings by (1 + EPS * N(0, 1)) (seeded) before the
LLM reads them: how far a rounding-sized change of one stage's output moves the logits on this machine.
Only the runtime's dependencies are imported, so it runs under qemu-aarch64 as `ask` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


class _Recorder:
    """Wraps a callable stage (vision or region graph): records its first input and its output under names."""

    def __init__(self, inner, record: dict, output: str, first_input: str | None = None,
                 transform=None) -> None:
        self.inner, self.record, self.output, self.first_input, self.transform = inner, record, output, first_input, transform

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if self.first_input:
            self.record[self.first_input] = np.array(args[0], copy=True)
        out = np.asarray(self.inner(*args, **kwargs))
        if self.transform is not None:
            out = self.transform(out)
        self.record[self.output] = np.array(out, copy=True)
        return out


def trace(bundle: Path, image: Path, question: str, kind: str, coords, llm: str | None = None,
          vision: str | None = None, max_tokens: int = 32, threads: int = 2, perturb: float = 0.0) -> tuple[str, dict]:
    """(answer, {stage name: array}) for one greedy ask; see the module docstring for the stages."""
    import chatspot_edge.model.preprocess as preprocess
    from chatspot_edge.runtime import Engine

    record: dict[str, np.ndarray] = {}
    engine = Engine.load(bundle, llm=llm, vision=vision, threads=threads)
    crops_fn = preprocess.region_crops

    def crops(*a, **k):
        out = crops_fn(*a, **k)
        record["crops"] = np.array(out, copy=True)
        return out

    rng = np.random.default_rng(0)
    noise = (lambda x: (x * (1 + perturb * rng.standard_normal(x.shape))).astype(x.dtype)) if perturb else None
    engine.vision = _Recorder(engine.vision, record, "image_embeds", "pixels", transform=noise)
    if engine.region is not None:
        engine.region = _Recorder(engine.region, record, "region_embeds")
    steps: list[np.ndarray] = []
    sample = engine.llm.sample

    def traced_sample(*a, **k):
        steps.append(np.array(engine.llm.logits(), dtype=np.float32, copy=True))
        return sample(*a, **k)

    engine.llm.sample = traced_sample
    preprocess.region_crops = crops
    try:
        session = engine.session(image)
        answer = session.ask(question, max_tokens=max_tokens, stream=False, **{kind: coords})
    finally:
        preprocess.region_crops = crops_fn
        engine.close()
    record["logits"] = np.stack(steps)
    return answer, record


def compare(a: dict, b: dict) -> dict:
    """Where two traces of the same question part: per stage whether it is bit-identical and its largest
    difference (absolute, and relative to the first trace's spread); for the logits, the first step whose
    greedy token differs, the first trace's top-2 margin there, and the largest logit difference before it."""
    out: dict = {"stages": {}}
    for name in ("pixels", "crops", "image_embeds", "region_embeds"):
        if name in a and name in b:
            x, y = a[name].astype(np.float64), b[name].astype(np.float64)
            d = float(np.abs(x - y).max()) if x.shape == y.shape else float("inf")
            out["stages"][name] = {"identical": bool(x.shape == y.shape and np.array_equal(x, y)), "max_abs_diff": d,
                                   "rel_to_spread": d / (float(np.ptp(x)) or 1.0)}
    la, lb = a["logits"], b["logits"]
    n = min(len(la), len(lb))
    diverge = next((i for i in range(n) if int(la[i].argmax()) != int(lb[i].argmax())), None)
    upto = n if diverge is None else diverge + 1
    out["logit_max_abs_diff"] = float(max(np.abs(la[i] - lb[i]).max() for i in range(upto))) if upto else 0.0
    out["diverging_step"] = diverge
    if diverge is not None:
        top = np.sort(la[diverge])[::-1]
        out["top2_margin_at_divergence"] = float(top[0] - top[1])
        out["other_choice_rank"] = int((la[diverge] > la[diverge][int(lb[diverge].argmax())]).sum())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatspot_edge.evaluation.answer_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("question", help='JSON: ["question with {region}", "box", [x1, y1, x2, y2]]')
    p.add_argument("out", type=Path)
    p.add_argument("--llm")
    p.add_argument("--vision")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--perturb", type=float, default=0.0)
    a = p.parse_args(argv)
    question, kind, coords = json.loads(a.question)
    answer, record = trace(a.bundle, a.image, question, kind, coords, a.llm, a.vision, a.max_tokens, a.threads,
                           a.perturb)
    np.savez(a.out, **record)
    print(json.dumps({"answer": answer, "stages": {k: list(v.shape) for k, v in record.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
