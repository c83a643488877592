"""The local executor for real (``distplan.scheduler.executor``): two jobs as ``torchrun`` process groups on CPU
ranks with gloo. A low-priority job runs on two ranks; a high-priority job that needs both arrives while it
runs; the low one checkpoints at the next step and exits, waits while its devices are written free, and
resumes from its checkpoint on another host's single device under a new plan. Its losses, over both
launches, are those of one device that never stopped; the high job's are too (same model and data)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from distplan.cluster import Cluster
from distplan.lowering._model import resolve_source
from distplan.lowering.init import initialize
from distplan.lowering.runtime import _make_optimizer
from distplan.lowering.validation import Tolerance
from distplan.profiles import device_kinds
from distplan.scheduler import DistplanPolicy, JobSpec, Pricer, RestartModel, Scheduler
from distplan.scheduler.executor import JobProgram, LocalExecutor
from distplan.tracer import resolve_model, trace

pytestmark = pytest.mark.slow  # real torchrun process groups

SPEC, SEQ, BATCH, LR = "gpt2-tiny", 32, 16, 1e-3
LOW_STEPS, HIGH_STEPS = 30, 3


def cpu_cluster() -> Cluster:
    """This machine as three CPU "devices": two on host cpu-a, one on host cpu-b."""
    kinds = device_kinds()
    k = kinds["cpu-epyc-2core"].to_dict()
    link = {"bandwidth_gbyte_s": 5, "latency_us": 50}
    return Cluster.from_dict(
        {
            "name": "cpu-3",
            "kinds": [k],
            "hosts": [
                {"name": "cpu-a", "devices": [{"kind": k["name"], "count": 2}], "link": link},
                {"name": "cpu-b", "devices": [{"kind": k["name"], "count": 1}], "link": link},
            ],
            "network": {"bandwidth_gbit_s": 10, "latency_us": 100},
        },
        catalogue=kinds,
    )


def reference(steps: int, *, seed: int = 0) -> list[float]:
    """One device that never stops: the entry point's initialisation, its fixed seeded batch, Adam."""
    bundle = resolve_model(SPEC, batch=1, seq=SEQ, device="meta", seed=seed)
    initialize(bundle.module, seed=seed)
    source = resolve_source(bundle, batch=1, seq=SEQ)
    batch = source.sample(BATCH, seed=seed + 1)
    opt = _make_optimizer("adam", list(bundle.module.parameters()), LR)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = source.loss(source.select(bundle.module(*batch.args, **batch.kwargs)), batch.target)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def test_preempted_job_resumes_on_other_devices_with_the_uninterrupted_losses(tmp_path) -> None:
    torch.manual_seed(0)
    cluster = cpu_cluster()
    graph = trace(SPEC, batch=1, seq=SEQ)
    # Restarts are cheap here (seconds), and a running job moves only for a large gain: once on its new
    # device the low job stays there when the high one finishes.
    pricer = Pricer(cluster, restart=RestartModel(restart_overhead_s=5.0))
    policy = DistplanPolicy(colocation=False, min_gain=0.95)
    start = time.time()  # the executor's clock is the wall clock
    s = Scheduler(cluster, policy, pricer=pricer, graphs={"g": graph}, start_s=start)
    low = JobSpec("low", "g", BATCH, priority="low", min_devices=1, max_devices=2, total_steps=LOW_STEPS)
    high = JobSpec("high", "g", BATCH, priority="high", min_devices=2, max_devices=2, total_steps=HIGH_STEPS)
    s.submit(low, start)
    assert s.record("low").placement.devices == (0, 1)
    arrived: list[int] = []
    reported: dict[str, list[int]] = {}

    def arrive(job_id: str, steps: int) -> None:
        reported.setdefault(job_id, []).append(steps)
        # The high-priority job arrives once the low one has made progress.
        if job_id == "low" and not arrived:
            arrived.append(steps)
            s.submit(high, ex.now())

    ex = LocalExecutor(s, tmp_path, {"g": JobProgram(SPEC, SEQ, lr=LR)}, on_progress=arrive)
    ex.run(timeout_s=900, poll_s=0.05)
    (tmp_path / "launches.json").write_text(json.dumps(ex.to_dict(), indent=1))

    lows = [r for r in ex.launches if r.job_id == "low"]
    highs = [r for r in ex.launches if r.job_id == "high"]
    assert [r.outcome for r in lows] == ["stopped", "finished"], ex.to_dict()
    assert [r.outcome for r in highs] == ["finished"], ex.to_dict()
    first, resumed = lows
    (h,) = highs
    # Preempted mid-run: it stopped after some step k, saved, and resumed at k on other, fewer devices
    # under another plan; the high job took its devices only once its checkpoint was written.
    k = resumed.first_step
    assert 1 <= arrived[0] <= k < LOW_STEPS, (arrived, k)
    assert first.devices == (0, 1) and resumed.devices == (2,) and h.devices == (0, 1)
    assert resumed.plan_id != first.plan_id and resumed.layout != first.layout
    assert first.ended_s is not None and h.started_s >= first.ended_s and resumed.started_s >= first.ended_s
    kinds = [(e.kind, e.job_id) for e in s.events]
    for ev in (("resize", "low"), ("start", "high"), ("finish", "high"), ("finish", "low")):
        assert ev in kinds, kinds
    assert s.record("low").status == s.record("high").status == "finished"
    # Progress was reported as measured, up to the last step (the scheduler extrapolates between reports).
    assert reported["low"][-1] == LOW_STEPS and reported["low"] == sorted(reported["low"])
    assert s.record("low").samples_done >= LOW_STEPS * BATCH and s.record("low").preemptions == 1
    # The numerics: every step of the low job, over both launches, as one device that never stopped.
    ref = reference(LOW_STEPS)
    tol = Tolerance().loss
    got = ex.losses("low")
    assert [step for step, _ in got] == list(range(LOW_STEPS))
    assert [step for step, _ in first.steps] == list(range(k)) and resumed.steps[0][0] == k
    for (step, loss), want in zip(got, ref, strict=True):
        assert loss == pytest.approx(want, rel=tol, abs=1e-6), (step, loss, want)
    assert [loss for _, loss in ex.losses("high")] == pytest.approx(ref[:HIGH_STEPS], rel=tol, abs=1e-6)
