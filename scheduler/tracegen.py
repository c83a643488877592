"""Seeded synthetic job traces shaped like published GPU-cluster traces.

What the generator reproduces, and from where (the exact numbers are this generator's parameters):

* Sizes: most jobs use one GPU and few use more than eight, with a long tail of large jobs (Jeon et al.,
  "Analysis of Large-Scale Multi-Tenant GPU Clusters for DNN Training Workloads", USENIX ATC 2019, on
  Microsoft's Philly trace; Weng et al., "MLaaS in the Wild", NSDI 2022, on Alibaba PAI). Here each job
  draws a model class (:data:`CATALOGUE`: small language models up to GPT-2 XL, built by
  ``distplan.planner.synthetic`` without torch) and a device request from that class's own distribution,
  so bigger models ask for more devices; requests are capped at the largest pool of the target cluster.
* Durations: heavy-tailed, minutes to many hours (both papers): log-normal nominal durations (median
  ``median_duration_s``, log-sd ``duration_sigma``, clipped to ``[5 min, 24 h]``) of the job alone on its
  requested devices of the cluster's reference pool (its A100-SXM-80G hosts if it has them, else its largest
  pool), turned into training steps with the planner's throughput there (``pricer``; without one, with the
  model's FLOPs at the A100's catalogue peak and efficiency) -- the simulator then runs each job at its
  planned speed on whatever it gets.
* Arrivals: a Poisson process whose rate gives the cluster a nominal ``load``: requested reference-device-
  seconds per second over the cluster's capacity in reference devices (with a ``pricer``, each pool counts
  its devices times its planned speed relative to the reference pool, for the middle model class on one
  device; without one, every device counts one).
* Priorities: three classes, ``high`` / ``normal`` / ``low`` with probabilities ``priority_mix``.
* A fraction ``undeclared`` of jobs does not declare its length (``total_steps`` null; ``run_steps`` holds
  the truth for the simulator), as most jobs in those traces do not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from distplan.cluster import Cluster
from distplan.profiles import device_kinds

from .model import PRIORITIES, GraphSource, JobSet, JobSpec, SchedulerError
from .pricing import Pricer
from .shapes import Pool, pools_of, power_counts

__all__ = ["CATALOGUE", "ModelClass", "generate_trace"]


@dataclass(frozen=True, slots=True)
class ModelClass:
    """A kind of job: its graph (a synthetic transformer), batch, dtype choices and device requests.

    Attributes:
        key: graph key in the trace.
        synthetic: keyword arguments of ``synthetic_transformer``.
        global_batch: samples per step.
        sizes: ``(devices requested, probability)``.
        weight: how often jobs are of this class (relative).
    """

    key: str
    synthetic: Mapping[str, int | str | bool]
    global_batch: int
    sizes: tuple[tuple[int, float], ...]
    weight: float


#: The job classes of generated traces, smallest first.
CATALOGUE: tuple[ModelClass, ...] = (
    ModelClass(
        "lm-tiny", {"layers": 2, "hidden": 256, "heads": 4, "seq": 128, "vocab": 8192}, 32, ((1, 1.0),), 0.25
    ),
    ModelClass(
        "lm-small",
        {"layers": 4, "hidden": 512, "heads": 8, "seq": 256, "vocab": 16384},
        64,
        ((1, 0.6), (2, 0.25), (4, 0.15)),
        0.25,
    ),
    ModelClass(
        "gpt2-small", {"name": "gpt2-small", "seq": 512}, 64, ((1, 0.3), (2, 0.3), (4, 0.25), (8, 0.15)), 0.2
    ),
    ModelClass(
        "gpt2-medium",
        {"layers": 24, "hidden": 1024, "heads": 16, "seq": 1024, "vocab": 50257},
        128,
        ((2, 0.2), (4, 0.4), (8, 0.4)),
        0.15,
    ),
    ModelClass(
        "gpt2-large",
        {"layers": 36, "hidden": 1280, "heads": 20, "seq": 1024, "vocab": 50257},
        128,
        ((4, 0.3), (8, 0.5), (16, 0.2)),
        0.1,
    ),
    ModelClass("gpt2-xl", {"name": "gpt2-xl", "seq": 1024}, 256, ((8, 0.5), (16, 0.35), (32, 0.15)), 0.05),
)

_REFERENCE_KIND = "a100-sxm-80g"


def _flops_per_sample(source: GraphSource) -> float:
    g = source.load()
    tb = g.meta.get("batch", 1)
    tb = tb if isinstance(tb, int) and tb >= 1 else 1
    return sum(n.fwd_flops + (n.bwd_flops or 2 * n.fwd_flops) for n in g.nodes) / tb


def _planned(
    pricer: Pricer, pools: Sequence[Pool], c: ModelClass, graph: object, req: int, dtype: str
) -> float | None:
    """The planner's throughput of a ``req``-device job of class ``c`` on the first pool that fits it."""
    probe = JobSpec("probe", c.key, c.global_batch, dtype=dtype, optimizer="adamw", max_devices=req)
    for pool in pools:
        shape = pool.largest_shape(req)
        if shape is None:
            continue
        price = pricer.price(probe, graph, pool, shape)  # type: ignore[arg-type]
        if price.feasible:
            return price.throughput_samples_s
    return None


