"""Export stage: checkpoint -> bundle (GGUF LLM, ONNX vision + region graphs, optional Core ML, manifest).

Public API: `export_bundle(ckpt, out, coreml=False, llm_dtype="f16")`, `verify_bundle(bundle) -> manifest`,
`read_manifest(bundle)`, `write_manifest(bundle, manifest)`, `build_manifest(...)`, `FORMAT`.
Names are resolved lazily, so `verify_bundle` / `read_manifest` (the `inspect` command, the runtime) do not
import torch.
"""

from __future__ import annotations

from typing import Any

from chatspot_edge.export.manifest import FORMAT, read_manifest, verify_bundle, write_manifest

__all__ = ["FORMAT", "build_manifest", "export_bundle", "read_manifest", "verify_bundle", "write_manifest"]


def __getattr__(name: str) -> Any:
    if name in ("export_bundle", "build_manifest"):
        from chatspot_edge.export import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
