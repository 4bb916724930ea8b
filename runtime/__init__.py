"""On-device runtime: a bundle's GGUF LLM (llama.cpp) and ONNX / Core ML vision encoder run together.

    from chatspot_edge.runtime import Engine
    engine = Engine.load("bundle/", llm="Q4_K_M", vision="int8")  # threads: measured on this machine
    session = engine.session("photo.jpg")
    for piece in session.ask("What is in this region?", box=(10, 20, 200, 240)):
        print(piece, end="")

Nothing here imports torch.
"""

from chatspot_edge.runtime.engine import Engine, Session, Timings, Turn
from chatspot_edge.runtime.answerer import BundleAnswerer

__all__ = ["Engine", "Session", "Timings", "Turn", "BundleAnswerer"]