def generate_trace(
    num_jobs: int,
    cluster: Cluster,
    *,
    seed: int = 0,
    load: float = 0.9,
    priority_mix: Sequence[float] = (0.15, 0.55, 0.3),
    median_duration_s: float = 1800.0,
    duration_sigma: float = 1.2,
    undeclared: float = 0.2,
    elastic: int = 4,
    bf16: float = 0.8,
    catalogue: Sequence[ModelClass] = CATALOGUE,
    name: str | None = None,
    pricer: Pricer | None = None,
) -> JobSet:
    """A job set of ``num_jobs`` jobs for ``cluster`` (see the module docstring); equal arguments give an
    equal trace.

    Args:
        elastic: a job accepts ``max(1, request // elastic)`` to ``request`` devices.
        bf16: fraction of jobs in bf16 mixed precision (the rest fp32).
        pricer: prices the requested shapes on the reference pool (see the module docstring); its cluster
            must be ``cluster``.

    Raises:
        SchedulerError: an argument is out of range.
    """
    if not 1 <= num_jobs <= 100_000:
        raise SchedulerError(f"num_jobs must be between 1 and 100000, got {num_jobs}")
    if not 0 < load <= 10:
        raise SchedulerError(f"load must be in (0, 10], got {load}")
    if len(priority_mix) != len(PRIORITIES) or any(p < 0 for p in priority_mix) or sum(priority_mix) <= 0:
        raise SchedulerError(
            f"priority_mix must be {len(PRIORITIES)} non-negative weights, got {list(priority_mix)}"
        )
    if not (median_duration_s > 0 and duration_sigma >= 0 and 0 <= undeclared <= 1 and 0 <= bf16 <= 1):
        raise SchedulerError(
            "median_duration_s > 0, duration_sigma >= 0, undeclared and bf16 in [0, 1] required"
        )
    if not (isinstance(elastic, int) and elastic >= 1):
        raise SchedulerError(f"elastic must be an integer >= 1, got {elastic}")
    if pricer is not None and pricer.cluster.to_dict() != cluster.to_dict():
        raise SchedulerError(f"the pricer prices cluster {pricer.cluster.name!r}, not {cluster.name!r}")
    rng = np.random.default_rng(seed)
    pools = pools_of(cluster)
    largest = max(p.num_devices for p in pools)
    ref_pools = sorted(pools, key=lambda p: (p.kind != _REFERENCE_KIND, -p.num_devices, p.index))
    allowed = power_counts(largest)
    ref = device_kinds()[_REFERENCE_KIND]
    classes = list(catalogue)
    cw = np.array([c.weight for c in classes], dtype=np.float64)
    sources = {c.key: GraphSource("synthetic", dict(c.synthetic)) for c in classes}
    fps = {c.key: _flops_per_sample(sources[c.key]) for c in classes}
    graphs = {c.key: sources[c.key].load() for c in classes} if pricer is not None else {}
    pm = np.array(priority_mix, dtype=np.float64) / sum(priority_mix)
    rows = []
    for _ in range(num_jobs):
        c = classes[int(rng.choice(len(classes), p=cw / cw.sum()))]
        sizes, probs = zip(*c.sizes, strict=True)
        req = int(sizes[int(rng.choice(len(sizes), p=np.array(probs) / sum(probs)))])
        req = max(x for x in allowed if x <= min(req, largest))
        dur = float(np.clip(rng.lognormal(math.log(median_duration_s), duration_sigma), 300.0, 86400.0))
        dtype = "bf16" if rng.random() < bf16 else "fp32"
        prio = PRIORITIES[int(rng.choice(len(PRIORITIES), p=pm))]
        declared = rng.random() >= undeclared
        thr = req * ref.flops(dtype) * ref.efficiency / fps[c.key]
        if pricer is not None:
            thr = _planned(pricer, ref_pools, c, graphs[c.key], req, dtype) or thr
        steps = max(1, round(dur * thr / c.global_batch))
        rows.append((c, req, dur, dtype, steps, prio, declared))
    mean_work = float(np.mean([req * dur for _, req, dur, *_ in rows]))
    capacity = float(cluster.num_devices)
    if pricer is not None:
        mid = classes[len(classes) // 2]
        speed = [_planned(pricer, [p], mid, graphs[mid.key], 1, "bf16") or 0.0 for p in pools]
        ref_speed = speed[ref_pools[0].index]
        if ref_speed > 0:
            capacity = sum(p.num_devices * sp / ref_speed for p, sp in zip(pools, speed, strict=True))
    rate = load * capacity / mean_work  # arrivals per second
    t = 0.0
    jobs = []
    for i, (c, req, _dur, dtype, steps, prio, declared) in enumerate(rows):
        if i:
            t += float(rng.exponential(1.0 / rate))
        jobs.append(
            JobSpec(
                id=f"j{i:05d}",
                graph=c.key,
                global_batch=c.global_batch,
                dtype=dtype,
                optimizer="adamw",
                priority=prio,
                min_devices=max(1, req // elastic),
                max_devices=req,
                arrival_s=round(t, 3),
                total_steps=steps if declared else None,
                run_steps=steps,
                name=c.key,
            )
        )
    used = {j.graph for j in jobs}
    return JobSet(
        name=name or f"synthetic-{num_jobs}-s{seed}",
        graphs={k: v for k, v in sources.items() if k in used},
        jobs=tuple(jobs),
        description=(
            f"{num_jobs} jobs, seed {seed}, nominal load {load:g} on {cluster.name} ({cluster.num_devices} devices, "
            f"{capacity:.1f} reference devices), "
            f"median duration {median_duration_s:g} s, priorities {list(priority_mix)}"
        ),
        seed=seed,
    )
