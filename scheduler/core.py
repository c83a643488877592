"""The :class:`Scheduler`: jobs in, allocations out, one decision per event, over a state that is JSON.

The scheduler keeps the books (who waits, who runs where with which plan, progress, waiting and service
times, checkpoints) and asks its :class:`Policy` for a new allocation at every event: ``submit``, ``finish``,
``cancel``, ``fail`` and ``tick`` (a time the policy asked to be woken at, :meth:`Scheduler.next_tick`). It
applies the answer with the restart model of ``distplan.scheduler.pricing``: a job that keeps its devices
and plan goes on; one that changes saves a checkpoint on its old devices (which stay busy until the save
ends), loads it on the new ones and restarts; a stopped job saves and waits. Everything is recorded as
:class:`~distplan.scheduler.model.Event` s with a reason, and every decision's wall time is kept.

The same object serves the simulator (``distplan.scheduler.simulate``), the CLI, and later the service and
a real executor: a REST layer calls ``submit``/``cancel``/``allocation``, an executor reports ``finish``,
``fail`` and ``report_progress`` and reads :meth:`Scheduler.plan` for the plan to launch; :meth:`to_dict`
and :meth:`Scheduler.from_dict` persist and restore the whole state.

[Note: progress]
A running job makes ``Placement.throughput_samples_s`` samples per second from ``progress_from_s`` on (after
its checkpoint load and restart). Service is counted from ``since_s``: ``attained_device_s`` (devices x
seconds, Tiresias's two-dimensional attained service) and ``service_s`` per pool (Gavel's time received
per accelerator type). Waiting time is time submitted and not holding devices.

[Note: pricing off the decision path]
A model seen for the first time costs planner calls (about a second per device-set shape here, tens of
seconds for a large model on many shapes). They are made when the job is *submitted*, not when a decision
needs them: :meth:`Scheduler.submit` asks the policy to price every shape it may consult
(:meth:`Policy.prepare`) before anything is decided, and records what that cost (:class:`Pricing`); the
decisions then find every price in the cache, so their wall time is the allocation alone. The service goes
one step further and prices in its worker processes before it submits (``distplan.service``), so a
submission never waits for the planner in the API process either. Prices do not depend on when they are
computed (the planner's work is deterministic, see [Note: pricing] in ``distplan.scheduler.pricing``), so
decisions are the same whichever way they were priced. A decision that still misses the cache (a policy
that asks for a shape its ``prepare`` did not price) plans it there and counts it in
``Decision.planner_calls``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from distplan.cluster import Cluster
from distplan.graph import OpGraph
from distplan.plan import Plan

from .model import Allocation, Event, GraphSource, JobSpec, Placement, SchedulerError, WaitingJob
from .pricing import Price, Pricer, global_layout, plan_on_devices
from .shapes import Placer, Pool, Shape, pools_of

__all__ = [
    "Assignment",
    "Decision",
    "JobRecord",
    "Policy",
    "PolicyResult",
    "Pricing",
    "Scheduler",
    "View",
]

STATE_SCHEMA_VERSION = 1
_E = SchedulerError


@dataclass(slots=True)
class JobRecord:
    """The scheduler's books on one job (mutable; serialised with the state).

    Attributes:
        spec: the job as submitted.
        status: ``waiting``, ``running``, ``finished`` or ``cancelled``.
        submitted_s: when it was submitted.
        samples_done: progress (see [Note: progress]).
        attained_device_s / executed_s: devices x seconds held, and seconds held.
        service_s: seconds held per pool index.
        wait_since_s: start of the current wait (None while running or done).
        total_wait_s / longest_wait_s: all waiting so far, and the longest single wait (current one included
            once it ends).
        first_start_s / finish_s: when it first got devices, and when it finished.
        placement / shape / price: where it runs, its shape, and the (solo) price of that shape.
        has_checkpoint: it ran before, so a start must load a checkpoint.
        preemptions: times the scheduler stopped, moved or resized it.
        aged: the distplan policy moved it up for waiting past its ageing bound.
        data: per-policy scratch values (JSON-ready), e.g. a Tiresias queue.
    """

    spec: JobSpec
    status: str = "waiting"
    submitted_s: float = 0.0
    samples_done: float = 0.0
    attained_device_s: float = 0.0
    executed_s: float = 0.0
    service_s: dict[int, float] = field(default_factory=dict)
    wait_since_s: float | None = None
    total_wait_s: float = 0.0
    longest_wait_s: float = 0.0
    first_start_s: float | None = None
    finish_s: float | None = None
    placement: Placement | None = None
    shape: Shape | None = None
    price: Price | None = None
    has_checkpoint: bool = False
    preemptions: int = 0
    aged: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def active(self) -> bool:
        return self.status in ("waiting", "running")

    def current_wait(self, now: float) -> float:
        return 0.0 if self.wait_since_s is None else max(0.0, now - self.wait_since_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "status": self.status,
            "submitted_s": self.submitted_s,
            "samples_done": self.samples_done,
            "attained_device_s": self.attained_device_s,
            "executed_s": self.executed_s,
            "service_s": {str(k): v for k, v in sorted(self.service_s.items())},
            "wait_since_s": self.wait_since_s,
            "total_wait_s": self.total_wait_s,
            "longest_wait_s": self.longest_wait_s,
            "first_start_s": self.first_start_s,
            "finish_s": self.finish_s,
            "placement": None if self.placement is None else self.placement.to_dict(),
            "shape": None if self.shape is None else [self.shape.pool, self.shape.per_host, self.shape.hosts],
            "price": None if self.price is None else self.price.to_dict(),
            "has_checkpoint": self.has_checkpoint,
            "preemptions": self.preemptions,
            "aged": self.aged,
            "data": dict(self.data),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobRecord:
        try:
            shape = d.get("shape")
            return cls(
                spec=JobSpec.from_dict(d["spec"]),
                status=str(d["status"]),
                submitted_s=float(d["submitted_s"]),
                samples_done=float(d["samples_done"]),
                attained_device_s=float(d["attained_device_s"]),
                executed_s=float(d["executed_s"]),
                service_s={int(k): float(v) for k, v in d.get("service_s", {}).items()},
                wait_since_s=None if d.get("wait_since_s") is None else float(d["wait_since_s"]),
                total_wait_s=float(d["total_wait_s"]),
                longest_wait_s=float(d["longest_wait_s"]),
                first_start_s=None if d.get("first_start_s") is None else float(d["first_start_s"]),
                finish_s=None if d.get("finish_s") is None else float(d["finish_s"]),
                placement=None if d.get("placement") is None else Placement.from_dict(d["placement"]),
                shape=None if shape is None else Shape(int(shape[0]), int(shape[1]), int(shape[2])),
                price=None if d.get("price") is None else Price.from_dict(d["price"]),
                has_checkpoint=bool(d["has_checkpoint"]),
                preemptions=int(d["preemptions"]),
                aged=bool(d["aged"]),
                data=dict(d.get("data", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            if isinstance(e, SchedulerError):
                raise
            raise _E(f"scheduler state: bad job record ({type(e).__name__}: {e})") from e


@dataclass(frozen=True, slots=True)
class Assignment:
    """A policy's answer for one job: a shape, the devices, the shape's price, and a co-location partner
    with the resulting slowdown (1.0 alone)."""

    shape: Shape
    devices: tuple[int, ...]
    price: Price
    colocated_with: str | None = None
    slowdown: float = 1.0

    def __post_init__(self) -> None:
        if not self.price.feasible or self.price.plan is None:
            raise _E(f"assignment on shape {self.price.key}: the price is infeasible ({self.price.reason})")
        if len(self.devices) != self.shape.devices:
            raise _E(f"assignment: shape of {self.shape.devices} devices given {len(self.devices)}")
        if self.slowdown < 1.0:
            raise _E(f"assignment: slowdown must be >= 1, got {self.slowdown}")


@dataclass(slots=True)
class PolicyResult:
    """A policy's decision: assignments for the jobs that run, a reason for each job that waits, notes
    (solver status, objective) and events of its own (e.g. ageing)."""

    assignments: dict[str, Assignment] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


class View:
    """What a policy sees at a decision: the time, the cluster's pools, the active jobs (submission order),
    their graphs, the pricer and free-device helpers."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.now = scheduler.now
        self.cluster = scheduler.cluster
        self.pools = scheduler.pools
        self.pricer = scheduler.pricer
        self.records = [r for r in scheduler.jobs.values() if r.active]
        self._graphs = scheduler.graphs

    def graph(self, rec: JobRecord) -> OpGraph:
        return self._graphs[rec.spec.graph]

    def running(self) -> list[JobRecord]:
        return [r for r in self.records if r.running]

    def waiting(self) -> list[JobRecord]:
        return [r for r in self.records if r.status == "waiting"]

    def placer(self, busy: Sequence[int] = ()) -> Placer:
        """A placer over every device, ``busy`` ones taken."""
        return Placer(self.pools, busy)

    def price(self, rec: JobRecord, shape: Shape) -> Price:
        return self.pricer.price(rec.spec, self.graph(rec), self.pools[shape.pool], shape)


