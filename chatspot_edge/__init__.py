"""ChatSpot Edge: a referring multimodal LLM exported to GGUF + ONNX / Core ML and run offline on-device.

Importing the package changes nothing in the process: the OpenMP wait policy is set only by the commands that
load torch (`chatspot_edge.openmp`), so the runtime's llama.cpp keeps OpenMP's default (spinning) barriers.
"""

__version__ = "0.1.0"
