"""distplan.profiler: measure this machine for the cost model (``distplan profile``).

- :func:`profile`: the device's compute curves and the link between ranks, as a
  :class:`~distplan.calibration.Calibration` (written with ``out=``).
- :mod:`~distplan.profiler.compute`: the device part (``torch.utils.benchmark`` timings per op class).
- :mod:`~distplan.profiler.links`: the link part (point-to-point and collectives over gloo / NCCL).

torch is imported lazily: ``import distplan.profiler`` stays light until :func:`profile` runs.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["default_kind_name", "default_ranks", "profile"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("distplan.profiler.api"), name)
    raise AttributeError(f"module 'distplan.profiler' has no attribute {name!r}")
