"""Quantize stage: add quantized LLM / vision variants to a bundle and measure what they cost in quality.

    quantize_bundle(bundle, llm="q8_0,q4_k_m", vision="fp16,int8", coreml=False, force=False)
    quality_report(bundle, out_dir, data=None, checkpoint=None, limit=50, sensitivity=False)

LLM variants come from llama.cpp's own quantizer (`llama_model_quantize`) applied to the bundle's F32 / F16
GGUF; vision variants from onnxruntime's quantizer (static QDQ per-channel int8 calibrated on SpotWorld
images, or dynamic int8) and its fp16 converter; Core ML variants from coremltools.optimize. Variants are
recorded in the manifest (`llm_variants`, `vision_variants`, `coreml_variants`) with checksums; the
default `llm` / `vision` entries stay full precision and `recommended` names the measured best default.
Names resolve lazily so importing this package pulls in neither torch nor onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["quantize_bundle", "quality_report", "LLM_TYPES", "VISION_PRECISIONS"]


def __getattr__(name: str) -> Any:
    if name == "quantize_bundle":
        from chatspot_edge.quantize.variants import quantize_bundle

        return quantize_bundle
    if name == "quality_report":
        from chatspot_edge.quantize.report import quality_report

        return quality_report
    if name == "LLM_TYPES":
        from chatspot_edge.quantize.llm import LLM_TYPES

        return LLM_TYPES
    if name == "VISION_PRECISIONS":
        from chatspot_edge.quantize.vision import VISION_PRECISIONS

        return VISION_PRECISIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
