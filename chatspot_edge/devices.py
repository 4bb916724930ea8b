"""Torch device choice for training and evaluation: "cpu", "cuda" (or "cuda:N"), or "auto" (CUDA when torch
sees a GPU, else the CPU). The runtime (llama.cpp + onnxruntime) is CPU-only and has no device."""

from __future__ import annotations

from chatspot_edge.errors import InputError

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str | None) -> str:
    """"cpu", "cuda", "cuda:N" or "auto" (None: "cpu") -> a torch device string. Asking for CUDA where torch
    sees none is an InputError (a CPU-only torch build, or no GPU)."""
    import torch

    name = (name or "cpu").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: torch {torch.__version__} sees no CUDA device")
        return name
    raise InputError(f"--device {name!r}: choose cpu, cuda or auto")
