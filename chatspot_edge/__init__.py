"""ChatSpot Edge: a referring multimodal LLM exported to GGUF + ONNX / Core ML and run offline on-device."""

import os

# torch ships its own OpenMP runtime and llama.cpp uses the system one. With the default (active) wait policy
# their idle threads spin and starve each other when both live in one process: measured 100-500x slowdowns
# of llama.cpp decode and torch convolutions on 2 cores. PASSIVE costs one wake-up per parallel region.
# It must be set before either library starts its thread pool, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
