"""distplan.planner: partition a traced graph into pipeline stages and place them on a (mixed) cluster.

Plans from ``OpGraph`` JSON alone; never imports torch.

    >>> from distplan.planner import plan, simulate
    >>> from distplan.planner.synthetic import synthetic_transformer
    >>> g = synthetic_transformer(layers=4, hidden=512, heads=8, seq=256, vocab=1000)
    >>> p = plan(g, cluster="a100x4-t4x4", global_batch=8, time_limit_s=2)
    >>> round(simulate(p).iteration_time_s / p.predictions.iteration_time_s, 1)
    1.0
"""

from __future__ import annotations

from .api import plan
from .baselines import BASELINES, baselines
from .coarsen import Blocks, coarsen
from .cost import CostModel, CostOptions
from .evaluate import StageSpec, evaluate
from .ilp import SolverProgress
from .simulate import simulate

__all__ = [
    "BASELINES",
    "Blocks",
    "CostModel",
    "CostOptions",
    "SolverProgress",
    "StageSpec",
    "baselines",
    "coarsen",
    "evaluate",
    "plan",
    "simulate",
]
