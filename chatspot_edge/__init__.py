"""ChatSpot Edge: a referring multimodal LLM exported to GGUF + ONNX / Core ML and run offline on-device."""

__version__ = "0.1.0"