class Policy:
    """A scheduling policy: ``decide`` maps a :class:`View` to a :class:`PolicyResult` (deterministically);
    ``next_tick`` names the next time it wants to decide again without an event (None: never)."""

    name = "policy"

    def decide(self, view: View) -> PolicyResult:
        raise NotImplementedError

    def next_tick(self, view: View) -> float | None:
        return None

    def prepare(self, pricer: Pricer, job: JobSpec, graph: OpGraph, pools: Sequence[Pool]) -> None:
        """Price every shape :meth:`decide` may ask about for ``job`` (see [Note: pricing off the decision
        path]); the default is the job's elastic options (``Pricer.options``). A policy that asks for other
        shapes prices those."""
        pricer.options(job, graph, pools)

    def params(self) -> dict[str, Any]:
        """The constructor arguments, JSON-ready (saved with the scheduler state)."""
        return {}


@dataclass(frozen=True, slots=True)
class Pricing:
    """The pricing of one job's shapes when it was submitted: planner calls (cache misses) and their wall
    seconds, and the shapes looked up in all (hits included)."""

    job_id: str
    time_s: float
    planner_calls: int
    seconds: float
    lookups: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "time_s": self.time_s,
            "planner_calls": self.planner_calls,
            "seconds": self.seconds,
            "lookups": self.lookups,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pricing:
        return cls(
            job_id=str(d["job_id"]),
            time_s=float(d["time_s"]),
            planner_calls=int(d["planner_calls"]),
            seconds=float(d["seconds"]),
            lookups=int(d.get("lookups", 0)),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision: when, what triggered it, the changes (events), its wall time and how much of it was
    pricing (planner calls on cache misses), and the policy's notes."""

    time_s: float
    trigger: str
    changes: tuple[Event, ...]
    seconds: float
    pricing_seconds: float
    planner_calls: int
    active_jobs: int
    info: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "trigger": self.trigger,
            "changes": [e.to_dict() for e in self.changes],
            "seconds": self.seconds,
            "pricing_seconds": self.pricing_seconds,
            "planner_calls": self.planner_calls,
            "active_jobs": self.active_jobs,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Decision:
        return cls(
            time_s=float(d["time_s"]),
            trigger=str(d["trigger"]),
            changes=tuple(Event.from_dict(e) for e in d.get("changes", [])),
            seconds=float(d["seconds"]),
            pricing_seconds=float(d["pricing_seconds"]),
            planner_calls=int(d["planner_calls"]),
            active_jobs=int(d["active_jobs"]),
            info=dict(d.get("info", {})),
        )


class Scheduler:
    """Jobs on one cluster under one policy (see the module docstring).

    Args:
        cluster: the cluster.
        policy: the policy (``distplan.scheduler.policy.make_policy`` builds one by name).
        pricer: prices shapes (default: a fresh :class:`~distplan.scheduler.pricing.Pricer` of ``cluster``).
        graphs: graph key -> OpGraph for the jobs that will be submitted (more can come with ``submit``).
        sources: graph key -> :class:`GraphSource`, kept in the state so a restored scheduler can rebuild
            the graphs without the caller (inline copies are stored for graphs given without a source).
        start_s: the clock at creation.
        keep_decisions: keep every decision in :attr:`decisions` (their wall times feed the metrics); the
            last one is kept in :attr:`last_decision` either way (its reasons explain who waits).
    """

    def __init__(
        self,
        cluster: Cluster,
        policy: Policy,
        *,
        pricer: Pricer | None = None,
        graphs: Mapping[str, OpGraph] | None = None,
        sources: Mapping[str, GraphSource] | None = None,
        start_s: float = 0.0,
        keep_decisions: bool = True,
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.pricer = pricer if pricer is not None else Pricer(cluster)
        if self.pricer.cluster is not cluster and self.pricer.cluster.to_dict() != cluster.to_dict():
            raise _E(f"the pricer prices cluster {self.pricer.cluster.name!r}, not {cluster.name!r}")
        self.pools: tuple[Pool, ...] = pools_of(cluster)
        self._devices = cluster.devices()
        self.graphs: dict[str, OpGraph] = dict(graphs or {})
        self.sources: dict[str, GraphSource] = dict(sources or {})
        self.jobs: dict[str, JobRecord] = {}
        self.events: list[Event] = []
        self.decisions: list[Decision] = []
        self.last_decision: Decision | None = None
        self.pricings: list[Pricing] = []
        self.keep_decisions = keep_decisions
        self.drain_until: dict[int, float] = {}
        self.busy_device_s = 0.0
        self.now = float(start_s)

    # ------------------------------------------------------------------ events in
    def prepare(self, job: JobSpec, graph: OpGraph | None = None) -> Pricing:
        """Price the job's shapes now, outside any decision (see [Note: pricing off the decision path]);
        :meth:`submit` calls it. Safe to call ahead, e.g. when a job is announced; the prices are cached.

        Raises:
            SchedulerError: the job's graph is unknown and not given.
        """
        g = graph if graph is not None else self.graphs.get(job.graph)
        if g is None:
            raise _E(
                f"job {job.id!r}: graph {job.graph!r} is unknown (pass graph=... or give it at creation)"
            )
        calls, secs, looked = self.pricer.calls, self.pricer.seconds, self.pricer.calls + self.pricer.hits
        self.policy.prepare(self.pricer, job, g, self.pools)
        return Pricing(
            job.id,
            self.now,
            self.pricer.calls - calls,
            self.pricer.seconds - secs,
            self.pricer.calls + self.pricer.hits - looked,
        )

    def submit(
        self,
        job: JobSpec,
        now: float | None = None,
        *,
        graph: OpGraph | None = None,
        decide: bool = True,
        source: GraphSource | None = None,
    ) -> Decision | None:
        """Add a job (at ``now``, default its arrival time), price its shapes (:meth:`prepare`) and decide.

        Args:
            graph: the job's graph, when the scheduler does not know ``job.graph`` yet.
            source: where that graph comes from, kept in the state (default: an inline copy).
            decide: decide now (else the caller calls :meth:`decide`, e.g. after several events).

        Raises:
            SchedulerError: a job with that id exists, or its graph is unknown and not given.
        """
        t = job.arrival_s if now is None else now
        self.advance(t)
        if job.id in self.jobs:
            raise _E(f"job {job.id!r} was already submitted")
        if graph is not None:
            self.graphs[job.graph] = graph
            if source is not None:
                self.sources[job.graph] = source
            self.sources.setdefault(job.graph, GraphSource("graph", {"graph": graph.to_dict()}))
        if job.graph not in self.graphs:
            raise _E(
                f"job {job.id!r}: graph {job.graph!r} is unknown (pass graph=... or give it at creation)"
            )
        self.pricings.append(self.prepare(job))
        self.jobs[job.id] = JobRecord(job, submitted_s=t, wait_since_s=t)
        self.events.append(
            Event(t, "arrival", job.id, f"{job.priority} job, {job.min_devices}-{job.max_devices} devices")
        )
        return self.decide(t, f"arrival {job.id}") if decide else None

    def finish(self, job_id: str, now: float, *, decide: bool = True) -> Decision | None:
        """A running job completed: free its devices and decide."""
        rec = self._get(job_id)
        self.advance(now)
        if not rec.running:
            raise _E(f"job {job_id!r} is {rec.status}, it cannot finish")
        rec.status = "finished"
        rec.finish_s = now
        rec.placement, rec.shape, rec.price = None, None, None
        self.events.append(Event(now, "finish", job_id, f"after {now - rec.submitted_s:.0f} s"))
        return self.decide(now, f"finish {job_id}") if decide else None

    def cancel(self, job_id: str, now: float, *, decide: bool = True) -> Decision | None:
        """The user withdrew a job: free its devices (no checkpoint) and decide."""
        rec = self._get(job_id)
        self.advance(now)
        if not rec.active:
            raise _E(f"job {job_id!r} is {rec.status}, it cannot be cancelled")
        self._end_wait(rec, now)
        rec.status = "cancelled"
        rec.finish_s = now
        rec.placement, rec.shape, rec.price = None, None, None
        self.events.append(Event(now, "cancel", job_id, "cancelled by its user"))
        return self.decide(now, f"cancel {job_id}") if decide else None

    def fail(self, job_id: str, now: float, *, decide: bool = True) -> Decision | None:
        """A running job crashed: it waits again and resumes from its checkpoint (the simulator does not
        model progress lost since the last checkpoint)."""
        rec = self._get(job_id)
        self.advance(now)
        if not rec.running:
            raise _E(f"job {job_id!r} is {rec.status}, it cannot fail")
        rec.status = "waiting"
        rec.placement, rec.shape, rec.price = None, None, None
        rec.wait_since_s = now
        rec.has_checkpoint = True
        self.events.append(Event(now, "fail", job_id, "crashed; resumes from its checkpoint"))
        return self.decide(now, f"fail {job_id}") if decide else None

    def tick(self, now: float) -> Decision:
        """Decide at a time the policy asked for (:meth:`next_tick`) or any other time."""
        self.advance(now)
        return self.decide(now, "tick")

    def report_progress(self, job_id: str, samples_done: float, now: float) -> None:
        """An executor's measured progress replaces the scheduler's estimate."""
        rec = self._get(job_id)
        self.advance(now)
        if samples_done < 0:
            raise _E(f"job {job_id!r}: progress must be >= 0 samples, got {samples_done}")
        rec.samples_done = float(samples_done)

    def next_tick(self) -> float | None:
        """The next time the policy wants to decide without an event (None: only at events)."""
        t = self.policy.next_tick(View(self))
        return None if t is None else max(t, self.now)

    # ------------------------------------------------------------------ time
    def advance(self, now: float) -> None:
        """Move the clock to ``now``, accounting progress and service (see [Note: progress])."""
        if now < self.now - 1e-9:
            raise _E(f"time runs forwards: asked to go to {now:g} s, the scheduler is at {self.now:g} s")
        dt = now - self.now
        if dt <= 0:
            return
        busy: set[int] = set()
        for rec in self.jobs.values():
            if not rec.running or rec.placement is None:
                continue
            pl = rec.placement
            busy.update(pl.devices)
            rec.attained_device_s += len(pl.devices) * dt
            rec.executed_s += dt
            if rec.shape is not None:
                rec.service_s[rec.shape.pool] = rec.service_s.get(rec.shape.pool, 0.0) + dt
            start = max(self.now, pl.progress_from_s)
            if now > start:
                rec.samples_done += pl.throughput_samples_s * (now - start)
        self.busy_device_s += len(busy) * dt
        self.now = now
        self.drain_until = {d: t for d, t in self.drain_until.items() if t > now}

    # ------------------------------------------------------------------ decisions
    def decide(self, now: float, trigger: str = "tick") -> Decision:
        """Ask the policy for an allocation and apply it (see the module docstring)."""
        self.advance(now)
        t0 = time.perf_counter()
        p_calls, p_secs = self.pricer.calls, self.pricer.seconds
        view = View(self)
        res = self.policy.decide(view)
        changes = list(res.events)
        changes += self._apply(res, view)
        seconds = time.perf_counter() - t0
        d = Decision(
            time_s=now,
            trigger=trigger,
            changes=tuple(changes),
            seconds=seconds,
            pricing_seconds=self.pricer.seconds - p_secs,
            planner_calls=self.pricer.calls - p_calls,
            active_jobs=len(view.records),
            info=res.info,
        )
        self.events.extend(changes)
        self.last_decision = d
        if self.keep_decisions:
            self.decisions.append(d)
        return d

    def _end_wait(self, rec: JobRecord, now: float) -> None:
        if rec.wait_since_s is not None:
            w = max(0.0, now - rec.wait_since_s)
            rec.total_wait_s += w
            rec.longest_wait_s = max(rec.longest_wait_s, w)
            rec.wait_since_s = None

    def _apply(self, res: PolicyResult, view: View) -> list[Event]:
        now = self.now
        out: list[Event] = []
        over = self.pricer.restart.restart_overhead_s
        # Check the answer as a whole before changing anything.
        owner: dict[int, str] = {}
        for jid, asg in res.assignments.items():
            placed = self._get(jid)
            if not placed.active:
                raise _E(f"policy {self.policy.name} placed job {jid!r}, which is {placed.status}")
            for d in asg.devices:
                other = owner.get(d)
                if other is not None and asg.colocated_with != other:
                    raise _E(f"policy {self.policy.name} gave device {d} to {other!r} and {jid!r}")
                owner.setdefault(d, jid)
        # Devices of jobs that stop or change stay busy while those jobs save their checkpoints; set every
        # such drain first, so that jobs placed on those devices in this decision wait for it.
        saves: dict[str, float] = {}
        for rec in view.records:
            cur = rec.placement
            if not rec.running or cur is None:
                continue
            a = res.assignments.get(rec.id)
            if a is not None and a.devices == cur.devices and a.price.key == cur.shape:
                continue
            hosts_old = len({self._devices[d].host_index for d in cur.devices})
            saves[rec.id] = self.pricer.save_s(rec.spec, view.graph(rec), hosts_old)
            for d in cur.devices:
                self.drain_until[d] = max(self.drain_until.get(d, 0.0), now + saves[rec.id])
        for rec in view.records:
            a = res.assignments.get(rec.id)
            graph = view.graph(rec)
            cur = rec.placement
            if rec.running and cur is not None:
                if a is None:
                    save = saves[rec.id]
                    rec.status, rec.placement, rec.shape, rec.price = "waiting", None, None, None
                    rec.wait_since_s = now
                    rec.has_checkpoint = True
                    rec.preemptions += 1
                    why = res.reasons.get(rec.id, "")
                    out.append(
                        Event(
                            now,
                            "preempt",
                            rec.id,
                            f"stopped ({why}); checkpoint save {save:.1f} s"
                            if why
                            else f"stopped; checkpoint save {save:.1f} s",
                            {"devices": list(cur.devices), "save_s": save},
                        )
                    )
                    continue
                same = a.devices == cur.devices and a.price.key == cur.shape
                if same:
                    co = (a.colocated_with,) if a.colocated_with else ()
                    thr = a.price.throughput_samples_s / a.slowdown
                    if co != cur.colocated_with or abs(thr - cur.throughput_samples_s) > 1e-12 * thr:
                        rec.placement = Placement(
                            rec.id,
                            cur.devices,
                            cur.shape,
                            cur.plan_id,
                            cur.layout,
                            thr,
                            cur.iteration_time_s,
                            cur.since_s,
                            cur.progress_from_s,
                            co,
                        )
                        out.append(
                            Event(
                                now,
                                "colocate",
                                rec.id,
                                f"shares its device with {co[0]} (slowdown {a.slowdown:.2f}x)"
                                if co
                                else "runs alone again",
                                {"with": list(co), "slowdown": a.slowdown},
                            )
                        )
                    continue
                save = saves[rec.id]
                load = self.pricer.load_s(rec.spec, graph, a.shape.hosts)
                ready = now + save + load + over
                ready = max(
                    [ready] + [self.drain_until.get(d, 0.0) for d in a.devices if d not in cur.devices]
                )
                kind = "move" if len(a.devices) == len(cur.devices) else "resize"
                rec.preemptions += 1
                self._place(rec, a, now, ready)
                out.append(
                    Event(
                        now,
                        kind,
                        rec.id,
                        f"{len(cur.devices)} -> {len(a.devices)} devices ({a.price.key.split(':')[0]}); "
                        f"restart {ready - now:.1f} s (save {save:.1f}, load {load:.1f}, overhead {over:.0f})",
                        {"from": list(cur.devices), "to": list(a.devices), "restart_s": ready - now},
                    )
                )
                continue
            if a is None:
                continue
            load = self.pricer.load_s(rec.spec, graph, a.shape.hosts) if rec.has_checkpoint else 0.0
            ready = max([now + load + over] + [self.drain_until.get(d, 0.0) for d in a.devices])
            waited = rec.current_wait(now)
            self._end_wait(rec, now)
            rec.status = "running"
            if rec.first_start_s is None:
                rec.first_start_s = now
            self._place(rec, a, now, ready)
            out.append(
                Event(
                    now,
                    "start",
                    rec.id,
                    f"{len(a.devices)} x {a.price.key.split(':')[0]} after waiting {waited:.0f} s"
                    + (f", shared with {a.colocated_with} ({a.slowdown:.2f}x)" if a.colocated_with else "")
                    + (f"; resumes from its checkpoint ({load:.1f} s load)" if rec.has_checkpoint else ""),
                    {"devices": list(a.devices), "shape": a.price.key, "ready_s": ready},
                )
            )
        return out

    def _place(self, rec: JobRecord, a: Assignment, now: float, ready: float) -> None:
        plan = a.price.plan
        assert plan is not None
        rec.placement = Placement(
            rec.id,
            a.devices,
            a.price.key,
            plan.id,
            global_layout(plan, a.devices),
            a.price.throughput_samples_s / a.slowdown,
            a.price.iteration_time_s,
            now,
            ready,
            (a.colocated_with,) if a.colocated_with else (),
        )
        rec.shape = a.shape
        rec.price = a.price

    # ------------------------------------------------------------------ reading
    def _get(self, job_id: str) -> JobRecord:
        rec = self.jobs.get(job_id)
        if rec is None:
            raise _E(f"no job {job_id!r} (known: {len(self.jobs)} jobs)")
        return rec

    def record(self, job_id: str) -> JobRecord:
        """The books on one job."""
        return self._get(job_id)

    def allocation(self) -> Allocation:
        """Who runs where now, and why the others wait (the last decision's reasons)."""
        reasons: dict[str, str] = {}
        if self.last_decision is not None:
            reasons = dict(self.last_decision.info.get("reasons", {}))
        running = tuple(r.placement for r in self.jobs.values() if r.running and r.placement is not None)
        waiting = tuple(
            WaitingJob(r.id, reasons.get(r.id, "waiting for devices"), r.wait_since_s or self.now)
            for r in self.jobs.values()
            if r.status == "waiting"
        )
        return Allocation(self.now, running, waiting)

    def plan(self, job_id: str) -> Plan:
        """The plan a running job runs, addressed to the cluster's devices (what an executor launches)."""
        rec = self._get(job_id)
        if not rec.running or rec.placement is None or rec.price is None or rec.price.plan is None:
            raise _E(f"job {job_id!r} is {rec.status}; only a running job has a plan")
        return plan_on_devices(rec.price.plan, self.cluster, rec.placement.devices)

    # ------------------------------------------------------------------ state
    def to_dict(self, *, graphs: bool = True, events: bool = True) -> dict[str, Any]:
        """The whole state as JSON-ready data (the price cache is the pricer's, saved apart).

        Args:
            graphs: include the graphs' sources (a caller that stores graphs apart, as the service does by
                content hash, leaves them out and hands them back to :meth:`from_dict`).
            events: include the event log (a caller that appends events to a log of its own leaves it out).
        """
        return {
            "schema_version": STATE_SCHEMA_VERSION,
            "time_s": self.now,
            "cluster": self.cluster.to_dict(),
            "policy": {"name": self.policy.name, "params": self.policy.params()},
            "pricing": {"time_limit_s": self.pricer.time_limit_s, "restart": self.pricer.restart.to_dict()},
            "graphs": {k: v.to_dict() for k, v in self.sources.items()} if graphs else {},
            "jobs": [r.to_dict() for r in self.jobs.values()],
            "events": [e.to_dict() for e in self.events] if events else [],
            "decisions": [d.to_dict() for d in self.decisions],
            "last_decision": None if self.last_decision is None else self.last_decision.to_dict(),
            "pricings": [p.to_dict() for p in self.pricings],
            "keep_decisions": self.keep_decisions,
            "drain_until": {str(k): v for k, v in sorted(self.drain_until.items())},
            "busy_device_s": self.busy_device_s,
        }

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        *,
        pricer: Pricer | None = None,
        graphs: Mapping[str, OpGraph] | None = None,
    ) -> Scheduler:
        """Rebuild a scheduler from :meth:`to_dict` (graphs from their sources, or ``graphs`` for those the
        state left out; the policy by name).

        Raises:
            SchedulerError: the state is of another version or malformed, or a job's graph is neither in
                the state nor in ``graphs``.
        """
        from .policy import make_policy
        from .pricing import RestartModel

        if not isinstance(d, Mapping) or d.get("schema_version") != STATE_SCHEMA_VERSION:
            got = d.get("schema_version") if isinstance(d, Mapping) else type(d).__name__
            raise _E(f"scheduler state: schema_version {got!r} is not supported (this distplan reads 1)")
        try:
            cluster = Cluster.from_dict(d["cluster"])
            pol = d["policy"]
            policy = make_policy(str(pol["name"]), **dict(pol.get("params", {})))
            pr = d["pricing"]
            if pricer is None:
                pricer = Pricer(
                    cluster,
                    time_limit_s=float(pr["time_limit_s"]),
                    restart=RestartModel.from_dict(pr["restart"]),
                )
            sources = {str(k): GraphSource.from_dict(v) for k, v in d.get("graphs", {}).items()}
            loaded = {k: v.load() for k, v in sources.items()}
            loaded.update(graphs or {})
            s = cls(
                cluster,
                policy,
                pricer=pricer,
                graphs=loaded,
                sources=sources,
                start_s=float(d["time_s"]),
                keep_decisions=bool(d.get("keep_decisions", True)),
            )
            for r in d["jobs"]:
                rec = JobRecord.from_dict(r)
                if rec.active and rec.spec.graph not in s.graphs:
                    raise _E(
                        f"scheduler state: job {rec.id!r} needs graph {rec.spec.graph!r}, which is not given"
                    )
                s.jobs[rec.id] = rec
            s.events = [Event.from_dict(e) for e in d.get("events", [])]
            s.decisions = [Decision.from_dict(x) for x in d.get("decisions", [])]
            last = d.get("last_decision")
            s.last_decision = Decision.from_dict(last) if last else (s.decisions[-1] if s.decisions else None)
            s.pricings = [Pricing.from_dict(x) for x in d.get("pricings", [])]
            s.drain_until = {int(k): float(v) for k, v in d.get("drain_until", {}).items()}
            s.busy_device_s = float(d.get("busy_device_s", 0.0))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SchedulerError):
                raise
            raise _E(f"scheduler state is malformed ({type(e).__name__}: {e})") from e
        return s
