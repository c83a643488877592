"""What one training iteration of a lowered plan took, measured on each rank (:class:`StepTimes`).

The :class:`~distplan.lowering.runtime.Runner` records, for every iteration, the forward and backward of
each microbatch on each of its stages, the loss, the time spent waiting on point-to-point transfers, the
gradient all-reduces, the optimizer step and the whole iteration, so a plan's predictions (per-stage
forward/backward, iteration time) can be set beside what happened.

[Note: how regions are timed]
On a CPU every region is wall time (``time.perf_counter``): the ops run synchronously, so a region's wall
time is its compute. On CUDA a region is bracketed by two ``torch.cuda.Event(enable_timing=True)`` recorded
on the current stream, and the times are read once the iteration's work has finished (:meth:`RegionClock.
read` synchronises), so the measurement does not serialise the GPU inside the iteration. The pipeline
executor (``distplan.lowering.executor``) opens the regions: ``fwd:<stage>`` around each microbatch's stage
forward, ``loss``, ``bwd:<stage>`` around each backward, ``p2p`` around every wait for a receive and the
final wait for the sends; the runner adds ``allreduce`` (gradient synchronisation), ``optimizer`` and
``step`` (the whole :meth:`Runner.step`). A wait for a receive includes the time the sender was still
computing: it is transfer plus bubble, which is what the rank lost to the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distplan.errors import LoweringError
from distplan.plan import Plan
from distplan.ranks import kill_ranks, spawn_ranks

__all__ = [
    "MeasuredRun",
    "RegionClock",
    "StepTimes",
    "measure",
    "step_times",
]


@dataclass(frozen=True, slots=True)
class StepTimes:
    """Measured times of one iteration on one rank, in seconds (see [Note: how regions are timed]).

    Attributes:
        rank: the plan rank.
        stages: the stage indices this rank runs.
        fwd_s / bwd_s: per stage index, the forward / backward time of the stage's program for each
            microbatch (each chunk of one, when a stage's replicas split it) in the order run; the loss is
            separate.
        loss_s: the loss computations' total (ranks running the last stage; else 0).
        p2p_wait_s: time spent waiting on point-to-point sends and receives (transfers and bubbles); None
            where this torch gives no way to see it.
        allreduce_s: gradient synchronisation: shared-parameter and data-parallel all-reduces.
        optimizer_s: the optimizer step (0 before :meth:`Runner.optimizer_step` runs).
        iteration_s: the whole iteration, from the start of ``step`` to the end of the optimizer step.
    """

    rank: int
    stages: tuple[int, ...]
    fwd_s: dict[int, tuple[float, ...]] = field(default_factory=dict)
    bwd_s: dict[int, tuple[float, ...]] = field(default_factory=dict)
    loss_s: float = 0.0
    p2p_wait_s: float | None = None
    allreduce_s: float = 0.0
    optimizer_s: float = 0.0
    iteration_s: float = 0.0

    @property
    def compute_s(self) -> float:
        """Forward, backward and loss time together."""
        return (
            sum(sum(v) for v in self.fwd_s.values()) + sum(sum(v) for v in self.bwd_s.values()) + self.loss_s
        )

    @property
    def untimed_s(self) -> float:
        """The iteration minus every timed region (compute, loss, transfer waits, all-reduces, optimizer):
        what the runtime spent on its own between them."""
        return (
            self.iteration_s - self.compute_s - (self.p2p_wait_s or 0.0) - self.allreduce_s - self.optimizer_s
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "stages": list(self.stages),
            "fwd_s": {str(k): list(v) for k, v in self.fwd_s.items()},
            "bwd_s": {str(k): list(v) for k, v in self.bwd_s.items()},
            "loss_s": self.loss_s,
            "p2p_wait_s": self.p2p_wait_s,
            "allreduce_s": self.allreduce_s,
            "optimizer_s": self.optimizer_s,
            "iteration_s": self.iteration_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepTimes:
        return cls(
            rank=int(d["rank"]),
            stages=tuple(int(s) for s in d["stages"]),
            fwd_s={int(k): tuple(float(x) for x in v) for k, v in d.get("fwd_s", {}).items()},
            bwd_s={int(k): tuple(float(x) for x in v) for k, v in d.get("bwd_s", {}).items()},
            loss_s=float(d.get("loss_s", 0.0)),
            p2p_wait_s=None if d.get("p2p_wait_s") is None else float(d["p2p_wait_s"]),
            allreduce_s=float(d.get("allreduce_s", 0.0)),
            optimizer_s=float(d.get("optimizer_s", 0.0)),
            iteration_s=float(d.get("iteration_s", 0.0)),
        )


class RegionClock:
    """Named time regions of one iteration: wall time on CPU, CUDA events on a GPU (read lazily)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: list[tuple[str, Any]] = []
        self._done: list[tuple[str, Any, Any]] = []

    def reset(self) -> None:
        self._open.clear()
        self._done.clear()

    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Time the enclosed code as one occurrence of region ``name``."""
        start = self._mark()
        try:
            yield
        finally:
            self._done.append((name, start, self._mark()))

    def read(self) -> list[tuple[str, float]]:
        """Every finished region as (name, seconds), in the order they ended."""
        if self.cuda and self._done:
            torch.cuda.synchronize()
            return [(n, a.elapsed_time(b) / 1e3) for n, a, b in self._done]
        return [(n, float(b - a)) for n, a, b in self._done]


def step_times(
    regions: list[tuple[str, float]], *, rank: int, stages: tuple[int, ...], p2p_seen: bool
) -> StepTimes:
    """Fold the regions of one iteration into :class:`StepTimes` (``iteration`` is the whole step)."""
    fwd: dict[int, list[float]] = {s: [] for s in stages}
    bwd: dict[int, list[float]] = {s: [] for s in stages}
    totals = {"loss": 0.0, "p2p": 0.0, "allreduce": 0.0, "optimizer": 0.0, "step": 0.0}
    for name, sec in regions:
        kind, _, idx = name.partition(":")
        if kind == "fwd":
            fwd.setdefault(int(idx), []).append(sec)
        elif kind == "bwd":
            bwd.setdefault(int(idx), []).append(sec)
        elif kind in totals:
            totals[kind] += sec
    return StepTimes(
        rank=rank,
        stages=stages,
        fwd_s={k: tuple(v) for k, v in fwd.items()},
        bwd_s={k: tuple(v) for k, v in bwd.items()},
        loss_s=totals["loss"],
        p2p_wait_s=totals["p2p"] if p2p_seen else None,
        allreduce_s=totals["allreduce"],
        optimizer_s=totals["optimizer"],
        iteration_s=totals["step"] + totals["optimizer"],
    )


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True, slots=True)
class MeasuredRun:
    """Measured iterations of one plan (:func:`measure`).

    Attributes:
        layout: the plan's compact layout.
        steps: ``steps[i][rank]``, the :class:`StepTimes` of measured iteration ``i`` on each rank (the
            warm-up iterations are not kept).
    """

    layout: str
    steps: tuple[tuple[StepTimes, ...], ...]

    @property
    def iteration_s(self) -> float:
        """Median over iterations of the slowest rank's iteration time: an iteration ends when its last
        rank has stepped its optimizer."""
        return statistics.median(max(t.iteration_s for t in ranks) for ranks in self.steps)

    def stage_times(self) -> dict[int, tuple[float, float]]:
        """Per stage, the median forward and backward seconds of one microbatch (over every microbatch,
        replica and iteration)."""
        fwd: dict[int, list[float]] = {}
        bwd: dict[int, list[float]] = {}
        for ranks in self.steps:
            for t in ranks:
                for s, v in t.fwd_s.items():
                    fwd.setdefault(s, []).extend(v)
                for s, v in t.bwd_s.items():
                    bwd.setdefault(s, []).extend(v)
        return {
            s: (statistics.median(fwd[s]) if fwd[s] else 0.0, statistics.median(bwd.get(s) or [0.0]))
            for s in sorted(fwd)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "iteration_s": self.iteration_s,
            "stages": {str(s): {"fwd_s": f, "bwd_s": b} for s, (f, b) in self.stage_times().items()},
            "steps": [[t.to_dict() for t in ranks] for ranks in self.steps],
        }


def measure(
    plan: Plan,
    model: str,
    *,
    seq: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    config_overrides: Mapping[str, Any] | None = None,
    threads: int = 1,
    max_ranks: int | None = None,
    device: str = "cpu",
    timeout_s: float = 600.0,
) -> MeasuredRun:
    """Run ``plan`` for real on this host, one process per rank (gloo on CPU, NCCL on CUDA), and measure it.

    Each rank lowers the plan (:func:`distplan.lowering.lower`), trains ``warmup + steps`` iterations on a
    seeded batch, the ranks starting each iteration together (a barrier), and keeps what each measured
    iteration took (:meth:`Runner.step_times`).

    Args:
        plan: the plan.
        model: the model spec it was made for (built-in name, ``config.json`` or ``package.module:function``).
        seq: sequence length (the tracer's default when None).
        steps / warmup: measured and discarded iterations.
        config_overrides: config fields replaced when building the model.
        threads: compute threads per rank (``OMP_NUM_THREADS``, ``torch.set_num_threads``).
        max_ranks: the most processes to start; default the CPU cores / ``threads`` (on CUDA the GPUs), so
            that ranks do not share a core (times measured under contention say nothing about the plan).
        device: ``cpu`` or ``cuda`` (rank ``r`` on GPU ``r``).
        timeout_s: limit for the whole run.

    Returns:
        A :class:`MeasuredRun`.

    Raises:
        LoweringError: more ranks than ``max_ranks``, a rank that failed (its last lines), the timeout.
    """
    if steps < 1 or warmup < 0:
        raise LoweringError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if device not in ("cpu", "cuda"):
        raise LoweringError(f"device must be 'cpu' or 'cuda', got {device!r}")
    world = plan.world_size
    if device == "cuda":
        gpus = torch.cuda.device_count()
        limit = max_ranks if max_ranks is not None else gpus
        if world > min(limit, gpus):
            raise LoweringError(f"the plan has {world} ranks but this host has {gpus} GPU(s), one per rank")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        limit = max_ranks if max_ranks is not None else max(1, cores // max(1, threads))
        if world > limit:
            raise LoweringError(
                f"the plan has {world} ranks but this host runs at most {limit} without sharing a core "
                f"({cores} cores, {threads} thread(s) per rank); measure a smaller plan or pass max_ranks"
            )

    with tempfile.TemporaryDirectory(prefix="distplan-measure-") as tmp:
        d = Path(tmp)
        cfg = {
            "plan": plan.to_dict(),
            "model": model,
            "seq": seq,
            "steps": steps,
            "warmup": warmup,
            "config_overrides": dict(config_overrides or {}),
            "threads": threads,
            "device": device,
            "out": str(d / "times.json"),
            "timeout_s": timeout_s,
        }
        (d / "config.json").write_text(json.dumps(cfg))
        procs = spawn_ranks("distplan.lowering.timing", d / "config.json", world, d, threads=threads)
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            kill_ranks(procs)
        out = d / "times.json"
        if not out.exists():
            failed = [r for r, p in enumerate(procs) if p.returncode not in (0, -signal.SIGKILL)]
            r = failed[0] if failed else 0
            tail = (d / f"rank{r}.log").read_text(errors="replace").strip().splitlines()[-6:]
            what = "timed out" if time.monotonic() > deadline else f"failed on rank {r}"
            raise LoweringError(f"measuring plan {plan.layout!r} {what}: " + " | ".join(tail)[-1200:])
        data = json.loads(out.read_text())
    return MeasuredRun(
        layout=plan.layout,
        steps=tuple(tuple(StepTimes.from_dict(t) for t in ranks) for ranks in data["steps"]),
    )


def _rank_main(config_path: str) -> int:
    """One rank of :func:`measure` (``python -m distplan.lowering.timing CONFIG``)."""
    from datetime import timedelta

    import torch.distributed as dist

    from distplan.lowering.runtime import lower

    cfg = json.loads(Path(config_path).read_text())
    torch.set_num_threads(int(cfg["threads"]))
    plan = Plan.from_dict(cfg["plan"])
    device = cfg.get("device", "cpu")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=float(cfg["timeout_s"])))
    kw: dict[str, Any] = {"seq": cfg["seq"]} if cfg["seq"] is not None else {}
    runner = lower(
        plan,
        cfg["model"],
        device=device,
        check_graph=False,
        config_overrides=cfg["config_overrides"] or None,
        timeout_s=float(cfg["timeout_s"]),
        **kw,
    )
    batch = runner.source.sample(plan.request.global_batch, seed=0)
    kept: list[dict[str, Any]] = []
    for i in range(int(cfg["warmup"]) + int(cfg["steps"])):
        dist.barrier()
        runner.train_step(batch.args, batch.target, batch.kwargs)
        t = runner.step_times()
        if i >= int(cfg["warmup"]):
            kept.append(t.to_dict())
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, kept)
    if dist.get_rank() == 0:
        by_step = [[gathered[r][i] for r in range(len(gathered))] for i in range(len(kept))]
        Path(cfg["out"]).write_text(json.dumps({"steps": by_step}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
