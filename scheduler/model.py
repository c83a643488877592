"""The scheduler's data: jobs, job sets (trace files), allocations and events, as checked plain data.

Every class is a frozen dataclass that checks itself (``SchedulerError`` naming the field and the value) and
crosses processes and the network as JSON (``to_dict``/``from_dict``, with ``schema_version`` on the
documents that stand alone: :class:`JobSet` and :class:`Allocation`).

[Note: trace file]
A job set is one JSON document::

    {"schema_version": 1, "name": "...", "description": "...", "seed": 7,
     "graphs": {"gpt-s": {"synthetic": {"layers": 12, "hidden": 768, "heads": 12, "seq": 1024}},
                "mine": {"file": "graphs/mine.json"},
                "inline": {"graph": {...OpGraph JSON...}}},
     "jobs": [{"id": "j0001", "graph": "gpt-s", "global_batch": 64, "dtype": "bf16", "optimizer": "adamw",
               "priority": "high", "min_devices": 2, "max_devices": 8, "arrival_s": 12.5,
               "total_steps": 4000, "deadline_s": null, "run_steps": 4000}]}

Graphs are given once and referred to by key: a synthetic transformer built by
``distplan.planner.synthetic`` (no torch), an ``OpGraph`` JSON file (relative to the trace file), or an
inline ``OpGraph``. ``total_steps`` is what the user declares (policies may use it); ``run_steps`` is how
many steps the job really runs (early stopping, a crash), known to the simulator only; a job with neither
cannot be simulated.

[Note: times]
Times are seconds on one clock: a trace's arrival times, the simulator's clock, or wall-clock seconds
of a live scheduler. Deadlines are absolute times on the same clock.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distplan._serde import get_float, get_int, get_list, get_map, get_str, load_json, read_json_file
from distplan.errors import DistplanError, GraphError
from distplan.graph import OpGraph
from distplan.plan import DTYPES, OPTIMIZERS

__all__ = [
    "EVENT_KINDS",
    "JOBSET_SCHEMA_VERSION",
    "PRIORITIES",
    "Allocation",
    "Event",
    "GraphSource",
    "JobSet",
    "JobSpec",
    "Placement",
    "SchedulerError",
    "WaitingJob",
    "priority_rank",
]

JOBSET_SCHEMA_VERSION = 1
ALLOCATION_SCHEMA_VERSION = 1
#: Priority classes, most important first.
PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
#: What an :class:`Event` records.
EVENT_KINDS: tuple[str, ...] = (
    "arrival",  # a job was submitted
    "start",  # a waiting job got devices (first start, or a restart from its checkpoint)
    "preempt",  # a running job was stopped (checkpoint saved) and waits again
    "move",  # a running job restarted on other devices (same device count)
    "resize",  # a running job restarted on more or fewer devices
    "colocate",  # a running job's device now also runs another job (its speed changed, no restart)
    "finish",  # a job completed
    "cancel",  # a job was withdrawn by its user
    "fail",  # a job crashed; it waits again and resumes from its last checkpoint
    "age",  # a job waited past the ageing bound and moved up (see the distplan policy)
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
#: Most devices a job may ask for (one more than any cluster a preset describes, by far).
MAX_DEVICES = 65536


class SchedulerError(DistplanError, ValueError):
    """Bad scheduler input (job, trace, cluster, state) or a request the scheduler cannot honour; the
    message names the field, the value and what was expected."""


_E = SchedulerError


def priority_rank(priority: str) -> int:
    """0 for ``high``, 1 for ``normal``, 2 for ``low``."""
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        raise _E(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}") from None


def _opt_float(m: Mapping[str, Any], key: str, path: str) -> float | None:
    if m.get(key) is None:
        return None
    return get_float(m, key, path, _E)


def _opt_int(m: Mapping[str, Any], key: str, path: str, minimum: int = 1) -> int | None:
    if m.get(key) is None:
        return None
    return get_int(m, key, path, _E, minimum=minimum)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------- graphs
_SYNTHETIC_KEYS = {"name", "layers", "hidden", "heads", "ffn", "vocab", "seq", "batch", "tied_embeddings"}


@dataclass(frozen=True, slots=True)
class GraphSource:
    """Where a job's ``OpGraph`` comes from (see [Note: trace file]).

    Attributes:
        kind: ``synthetic`` (``spec`` holds keyword arguments of
            ``distplan.planner.synthetic.synthetic_transformer``), ``file`` (``spec["file"]``, a path to an
            OpGraph JSON, relative to the job set's folder) or ``graph`` (``spec["graph"]``, an inline
            OpGraph JSON object).
        spec: the kind's data, JSON-ready.
    """

    kind: str
    spec: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "file", "graph"):
            raise _E(f"graph source kind must be synthetic, file or graph, got {self.kind!r}")
        if self.kind == "synthetic":
            unknown = set(self.spec) - _SYNTHETIC_KEYS
            if unknown:
                raise _E(
                    f"synthetic graph: unknown field(s) {', '.join(sorted(unknown))}; known: "
                    f"{', '.join(sorted(_SYNTHETIC_KEYS))}"
                )
            for k, v in self.spec.items():
                if k == "name":
                    if not isinstance(v, str):
                        raise _E(f"synthetic graph: name must be a string, got {v!r}")
                elif k == "tied_embeddings":
                    if not isinstance(v, bool):
                        raise _E(f"synthetic graph: tied_embeddings must be true or false, got {v!r}")
                elif isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1_000_000:
                    raise _E(f"synthetic graph: {k} must be an integer between 1 and 1000000, got {v!r}")
        elif self.kind == "file":
            if not isinstance(self.spec.get("file"), str) or not self.spec["file"]:
                raise _E(f"graph file source needs a non-empty 'file' path, got {self.spec.get('file')!r}")
        elif not isinstance(self.spec.get("graph"), Mapping):
            raise _E("inline graph source needs a 'graph' object (an OpGraph JSON)")

    def load(self, base_dir: str | Path | None = None) -> OpGraph:
        """Build or read the graph (no torch: synthetic graphs come from ``distplan.planner.synthetic``).

        Raises:
            SchedulerError: the file is missing or is not an OpGraph; the synthetic sizes are inconsistent.
        """
        if self.kind == "synthetic":
            from distplan.planner.synthetic import synthetic_transformer

            kw = dict(self.spec)
            name = kw.pop("name", None)
            try:
                return synthetic_transformer(name, **kw)
            except (ValueError, GraphError) as e:
                raise _E(f"synthetic graph {dict(self.spec)}: {e}") from e
        if self.kind == "file":
            p = Path(self.spec["file"])
            if base_dir is not None and not p.is_absolute():
                p = Path(base_dir) / p
            try:
                return OpGraph.load(p)
            except GraphError as e:
                raise _E(f"graph file {str(p)!r}: {e}") from e
        try:
            return OpGraph.from_dict(self.spec["graph"])
        except GraphError as e:
            raise _E(f"inline graph: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: dict(self.spec)} if self.kind == "synthetic" else dict(self.spec)

    @classmethod
    def from_dict(cls, d: Any, path: str = "graph") -> GraphSource:
        m = get_map(d, path, _E)
        kinds = [k for k in ("synthetic", "file", "graph") if k in m]
        if len(kinds) != 1:
            raise _E(f"{path}: give exactly one of synthetic, file or graph (found {sorted(m) or 'none'})")
        kind = kinds[0]
        if kind == "synthetic":
            return cls("synthetic", dict(get_map(m["synthetic"], f"{path}.synthetic", _E)))
        return cls(kind, {kind: m[kind]})


# ------------------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True, slots=True)
class JobSpec:
    """One training job as its user submits it.

    Attributes:
        id: unique within a job set (letters, digits, ``._:-``; at most 64 characters).
        graph: key of the job's graph in the job set's ``graphs`` table (or any name the caller resolves).
        global_batch: samples per training step (iteration), over all replicas and microbatches.
        dtype / optimizer: as in a plan request (``fp32``/``bf16``/``fp16``; ``adam``/``adamw``/``sgd``).
        priority: ``high``, ``normal`` or ``low`` (see :data:`PRIORITIES`).
        min_devices / max_devices: the device counts the job accepts (the scheduler may give any allowed
            count in between; rigid baselines ask for ``max_devices``).
        arrival_s: submission time, seconds (see [Note: times]).
        total_steps: steps the user declares the job runs (None: open-ended, the scheduler estimates).
        deadline_s: absolute time the job should finish by (None: no deadline).
        run_steps: steps the job really runs before it finishes (simulation only; defaults to
            ``total_steps``); hidden from the policies.
        name: free text.
    """

    id: str
    graph: str
    global_batch: int
    dtype: str = "fp32"
    optimizer: str = "adam"
    priority: str = "normal"
    min_devices: int = 1
    max_devices: int = 1
    arrival_s: float = 0.0
    total_steps: int | None = None
    deadline_s: float | None = None
    run_steps: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise _E(
                f"job id must be 1-64 letters, digits or ._:- (starting with a letter or digit), got {self.id!r}"
            )
        p = f"job {self.id!r}"
        if not isinstance(self.graph, str) or not self.graph:
            raise _E(f"{p}: graph must name a graph, got {self.graph!r}")
        if (
            isinstance(self.global_batch, bool)
            or not isinstance(self.global_batch, int)
            or self.global_batch < 1
        ):
            raise _E(f"{p}: global_batch must be an integer >= 1, got {self.global_batch!r}")
        if self.dtype not in DTYPES:
            raise _E(f"{p}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise _E(f"{p}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.priority not in PRIORITIES:
            raise _E(f"{p}: priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        for f in ("min_devices", "max_devices"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DEVICES:
                raise _E(f"{p}: {f} must be an integer between 1 and {MAX_DEVICES}, got {v!r}")
        if self.min_devices > self.max_devices:
            raise _E(
                f"{p}: min_devices {self.min_devices} is above max_devices {self.max_devices} "
                f"(by {self.min_devices - self.max_devices})"
            )
        if not _finite(self.arrival_s) or self.arrival_s < 0:
            raise _E(f"{p}: arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        for f in ("total_steps", "run_steps"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise _E(f"{p}: {f} must be an integer >= 1 or null, got {v!r}")
        if self.deadline_s is not None:
            if not _finite(self.deadline_s):
                raise _E(f"{p}: deadline_s must be a finite number or null, got {self.deadline_s!r}")
            if self.deadline_s <= self.arrival_s:
                raise _E(
                    f"{p}: deadline_s {self.deadline_s:g} is not after arrival_s {self.arrival_s:g} "
                    f"(by {self.arrival_s - self.deadline_s:g} s)"
                )

    @property
    def total_samples(self) -> int | None:
        """Declared samples (``total_steps * global_batch``), or None when open-ended."""
        return None if self.total_steps is None else self.total_steps * self.global_batch

    @property
    def run_samples(self) -> int | None:
        """Samples the job really runs (``run_steps``, else ``total_steps``, times the batch), or None."""
        steps = self.run_steps if self.run_steps is not None else self.total_steps
        return None if steps is None else steps * self.global_batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "graph": self.graph,
            "global_batch": self.global_batch,
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "priority": self.priority,
            "min_devices": self.min_devices,
            "max_devices": self.max_devices,
            "arrival_s": self.arrival_s,
            "total_steps": self.total_steps,
            "deadline_s": self.deadline_s,
            "run_steps": self.run_steps,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "job") -> JobSpec:
        """Read a job; ``total_samples`` may stand for ``total_steps`` when it is a whole number of steps."""
        m = get_map(d, path, _E)
        known = {
            "id",
            "graph",
            "global_batch",
            "dtype",
            "optimizer",
            "priority",
            "min_devices",
            "max_devices",
            "arrival_s",
            "total_steps",
            "total_samples",
            "deadline_s",
            "run_steps",
            "name",
        }
        unknown = set(m) - known
        if unknown:
            raise _E(
                f"{path}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        jid = get_str(m, "id", path, _E)
        path = f"{path}[{jid}]"
        batch = get_int(m, "global_batch", path, _E, minimum=1)
        steps = _opt_int(m, "total_steps", path)
        samples = _opt_int(m, "total_samples", path)
        if samples is not None:
            if steps is not None:
                raise _E(f"{path}: give total_steps or total_samples, not both")
            if samples % batch:
                raise _E(
                    f"{path}.total_samples: {samples} is not a whole number of steps of global_batch {batch} "
                    f"(remainder {samples % batch})"
                )
            steps = samples // batch
        min_d = get_int(m, "min_devices", path, _E, 1, minimum=1)
        return cls(
            id=jid,
            graph=get_str(m, "graph", path, _E),
            global_batch=batch,
            dtype=get_str(m, "dtype", path, _E, "fp32"),
            optimizer=get_str(m, "optimizer", path, _E, "adam"),
            priority=get_str(m, "priority", path, _E, "normal"),
            min_devices=min_d,
            max_devices=get_int(m, "max_devices", path, _E, min_d, minimum=1),
            arrival_s=get_float(m, "arrival_s", path, _E, 0.0),
            total_steps=steps,
            deadline_s=_opt_float(m, "deadline_s", path),
            run_steps=_opt_int(m, "run_steps", path),
            name=get_str(m, "name", path, _E, ""),
        )


@dataclass(frozen=True, slots=True)
class JobSet:
    """A set of jobs over shared graphs: the trace file (see [Note: trace file]).

    Attributes:
        name / description: free text.
        graphs: graph key -> :class:`GraphSource`.
        jobs: the jobs, in file order (simulators replay them by arrival time, then file order).
        seed: the generator seed, when generated.
    """

    name: str
    graphs: Mapping[str, GraphSource]
    jobs: tuple[JobSpec, ...]
    description: str = ""
    seed: int | None = None
    schema_version: int = JOBSET_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != JOBSET_SCHEMA_VERSION:
            raise _E(
                f"job set schema_version {self.schema_version} is not supported (this distplan reads "
                f"{JOBSET_SCHEMA_VERSION})"
            )
        seen: set[str] = set()
        for i, j in enumerate(self.jobs):
            if j.id in seen:
                raise _E(f"jobs[{i}]: duplicate job id {j.id!r}")
            seen.add(j.id)
            if j.graph not in self.graphs:
                known = ", ".join(sorted(self.graphs)) or "none"
                raise _E(f"jobs[{i}] ({j.id!r}): unknown graph {j.graph!r}; the job set's graphs: {known}")

    def job(self, job_id: str) -> JobSpec:
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise _E(f"no job {job_id!r} in job set {self.name!r}")

    def load_graphs(self, base_dir: str | Path | None = None) -> dict[str, OpGraph]:
        """Every graph the jobs use, by key (synthetic ones are built, files read)."""
        used = {j.graph for j in self.jobs}
        return {k: src.load(base_dir) for k, src in self.graphs.items() if k in used}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "graphs": {k: v.to_dict() for k, v in self.graphs.items()},
            "jobs": [j.to_dict() for j in self.jobs],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> JobSet:
        m = get_map(d, "job set", _E)
        version = get_int(m, "schema_version", "job set", _E, JOBSET_SCHEMA_VERSION)
        if version != JOBSET_SCHEMA_VERSION:
            raise _E(
                f"job set schema_version {version} is not supported (this distplan reads {JOBSET_SCHEMA_VERSION})"
            )
        graphs = get_map(m.get("graphs", {}), "job set.graphs", _E)
        jobs = get_list(m, "jobs", "job set", _E)
        if not jobs:
            raise _E("job set.jobs: the job set has no jobs")
        seed = m.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _E(f"job set.seed: expected an integer or null, got {seed!r}")
        return cls(
            name=get_str(m, "name", "job set", _E, "jobs"),
            description=get_str(m, "description", "job set", _E, ""),
            seed=seed,
            graphs={str(k): GraphSource.from_dict(v, f"job set.graphs[{k}]") for k, v in graphs.items()},
            jobs=tuple(JobSpec.from_dict(j, f"job set.jobs[{i}]") for i, j in enumerate(jobs)),
        )

    @classmethod
    def from_json(cls, text: str) -> JobSet:
        return cls.from_dict(load_json(text, _E, "job set"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> JobSet:
        """Read a job set file; errors name the file."""
        p = Path(path)
        data = read_json_file(p, _E, "job set")
        try:
            return cls.from_dict(data)
        except SchedulerError as e:
            raise SchedulerError(f"{p}: {e}") from e


# ----------------------------------------------------------------------------------------- allocation
@dataclass(frozen=True, slots=True)
class Placement:
    """A running job: its devices and its plan.

    Attributes:
        job_id: the job.
        devices: global device indices of the cluster (sorted).
        shape: the priced device-set shape (see ``distplan.scheduler.shapes.Shape.key``).
        plan_id: id of the plan (``Plan.id``) the job runs, planned on the shape.
        layout: the plan's compact layout (``Plan.layout``) with the cluster's global device indices.
        throughput_samples_s: samples per second the job makes while it runs (after any co-location
            slowdown).
        iteration_time_s: seconds per step alone on these devices (the plan's prediction).
        colocated_with: jobs sharing these devices (co-location), sorted.
        since_s: when the job got this placement.
        progress_from_s: when it makes progress on it (after checkpoint load and restart, see the
            scheduler's restart model).
    """

    job_id: str
    devices: tuple[int, ...]
    shape: str
    plan_id: str
    layout: str
    throughput_samples_s: float
    iteration_time_s: float
    since_s: float
    progress_from_s: float
    colocated_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        p = f"placement of job {self.job_id!r}"
        if not self.devices:
            raise _E(f"{p}: has no devices")
        if len(set(self.devices)) != len(self.devices) or any(d < 0 for d in self.devices):
            raise _E(f"{p}: devices must be distinct indices >= 0, got {list(self.devices)}")
        if not (_finite(self.throughput_samples_s) and self.throughput_samples_s > 0):
            raise _E(f"{p}: throughput must be > 0 samples/s, got {self.throughput_samples_s!r}")
        if not (_finite(self.iteration_time_s) and self.iteration_time_s > 0):
            raise _E(f"{p}: iteration time must be > 0 s, got {self.iteration_time_s!r}")
        if (
            not (_finite(self.since_s) and _finite(self.progress_from_s))
            or self.progress_from_s < self.since_s
        ):
            raise _E(
                f"{p}: progress_from_s {self.progress_from_s!r} must be a finite time at or after since_s "
                f"{self.since_s!r}"
            )
        if self.job_id in self.colocated_with:
            raise _E(f"{p}: is listed as co-located with itself")

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "devices": list(self.devices),
            "shape": self.shape,
            "plan_id": self.plan_id,
            "layout": self.layout,
            "throughput_samples_s": self.throughput_samples_s,
            "iteration_time_s": self.iteration_time_s,
            "since_s": self.since_s,
            "progress_from_s": self.progress_from_s,
            "colocated_with": list(self.colocated_with),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "placement") -> Placement:
        m = get_map(d, path, _E)
        devices = get_list(m, "devices", path, _E)
        for i, v in enumerate(devices):
            if isinstance(v, bool) or not isinstance(v, int):
                raise _E(f"{path}.devices[{i}]: expected a device index, got {v!r}")
        co = get_list(m, "colocated_with", path, _E, [])
        return cls(
            job_id=get_str(m, "job_id", path, _E),
            devices=tuple(devices),
            shape=get_str(m, "shape", path, _E),
            plan_id=get_str(m, "plan_id", path, _E),
            layout=get_str(m, "layout", path, _E),
            throughput_samples_s=get_float(m, "throughput_samples_s", path, _E, positive=True),
            iteration_time_s=get_float(m, "iteration_time_s", path, _E, positive=True),
            since_s=get_float(m, "since_s", path, _E, minimum=None),
            progress_from_s=get_float(m, "progress_from_s", path, _E, minimum=None),
            colocated_with=tuple(str(x) for x in co),
        )


@dataclass(frozen=True, slots=True)
class WaitingJob:
    """A job that waits, and why (one sentence naming what it lacks)."""

    job_id: str
    reason: str
    since_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "reason": self.reason, "since_s": self.since_s}

    @classmethod
    def from_dict(cls, d: Any, path: str = "waiting") -> WaitingJob:
        m = get_map(d, path, _E)
        return cls(
            job_id=get_str(m, "job_id", path, _E),
            reason=get_str(m, "reason", path, _E),
            since_s=get_float(m, "since_s", path, _E, minimum=None),
        )


@dataclass(frozen=True, slots=True)
class Allocation:
    """Who runs where at ``time_s``: each running job's devices and plan, each waiting job's reason.

    ``check(num_devices)`` verifies that devices are used at most once, except by jobs that list each other
    in ``colocated_with``.
    """

    time_s: float
    running: tuple[Placement, ...] = ()
    waiting: tuple[WaitingJob, ...] = ()
    schema_version: int = ALLOCATION_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != ALLOCATION_SCHEMA_VERSION:
            raise _E(
                f"allocation schema_version {self.schema_version} is not supported (this distplan reads "
                f"{ALLOCATION_SCHEMA_VERSION})"
            )
        ids = [p.job_id for p in self.running] + [w.job_id for w in self.waiting]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise _E(f"allocation lists job(s) {', '.join(dup)} more than once")

    def check(self, num_devices: int) -> None:
        """Raise :class:`SchedulerError` if a device is out of range or used by jobs not co-located."""
        owner: dict[int, str] = {}
        by_id = {p.job_id: p for p in self.running}
        for p in self.running:
            for d in p.devices:
                if not 0 <= d < num_devices:
                    raise _E(f"job {p.job_id!r} uses device {d}, but the cluster has {num_devices} devices")
                other = owner.get(d)
                if other is not None and not (
                    other in p.colocated_with and p.job_id in by_id[other].colocated_with
                ):
                    raise _E(
                        f"device {d} is used by jobs {other!r} and {p.job_id!r}, which are not co-located"
                    )
                owner.setdefault(d, p.job_id)

    def placement(self, job_id: str) -> Placement | None:
        return next((p for p in self.running if p.job_id == job_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "time_s": self.time_s,
            "running": [p.to_dict() for p in self.running],
            "waiting": [w.to_dict() for w in self.waiting],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Allocation:
        m = get_map(d, "allocation", _E)
        return cls(
            time_s=get_float(m, "time_s", "allocation", _E, minimum=None),
            running=tuple(
                Placement.from_dict(p, f"allocation.running[{i}]")
                for i, p in enumerate(get_list(m, "running", "allocation", _E, []))
            ),
            waiting=tuple(
                WaitingJob.from_dict(w, f"allocation.waiting[{i}]")
                for i, w in enumerate(get_list(m, "waiting", "allocation", _E, []))
            ),
            schema_version=get_int(m, "schema_version", "allocation", _E, ALLOCATION_SCHEMA_VERSION),
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the scheduler's log.

    Attributes:
        time_s: when.
        kind: one of :data:`EVENT_KINDS`.
        job_id: the job concerned ("" for none).
        detail: one human sentence (the reason for a decision, the devices, the restart cost).
        data: machine-readable details (devices, shape, cost seconds...), JSON-ready.
    """

    time_s: float
    kind: str
    job_id: str = ""
    detail: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise _E(f"event kind must be one of {', '.join(EVENT_KINDS)}, got {self.kind!r}")
        if not _finite(self.time_s):
            raise _E(f"event time must be finite, got {self.time_s!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "kind": self.kind,
            "job_id": self.job_id,
            "detail": self.detail,
            "data": dict(self.data),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "event") -> Event:
        m = get_map(d, path, _E)
        return cls(
            time_s=get_float(m, "time_s", path, _E, minimum=None),
            kind=get_str(m, "kind", path, _E),
            job_id=get_str(m, "job_id", path, _E, ""),
            detail=get_str(m, "detail", path, _E, ""),
            data=dict(get_map(m.get("data", {}), f"{path}.data", _E)),
        )
