"""ChatSpot evaluation protocol (SPEC section 6) for checkpoints and bundles."""

from __future__ import annotations

import json
from pathlib import Path

from chatspot_edge.errors import InputError
from chatspot_edge.evaluation.protocol import METRIC_KEYS, Answerer, Request, evaluate

__all__ = ["METRIC_KEYS", "Answerer", "Request", "evaluate", "evaluate_path", "make_answerer"]


def make_answerer(model_path: Path, batch_size: int = 16, llm: str | None = None,
                  vision: str | None = None, device: str = "cpu") -> Answerer:
    """A checkpoint folder -> TorchAnswerer on `device` (cpu, cuda or auto; fp32); a bundle folder
    (manifest.json) -> the runtime's answerer (CPU), with the bundle's LLM / vision variants `llm` / `vision`
    (default: the manifest's defaults)."""
    from chatspot_edge.devices import resolve_device

    model_path = Path(model_path)
    if (model_path / "manifest.json").is_file():
        from chatspot_edge.runtime import BundleAnswerer

        if device not in ("cpu", "auto"):
            raise InputError(f"--device {device}: a bundle runs on the CPU runtime (llama.cpp + onnxruntime); "
                             "--device chooses where a checkpoint runs")

        return BundleAnswerer(model_path, llm=llm, vision=vision)
    if llm or vision:
        raise InputError(f"{model_path}: --llm / --vision choose variants of a bundle, not of a checkpoint")
    from chatspot_edge.evaluation.answerers import TorchAnswerer
    from chatspot_edge.model.checkpoint import load_checkpoint

    device = resolve_device(device)
    model, tok = load_checkpoint(model_path)
    return TorchAnswerer(model, tok, batch_size=batch_size, device=device)


def evaluate_path(model_path: Path, data: Path, out: Path, split: str = "test", limit: int | None = None,
                  batch_size: int = 16, seed: int = 0, llm: str | None = None, vision: str | None = None,
                  device: str = "cpu") -> dict:
    from chatspot_edge.data import load_image, load_split
    from chatspot_edge.files import atomic_write_text
    from chatspot_edge.progress import task_progress

    from chatspot_edge.devices import resolve_device

    resolve_device(device)  # a device this machine lacks fails before any work
    records = load_split(data, split)
    if limit:
        records = records[:limit]
    if not records:
        raise InputError(f"{data}: no {split} records")
    answerer = make_answerer(model_path, batch_size, llm=llm, vision=vision, device=device)
    with task_progress("eval") as progress:
        result = evaluate(answerer, records, lambda r: load_image(data, r), seed=seed, progress=progress)
    result["model"] = str(model_path)
    if getattr(answerer, "device", None) is not None:
        result["device"] = str(answerer.device)
    if llm or vision:
        result["variant"] = {"llm": llm or "default", "vision": vision or "default"}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result
