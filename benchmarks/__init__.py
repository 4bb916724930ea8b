"""Benchmark stage: latency, memory and size of a bundle's variants, a PyTorch reference, merged reports.

Public API (resolved lazily, so importing the package is free):
`run_bench(bundle, out_json, variants=None, threads=(2,), repeats=5, ...) -> dict`, `format_table(result) -> str`
(Markdown), `write_report(json_paths, out_dir)`. The GPU reference is `benchmarks/gpu_reference.py`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_table", "run_bench", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("run_bench", "format_table"):
        from chatspot_edge.benchmarks import bench

        return getattr(bench, name)
    if name == "write_report":
        from chatspot_edge.benchmarks.report import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
