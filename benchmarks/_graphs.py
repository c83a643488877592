"""Graphs for the planner benchmarks: traced once by ``distplan.tracer`` and cached as JSON under
``benchmarks/results/graphs/``; a torch-free synthetic stand-in only when the tracer is unavailable."""

from __future__ import annotations

import sys
from pathlib import Path

from distplan.graph import OpGraph

CACHE = Path(__file__).resolve().parent / "results" / "graphs"


def load(name: str, seq: int) -> tuple[OpGraph, str]:
    """The graph of built-in model ``name`` at batch 1 x ``seq`` tokens, and where it came from."""
    path = CACHE / f"{name}-s{seq}.json"
    if path.exists():
        return OpGraph.load(path), "traced (cached)"
    try:
        from distplan.tracer import trace
    except ImportError as e:  # the tracer needs torch
        print(f"note: tracer unavailable ({e}); using a synthetic {name}", file=sys.stderr)
        from distplan.planner.synthetic import synthetic_transformer

        return synthetic_transformer(name, seq=seq), "synthetic"
    graph = trace(name, seq=seq)
    CACHE.mkdir(parents=True, exist_ok=True)
    graph.save(path)
    return graph, "traced"
