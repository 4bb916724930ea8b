"""Export stage: checkpoint -> bundle (GGUF LLM, ONNX vision + region graphs, optional Core ML, manifest)."""

from chatspot_edge.export.bundle import build_manifest, export_bundle
from chatspot_edge.export.manifest import FORMAT, read_manifest, verify_bundle, write_manifest

__all__ = ["FORMAT", "build_manifest", "export_bundle", "read_manifest", "verify_bundle", "write_manifest"]
