"""distplan.lowering: a :class:`~distplan.plan.Plan` plus the user's model to a runnable
``torch.distributed`` program, and the check that it computes what the single-device model computes.

- :func:`lower` (inside ``torchrun``): this rank's pipeline stage(s), process groups, schedule and optimizer
  as a :class:`Runner`. The model is built on ``meta`` and only this rank's tensors get memory
  (``distplan.lowering.materialize``): from pretrained weights read by name (``distplan.lowering.checkpoint``)
  or the reproducible initialisation (``distplan.lowering.init``); ``Runner.save`` / ``Runner.load`` write
  and resume ``torch.distributed.checkpoint`` folders, under the same plan or another.
- :func:`validate`: run a plan on CPU processes with gloo and compare with one device
  (:class:`ValidationReport`).
- :func:`emit_launcher`: ``plan.json`` + ``train.py`` (the entry point ``distplan.lowering.train``) + the
  ``torchrun`` command per host.
- :func:`split_graph`: the graph surgery (stage modules from a captured graph and cut positions).

Each stage has its own data- and tensor-parallel degree, recomputation and sharding: where every chunk of a
microbatch runs and in which order (``distplan.lowering.parallel``), the schedule executor that runs any
such plan (``distplan.lowering.executor``), tensor parallelism with DTensor on the stage graph
(``distplan.lowering.stages``), recomputation (``distplan.lowering.recompute``), ZeRO-1/2/3 with FSDP2
(``distplan.lowering.sharding``) and the memory a step really takes (``distplan.lowering.memory``).

Models whose output is a structure (dict, tuple, dataclass, ``ModelOutput``) take an ``output=`` selector
(``distplan.lowering.outputs``); keyword inputs with a batch dimension are cut with the positional inputs
(``distplan.lowering.batching``); random ops, batch statistics and buffers written by the forward are found
in the graph and handled by the validation (``distplan.lowering.effects``).

torch is imported lazily, so ``import distplan.lowering`` stays light until one of these is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "LauncherFiles",
    "RankInfo",
    "Runner",
    "StageModule",
    "Tolerance",
    "ValidationReport",
    "emit_launcher",
    "lower",
    "split_graph",
    "validate",
]

_LAZY = {
    "lower": "distplan.lowering.runtime",
    "Runner": "distplan.lowering.runtime",
    "RankInfo": "distplan.lowering.runtime",
    "validate": "distplan.lowering.validation",
    "ValidationReport": "distplan.lowering.validation",
    "Tolerance": "distplan.lowering.validation",
    "emit_launcher": "distplan.lowering.launcher",
    "LauncherFiles": "distplan.lowering.launcher",
    "split_graph": "distplan.lowering.split",
    "StageModule": "distplan.lowering.split",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distplan.lowering' has no attribute {name!r}")
