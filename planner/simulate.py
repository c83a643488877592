"""Event-driven simulation of one training iteration of a plan, on the plan's predicted stage costs.

Each stage runs its schedule's fixed order of forward (F) and backward (B) steps:

- GPipe: ``F0 .. F(M-1)`` then ``B0 .. B(M-1)``;
- 1F1B: ``min(S - s - 1, M)`` warm-up forwards, then alternate one forward and one backward, then the
  remaining backwards (``torch.distributed.pipelining.Schedule1F1B``'s order).

A step starts when its device is free and its input has arrived: ``F(s, j)`` needs ``F(s-1, j)`` plus the
activation send, ``B(s, j)`` needs ``B(s+1, j)`` plus the gradient send. Sends are asynchronous (they
delay the receiver, they do not block the sender). After its last backward a stage sums the gradients of
parameters it shares with other stages (tied weights), all-reduces its gradients among its replicas and
runs the optimizer step. All replicas of a stage run in lockstep.

The closed form of ``cost.iteration_time`` (the plan's prediction and the integer program's objective)
bounds this simulation from above: GPipe's phases are exact flow shops, and the only slack is the tail
(the closed form adds the slowest all-reduce + optimizer step after the whole flush, while here each stage
starts them after its own last backward); under 1F1B the closed form also takes ``T + 2c`` of the worst
stage as the steady-state period, an upper bound of the event graph's cycle mean. Tests hold the
simulation within 15% below the prediction on planned and fixed layouts.
"""

from __future__ import annotations

from distplan.errors import PlanError
from distplan.graph import OpGraph, dtype_bytes
from distplan.plan import Plan
from distplan.timeline import Timeline, TimelineEvent

from .cost import optimizer_bytes_per_param

__all__ = ["schedule_order", "simulate"]


def schedule_order(schedule: str, *, stage: int, num_stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order of ``("F"|"B", microbatch)`` steps one stage runs."""
    m = microbatches
    if schedule == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    if schedule != "1f1b":
        raise PlanError(f"the simulator supports schedules gpipe and 1f1b, not {schedule!r}")
    warm = min(num_stages - stage - 1, m)
    order = [("F", j) for j in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    order += [("B", j) for j in range(m - warm, m)]
    return order


def simulate(plan: Plan, graph: OpGraph | None = None) -> Timeline:
    """Simulate one iteration of ``plan``; ``graph`` (optional) gives the parameter dtype for the optimizer
    step (fp32 otherwise)."""
    stages = plan.stages
    n = len(stages)
    m = plan.num_microbatches
    cluster = plan.request.cluster
    devs = cluster.devices()
    elem = dtype_bytes(graph.param_dtype) if graph is not None else 4
    per_param = optimizer_bytes_per_param(plan.request.dtype, plan.request.optimizer)
    orders = [schedule_order(plan.schedule, stage=s, num_stages=n, microbatches=m) for s in range(n)]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * n
    ptr = [0] * n
    raw: list[tuple[int, str, int, float, float]] = []  # stage, kind, microbatch, start, end
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(n):
            while ptr[s] < len(orders[s]):
                step, j = orders[s][ptr[s]]
                st = stages[s]
                if step == "F":
                    dep = 0.0 if s == 0 else done.get(("F", s - 1, j))
                    if dep is not None and s > 0:
                        dep += stages[s - 1].send_time_s
                    dur = st.fwd_time_s
                else:
                    if s == n - 1:
                        dep = done.get(("F", s, j))
                    else:
                        dep = done.get(("B", s + 1, j))
                        if dep is not None:
                            dep += st.grad_send_time_s
                    dur = st.bwd_time_s
                if dep is None:
                    break
                start = max(free[s], dep)
                end = start + dur
                done[step, s, j] = end
                free[s] = end
                raw.append((s, "fwd" if step == "F" else "bwd", j, start, end))
                if step == "F" and s + 1 < n and st.send_time_s > 0:
                    raw.append((s, "send", j, end, end + st.send_time_s))
                if step == "B" and s > 0 and stages[s - 1].grad_send_time_s > 0:
                    raw.append((s, "send", j, end, end + stages[s - 1].grad_send_time_s))
                ptr[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise PlanError("the schedule deadlocks (no stage can make progress); this is a distplan bug")
    for s, st in enumerate(stages):
        t = free[s]
        # The shared-parameter (tied) all-reduce runs first, then the data-parallel one: one event.
        ar = st.tied_allreduce_time_s + st.allreduce_time_s
        if ar > 0:
            raw.append((s, "allreduce", -1, t, t + ar))
            t += ar
        kind = cluster.kinds[st.kind]
        # The cost model's figure (each rank's share under tensor parallelism and sharding); plans made
        # before it was recorded: the stage's parameters at the datasheet bandwidth.
        opt = st.optimizer_time_s or st.param_bytes / elem * per_param / kind.memory_bandwidth_bytes_s
        raw.append((s, "optimizer", -1, t, t + opt))
    events = [
        TimelineEvent(device=d, stage=s, kind=k, microbatch=j, start_s=a, end_s=z)
        for s, k, j, a, z in raw
        for d in stages[s].devices
    ]
    events.sort(key=lambda e: (e.device, e.start_s, e.end_s, e.kind))
    total = max((e.end_s for e in events), default=0.0)
    order = [d for st in stages for d in st.devices]
    busy = sum(e.end_s - e.start_s for e in events if e.kind != "send")
    bubble = 1.0 - busy / (len(order) * total) if total > 0 else 0.0
    labels = tuple(
        f"{devs[d].label} ({devs[d].kind}) stage {s}" for s, st in enumerate(stages) for d in st.devices
    )
    return Timeline(
        events=tuple(events),
        devices=tuple(order),
        labels=labels,
        iteration_time_s=total,
        bubble_fraction=max(0.0, bubble),
    )
