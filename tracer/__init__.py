"""distplan.tracer: a PyTorch model to an annotated :class:`~distplan.graph.OpGraph`.

    >>> from distplan.tracer import trace
    >>> graph = trace("llama-7b", seq=2048)            # doctest: +SKIP  (meta device: no weights allocated)

Parts: :mod:`~distplan.tracer.zoo` (model specs: built-in zoo, Hugging Face configs, factories),
:mod:`~distplan.tracer.capture` (``torch.export`` / ``torch.fx``; refuses custom autograd Functions whose
backward a graph cannot keep), :mod:`~distplan.tracer.annotate` (FLOPs, bytes, activation memory per node),
:mod:`~distplan.tracer.flops` (FLOP formulas torch lacks: grouped expert matmuls and other contractions),
:mod:`~distplan.tracer.tensor_parallel` (what a tensor-parallel group can split: ``OpGraph.tensor_parallel``).
Its commands (``distplan trace``, ``distplan models``) are :mod:`distplan.presentation.trace_cli`, outside
this package, whose import loads torch.
"""

from __future__ import annotations

from distplan.tracer.annotate import graph_from_capture
from distplan.tracer.api import trace, trace_bundle
from distplan.tracer.capture import Capture, capture
from distplan.tracer.zoo import ModelBundle, ModelInfo, ModelKind, list_models, resolve_model

__all__ = [
    "Capture",
    "ModelBundle",
    "ModelInfo",
    "ModelKind",
    "capture",
    "graph_from_capture",
    "list_models",
    "resolve_model",
    "trace",
    "trace_bundle",
]
