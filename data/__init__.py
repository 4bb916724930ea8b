"""Datasets: the SpotWorld synthetic referring generator and a loader for LLaVA-style JSONL splits."""

from chatspot_edge.data.loader import load_image, load_split
from chatspot_edge.data.spotworld import COLORS, GENERATOR_VERSION, SHAPES, SIZES, TASKS, generate, render_scene

__all__ = [
    "COLORS", "GENERATOR_VERSION", "SHAPES", "SIZES", "TASKS",
    "generate", "load_image", "load_split", "render_scene",
]
