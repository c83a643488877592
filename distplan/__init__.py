"""distplan: automatic pipeline/data-parallel planning of PyTorch models on heterogeneous clusters.

    >>> import distplan
    >>> graph = distplan.trace("gpt-tiny")                      # doctest: +SKIP
    >>> plan = distplan.plan(graph, cluster="a100x8-v100x8", global_batch=64)   # doctest: +SKIP
    >>> report = distplan.validate(plan, "gpt-tiny")          # doctest: +SKIP

Importing ``distplan`` does not import torch: the tracing and lowering entry points load lazily, so the
planner and the service can plan from JSON alone.
"""

from __future__ import annotations

import importlib
from typing import Any

from distplan.calibration import Calibration
from distplan.cluster import Cluster, Device, DeviceKind, Host, Link
from distplan.errors import (
    CalibrationError,
    DistplanError,
    GraphError,
    InfeasiblePlanError,
    LoweringError,
    ModelSpecError,
    PlanError,
    ProfileError,
    TraceError,
    ValidationFailedError,
)
from distplan.graph import OpGraph, OpNode, TensorMeta
from distplan.plan import Plan, PlanRequest, Predictions, RankAssignment, SolverReport, Stage
from distplan.profiles import device_kinds, list_presets, load_cluster
from distplan.timeline import Timeline, TimelineEvent

__version__ = "0.1.0"

# name -> (module, attribute): resolved on first use so `import distplan` stays light.
_LAZY = {
    "trace": ("distplan.tracer", "trace"),
    "simulate": ("distplan.planner", "simulate"),
    "lower": ("distplan.lowering", "lower"),
    "validate": ("distplan.lowering", "validate"),
    "profile": ("distplan.profiler", "profile"),
}

__all__ = [
    "Calibration",
    "CalibrationError",
    "Cluster",
    "Device",
    "DeviceKind",
    "DistplanError",
    "GraphError",
    "Host",
    "InfeasiblePlanError",
    "Link",
    "LoweringError",
    "ModelSpecError",
    "OpGraph",
    "OpNode",
    "Plan",
    "PlanError",
    "PlanRequest",
    "Predictions",
    "ProfileError",
    "RankAssignment",
    "SolverReport",
    "Stage",
    "TensorMeta",
    "Timeline",
    "TimelineEvent",
    "TraceError",
    "ValidationFailedError",
    "device_kinds",
    "list_presets",
    "load_cluster",
    "lower",
    "plan",
    "profile",
    "simulate",
    "trace",
    "validate",
]


def plan(graph: Any, /, **kwargs: Any) -> Plan:
    """Plan ``graph`` on a cluster: :func:`distplan.planner.plan` (see there for the arguments).

    A real function rather than a lazy attribute: ``distplan.plan`` is also the core module that holds
    :class:`Plan`, and once that module is imported (above) the package attribute would be the module, so
    ``distplan.plan(graph, ...)`` would fail with "'module' object is not callable".
    """
    from distplan.planner import plan as _plan

    return _plan(graph, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'distplan' has no attribute {name!r}")
