"""distplan.scheduler: many training jobs on one mixed cluster, each with its own plan.

Sits above the planner and never imports torch. A job (a traced ``OpGraph``, its batch, dtype, optimizer,
priority, device range) is priced on candidate device sets by the planner (``pricing``), one integer program
per event chooses every job's device set, co-location and preemption together (``allocate``, driven by the
distplan policy in ``policy``), and the :class:`Scheduler` applies the decision with checkpoint-restart costs
and keeps the books as JSON. Baselines from the literature (``baselines``) run on the same scheduler, and
``simulate`` replays a trace (``tracegen`` makes seeded ones) to compare them.

    >>> from distplan.profiles import load_cluster
    >>> from distplan.scheduler import CATALOGUE, generate_trace, make_policy, simulate
    >>> cluster = load_cluster("a100x4-t4x4")
    >>> trace = generate_trace(4, cluster, seed=1, catalogue=CATALOGUE[:1])
    >>> result = simulate(trace, cluster, make_policy("distplan"))
    >>> result.metrics()["finished"]
    4
"""

from __future__ import annotations

from .allocate import AllocationProblem, solve_allocation
from .baselines import FifoPolicy, GavelPolicy, StrictPriorityPolicy, TiresiasPolicy
from .core import Assignment, Decision, JobRecord, Policy, PolicyResult, Pricing, Scheduler, View
from .model import (
    PRIORITIES,
    Allocation,
    Event,
    GraphSource,
    JobSet,
    JobSpec,
    Placement,
    SchedulerError,
    WaitingJob,
)
from .policy import POLICIES, DistplanPolicy, make_policy
from .pricing import Price, Pricer, RestartModel
from .shapes import Placer, Pool, Shape, pools_of
from .simulate import JobOutcome, SimulationResult, simulate
from .tracegen import CATALOGUE, ModelClass, generate_trace

__all__ = [
    "CATALOGUE",
    "POLICIES",
    "PRIORITIES",
    "Allocation",
    "AllocationProblem",
    "Assignment",
    "Decision",
    "DistplanPolicy",
    "Event",
    "FifoPolicy",
    "GavelPolicy",
    "GraphSource",
    "JobOutcome",
    "JobRecord",
    "JobSet",
    "JobSpec",
    "ModelClass",
    "Placement",
    "Placer",
    "Policy",
    "PolicyResult",
    "Pool",
    "Price",
    "Pricer",
    "Pricing",
    "RestartModel",
    "Scheduler",
    "SchedulerError",
    "Shape",
    "SimulationResult",
    "StrictPriorityPolicy",
    "TiresiasPolicy",
    "View",
    "WaitingJob",
    "generate_trace",
    "make_policy",
    "pools_of",
    "simulate",
    "solve_allocation",
]
