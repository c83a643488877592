"""Prices: what a job achieves on a device-set shape, from the planner; what a restart and a shared device cost.

[Note: pricing]
A job's throughput on a shape (see ``distplan.scheduler.shapes``) is the throughput of the plan the planner
(``distplan.planner.plan``) finds for the job's graph on the shape's sub-cluster, through one function,
:func:`plan_on`. Prices are cached by (graph content hash, global batch, dtype, optimizer) x shape key, in
memory and, when the pricer is given a file, on disk (JSON), so a model a platform sees again is never
re-planned. The planner runs with one worker, no baselines and a time limit (:attr:`Pricer.time_limit_s`,
5 s by default) from which it sizes its deterministic work: prices are then the same on any run, unless the
machine is so loaded that the wall-clock limit itself is reached (the plan's notes say so). Measured here
(2 cores, load 5-10): with 0.5 s, 4 of 90 catalogue shapes on ``mixed-64`` came out up to 20% apart
between two runs; with 5 s none did, at 0.75 s per shape on average. A job's shapes are priced once, when
it is submitted (by its policy's ``prepare``), and only shapes between its minimum and maximum device counts; in each pool larger shapes are skipped once a plan leaves devices
unused (more devices would not help), and such a shape is offered only when it is the smallest the job
accepts there.

[Note: restart cost]
Changing a running job's devices or plan (or stopping it) costs a checkpoint save on its old devices, a load
on the new ones and a restart (processes, communicators, compilation)::

    save_s = latency + state_bytes / (hosts_old * bandwidth)
    load_s = latency + state_bytes / (hosts_new * bandwidth)
    restart = save_s + load_s + restart_overhead_s

``state_bytes`` = parameters x (4 bytes of fp32 weights (the master copy under mixed precision) + 4 bytes
per optimizer state: Adam/AdamW 2, SGD momentum 1); gradients are not saved. Checkpoints go to shared
storage over the cluster's inter-host network (each host of the job writes or reads its share in parallel)
unless :class:`RestartModel` names a storage bandwidth. ``restart_overhead_s`` (20 s by default) is an
assumption, not a measurement.

[Note: co-location]
Two jobs may share one device (AntMan, Xiao et al., OSDI 2020; Gandiva, Xiao et al., OSDI 2018) when their
peak memory (the planner's per-device prediction) fits the device together. Each job uses a fraction of the
device's compute (``u_c`` = FLOPs / (peak x efficiency) per step, divided by the step time) and of its memory
bandwidth (``u_m`` = bytes moved / bandwidth per step, divided by the step time) -- the two terms of the
cost model's roofline (``distplan.planner.cost``), summed separately; the rest of a step is launch overhead
and waiting. Sharing slows both jobs by::

    slowdown = max(1, u_c(a) + u_c(b), u_m(a) + u_m(b)) * (1 + interference)

(proportional sharing of the busier resource, plus a fixed interference term for context switches and cache
contention, ``interference`` = 0.1 by default, an assumption). Small, launch-bound jobs share almost for
free; two compute-bound jobs gain nothing, and the allocation program then does not pair them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distplan._serde import get_bool, get_float, get_int, get_map, get_str
from distplan.cluster import Cluster, Link
from distplan.errors import DistplanError
from distplan.graph import OpGraph, dtype_bytes
from distplan.plan import PLAN_SCHEMA_VERSION, Plan, build_rank_map, parse_layout

from .model import JobSpec, SchedulerError
from .shapes import Pool, Shape

__all__ = [
    "Price",
    "Pricer",
    "RestartModel",
    "colocation_slowdown",
    "global_layout",
    "plan_on",
    "plan_on_devices",
    "state_bytes",
]

_OPT_STATES = {"adam": 2, "adamw": 2, "sgd": 1}
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Backward memory traffic as a multiple of the forward's (as ``distplan.planner.cost.CostOptions``).
_BWD_BYTES = 2.0
PRICE_CACHE_VERSION = 1


def plan_on(graph: OpGraph, cluster: Cluster, job: JobSpec, *, time_limit_s: float) -> Plan:
    """The plan of ``job`` on ``cluster`` (a shape's sub-cluster): the scheduler's one call into the planner.

    Raises whatever the planner raises (``InfeasiblePlanError`` when no layout fits memory, ``PlanError``
    for a batch that no data-parallel degree divides or a figure out of range).
    """
    from distplan.planner import plan
    from distplan.request import PlanRequest

    request = PlanRequest(
        cluster=cluster,
        global_batch=job.global_batch,
        dtype=job.dtype,
        optimizer=job.optimizer,
        time_limit_s=time_limit_s,
        workers=1,
        baselines=False,
    )
    return plan(graph, request)


@dataclass(frozen=True, slots=True)
class Price:
    """A job's prediction on one shape.

    Attributes:
        key: the shape key (see ``Pool.shape_key``).
        feasible: whether the planner found a plan.
        throughput_samples_s / iteration_time_s: the plan's predictions.
        devices_used: devices the plan uses (fewer than the shape's when more would not help).
        memory_bytes: the plan's peak memory on one device.
        compute_util / memory_util: the fractions of a device's compute and memory bandwidth one step uses
            (see [Note: co-location]; meaningful for one-device shapes).
        plan: the plan on the shape's sub-cluster (None when infeasible).
        reason: why it is infeasible (the planner's message).
        seconds: the planner's wall time (not part of the price's identity).
    """

    key: str
    feasible: bool
    throughput_samples_s: float = 0.0
    iteration_time_s: float = 0.0
    devices_used: int = 0
    memory_bytes: int = 0
    compute_util: float = 0.0
    memory_util: float = 0.0
    plan: Plan | None = None
    reason: str = ""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.feasible and not (self.throughput_samples_s > 0 and self.iteration_time_s > 0):
            raise SchedulerError(
                f"price {self.key}: a feasible price needs a positive throughput and iteration time, got "
                f"{self.throughput_samples_s} samples/s and {self.iteration_time_s} s"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "feasible": self.feasible,
            "throughput_samples_s": self.throughput_samples_s,
            "iteration_time_s": self.iteration_time_s,
            "devices_used": self.devices_used,
            "memory_bytes": self.memory_bytes,
            "compute_util": self.compute_util,
            "memory_util": self.memory_util,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "reason": self.reason,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "price") -> Price:
        m = get_map(d, path, SchedulerError)
        plan = m.get("plan")
        return cls(
            key=get_str(m, "key", path, SchedulerError),
            feasible=get_bool(m, "feasible", path, SchedulerError),
            throughput_samples_s=get_float(m, "throughput_samples_s", path, SchedulerError, 0.0),
            iteration_time_s=get_float(m, "iteration_time_s", path, SchedulerError, 0.0),
            devices_used=get_int(m, "devices_used", path, SchedulerError, 0),
            memory_bytes=get_int(m, "memory_bytes", path, SchedulerError, 0),
            compute_util=get_float(m, "compute_util", path, SchedulerError, 0.0),
            memory_util=get_float(m, "memory_util", path, SchedulerError, 0.0),
            plan=None if plan is None else Plan.from_dict(plan),
            reason=get_str(m, "reason", path, SchedulerError, ""),
            seconds=get_float(m, "seconds", path, SchedulerError, 0.0),
        )


@dataclass(frozen=True, slots=True)
class RestartModel:
    """What a checkpoint-restart costs (see [Note: restart cost]).

    Attributes:
        restart_overhead_s: process launch, communicator set-up and compilation, per (re)start.
        storage_bandwidth_bytes_s: bandwidth to checkpoint storage per host; None uses the cluster network.
        interference: the fixed co-location slowdown term (see [Note: co-location]).
    """

    restart_overhead_s: float = 20.0
    storage_bandwidth_bytes_s: float | None = None
    interference: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.restart_overhead_s) and self.restart_overhead_s >= 0):
            raise SchedulerError(
                f"restart_overhead_s must be a finite number >= 0, got {self.restart_overhead_s}"
            )
        if self.storage_bandwidth_bytes_s is not None and not self.storage_bandwidth_bytes_s > 0:
            raise SchedulerError(
                f"storage_bandwidth_bytes_s must be > 0 or null, got {self.storage_bandwidth_bytes_s}"
            )
        if not 0 <= self.interference <= 10:
            raise SchedulerError(f"interference must be between 0 and 10, got {self.interference}")

    def transfer_s(self, nbytes: float, hosts: int, network: Link) -> float:
        """Seconds to save (or load) ``nbytes`` of state from ``hosts`` hosts in parallel."""
        if nbytes <= 0:
            return 0.0
        bw = self.storage_bandwidth_bytes_s or network.bandwidth_bytes_s
        return network.latency_s + nbytes / (max(1, hosts) * bw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "restart_overhead_s": self.restart_overhead_s,
            "storage_bandwidth_bytes_s": self.storage_bandwidth_bytes_s,
            "interference": self.interference,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "restart") -> RestartModel:
        m = get_map(d, path, SchedulerError)
        bw = m.get("storage_bandwidth_bytes_s")
        return cls(
            restart_overhead_s=get_float(m, "restart_overhead_s", path, SchedulerError, 20.0),
            storage_bandwidth_bytes_s=None
            if bw is None
            else get_float(m, "storage_bandwidth_bytes_s", path, SchedulerError, positive=True),
            interference=get_float(m, "interference", path, SchedulerError, 0.1),
        )


def state_bytes(graph: OpGraph, optimizer: str) -> float:
    """Bytes a checkpoint holds: parameters x (4 bytes of fp32 weights + 4 per optimizer state)."""
    params = graph.num_params or graph.param_bytes / dtype_bytes(graph.param_dtype)
    return float(params) * (4 + 4 * _OPT_STATES[optimizer])


def colocation_slowdown(a: Price, b: Price, interference: float) -> float:
    """How much slower each of two jobs runs when they share a device (see [Note: co-location])."""
    busy = max(1.0, a.compute_util + b.compute_util, a.memory_util + b.memory_util)
    return busy * (1.0 + interference)


def _utilisation(graph: OpGraph, plan: Plan, cluster: Cluster, job: JobSpec) -> tuple[float, float]:
    """Compute and memory-bandwidth fractions of one device a step of ``plan`` uses (one-device plans)."""
    tb = graph.meta.get("batch", 1)
    tb = tb if isinstance(tb, int) and not isinstance(tb, bool) and tb >= 1 else 1
    kind = cluster.kinds[plan.stages[0].kind]
    flops = sum(n.fwd_flops + (n.bwd_flops or 2 * n.fwd_flops) for n in graph.nodes) / tb * job.global_batch
    scale = _COMPUTE_BYTES[job.dtype] / dtype_bytes(graph.param_dtype)
    params = sum(n.param_bytes for n in graph.nodes) * scale * plan.num_microbatches
    other = sum(max(n.bytes_moved - n.param_bytes, 0) for n in graph.nodes) / tb * scale * job.global_batch
    devices = max(1, len(plan.devices_used))
    compute_s = flops / (kind.flops(job.dtype) * kind.efficiency) / devices
    memory_s = (1 + _BWD_BYTES) * (params + other) / kind.memory_bandwidth_bytes_s / devices
    it = plan.predictions.iteration_time_s
    return min(1.0, compute_s / it), min(1.0, memory_s / it)


class Pricer:
    """Prices jobs on shapes of one cluster's pools, through the planner, with a cache (see [Note: pricing]).

    Attributes:
        cluster: the cluster.
        time_limit_s: the planner's time limit per shape.
        restart: the restart and co-location model.
        cache_path: JSON file the cache is read from and :meth:`save` writes (None: memory only).
        shared: another pricer whose cache this one shares (prices do not depend on the cluster beyond the
            shape, see ``Pool.shape_key``; same time limit required).
        calls / hits / seconds: planner calls, cache hits and planner wall seconds so far.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        time_limit_s: float = 5.0,
        restart: RestartModel | None = None,
        cache_path: str | Path | None = None,
        shared: Pricer | None = None,
    ) -> None:
        if not (math.isfinite(time_limit_s) and time_limit_s > 0):
            raise SchedulerError(f"the pricing time limit must be > 0 s, got {time_limit_s}")
        self.cluster = cluster
        self.time_limit_s = time_limit_s
        self.restart = restart or RestartModel()
        self.cache_path = Path(cache_path) if cache_path is not None else None
        if shared is not None and shared.time_limit_s != time_limit_s:
            raise SchedulerError("pricers that share a cache must share the planner time limit")
        self._cache: dict[str, Price] = shared._cache if shared is not None else {}
        self._hashes: dict[int, tuple[OpGraph, str]] = {}
        self._shape_keys: dict[tuple[int, Shape], str] = {}
        self._keys: dict[tuple[Any, ...], str] = {}
        self.calls = 0
        self.hits = 0
        self.seconds = 0.0
        if self.cache_path is not None and self.cache_path.exists():
            self.load(self.cache_path)

    # ------------------------------------------------------------------ keys
    def graph_hash(self, graph: OpGraph) -> str:
        hit = self._hashes.get(id(graph))
        if hit is not None and hit[0] is graph:
            return hit[1]
        h = graph.content_hash
        self._hashes[id(graph)] = (graph, h)
        return h

    def config_key(self, job: JobSpec, graph: OpGraph) -> str:
        """What a price depends on besides the shape: graph, batch, dtype, optimizer (and the time limit)."""
        return (
            f"{self.graph_hash(graph)}:{job.global_batch}:{job.dtype}:{job.optimizer}:{self.time_limit_s:g}"
        )

    def _key(self, job: JobSpec, graph: OpGraph, pool: Pool, shape: Shape) -> str:
        memo = (id(graph), job.global_batch, job.dtype, job.optimizer, pool.index, shape)
        hit = self._keys.get(memo)
        if hit is not None and self._hashes.get(id(graph), (None,))[0] is graph:
            return hit
        skey = self._shape_keys.get((pool.index, shape))
        if skey is None:
            skey = self._shape_keys[(pool.index, shape)] = pool.shape_key(shape, self.cluster)
        key = self._keys[memo] = f"{self.config_key(job, graph)}|{skey}"
        return key

    # ------------------------------------------------------------------ prices
    def price(self, job: JobSpec, graph: OpGraph, pool: Pool, shape: Shape) -> Price:
        """The job's price on ``shape`` of ``pool`` (cached; planned on a miss)."""
        key = self._key(job, graph, pool, shape)
        skey = key.split("|", 1)[1]
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        sub = pool.sub_cluster(shape, self.cluster)
        t0 = time.perf_counter()
        try:
            plan = plan_on(graph, sub, job, time_limit_s=self.time_limit_s)
        except DistplanError as e:
            price = Price(skey, False, reason=str(e), seconds=time.perf_counter() - t0)
        else:
            cu, mu = _utilisation(graph, plan, sub, job)
            price = Price(
                skey,
                True,
                throughput_samples_s=plan.predictions.throughput_samples_s,
                iteration_time_s=plan.predictions.iteration_time_s,
                devices_used=len(plan.devices_used),
                memory_bytes=max((s.memory_bytes for s in plan.stages), default=0),
                compute_util=cu,
                memory_util=mu,
                plan=plan,
                seconds=time.perf_counter() - t0,
            )
        self.calls += 1
        self.seconds += price.seconds
        self._cache[key] = price
        return price

    def options(
        self,
        job: JobSpec,
        graph: OpGraph,
        pools: Sequence[Pool],
        lo: int | None = None,
        hi: int | None = None,
    ) -> list[tuple[Shape, Price]]:
        """Every feasible, non-dominated shape of the job with ``lo..hi`` devices (default: its min..max),
        priced, pool by pool and smallest first (see [Note: pricing] for what is skipped)."""
        lo = job.min_devices if lo is None else lo
        hi = job.max_devices if hi is None else hi
        out: list[tuple[Shape, Price]] = []
        for pool in pools:
            here = 0
            for shape in pool.shapes(lo, hi):
                pr = self.price(job, graph, pool, shape)
                if not pr.feasible:
                    continue
                idle = pr.devices_used < shape.devices
                if idle and here:
                    break  # the planner leaves devices idle: a smaller shape does as well, larger ones too
                out.append((shape, pr))
                here += 1
                if idle:
                    break  # the job's minimum forces idle devices; more would idle too
        return out

    def restart_s(self, job: JobSpec, graph: OpGraph, save_hosts: int, load_hosts: int) -> float:
        """Seconds a (re)start costs the job (see [Note: restart cost]): a checkpoint save from
        ``save_hosts`` hosts (0: nothing to save, the job is not running), a load onto ``load_hosts`` hosts
        (0: no checkpoint yet, a first start) and the restart overhead."""
        net = self.cluster.network
        nbytes = state_bytes(graph, job.optimizer)
        save = self.restart.transfer_s(nbytes, save_hosts, net) if save_hosts else 0.0
        load = self.restart.transfer_s(nbytes, load_hosts, net) if load_hosts else 0.0
        return save + load + self.restart.restart_overhead_s

    def save_s(self, job: JobSpec, graph: OpGraph, hosts: int) -> float:
        """Seconds to save the job's checkpoint from ``hosts`` hosts."""
        return self.restart.transfer_s(state_bytes(graph, job.optimizer), hosts, self.cluster.network)

    def load_s(self, job: JobSpec, graph: OpGraph, hosts: int) -> float:
        """Seconds to load the job's checkpoint onto ``hosts`` hosts."""
        return self.restart.transfer_s(state_bytes(graph, job.optimizer), hosts, self.cluster.network)

    # ------------------------------------------------------------------ persistence
    def entries(self) -> dict[str, Price]:
        """A copy of the cache: price key -> :class:`Price` (what :meth:`merge` takes)."""
        return dict(self._cache)

    def merge(self, prices: Mapping[str, Price]) -> int:
        """Add prices computed elsewhere (another process's pricer of the same cluster and time limit: keys
        name everything a price depends on); returns how many were new."""
        new = 0
        for k, v in prices.items():
            if k not in self._cache:
                new += 1
            self._cache[k] = v
        return new

    def document(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """The cache (or the entries ``keys``) as the JSON document :meth:`save` writes."""
        chosen = self._cache if keys is None else {k: self._cache[k] for k in keys if k in self._cache}
        return {
            "schema_version": PRICE_CACHE_VERSION,
            "plan_schema_version": PLAN_SCHEMA_VERSION,
            "prices": {k: v.to_dict() for k, v in chosen.items()},
        }

    @staticmethod
    def read_document(doc: Any, where: str = "price cache") -> dict[str, Price]:
        """The prices of a :meth:`document`; one of another cache or plan version reads as empty, and an
        entry that does not read back is left out (those prices are planned again)."""
        if (
            not isinstance(doc, Mapping)
            or doc.get("schema_version") != PRICE_CACHE_VERSION
            or doc.get("plan_schema_version") != PLAN_SCHEMA_VERSION
            or not isinstance(doc.get("prices"), Mapping)
        ):
            return {}
        out: dict[str, Price] = {}
        for k, v in doc["prices"].items():
            try:
                out[str(k)] = Price.from_dict(v, f"{where}.prices[{k}]")
            except DistplanError:
                continue
        return out

    def save(self, path: str | Path | None = None) -> None:
        """Write the cache as JSON (to ``path`` or :attr:`cache_path`)."""
        p = Path(path) if path is not None else self.cache_path
        if p is None:
            raise SchedulerError("no price cache file to save to (give a path)")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(self.document()))
        tmp.replace(p)

    def load(self, path: str | Path) -> None:
        """Merge a cache file written by :meth:`save`. A file of another cache or plan version is ignored, and
        so is an entry that does not read back: those prices are planned again.

        Raises:
            SchedulerError: the file cannot be read or is not JSON.
        """
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SchedulerError(f"price cache {str(p)!r} cannot be read: {e}") from e
        self.merge(self.read_document(doc, str(p)))

    def __len__(self) -> int:
        return len(self._cache)


# ---------------------------------------------------------------------------------------------- plans
def global_layout(plan: Plan, devices: Sequence[int]) -> str:
    """``plan.layout`` with the sub-cluster's device ``i`` written as ``devices[i]`` (global indices)."""
    layout = parse_layout(plan.layout)
    parts = [f"{layout.schedule} m{layout.num_microbatches}x{layout.microbatch_size}"]
    for st in layout.stages:
        text = f"{st.start}:{st.end}@{','.join(str(devices[d]) for d in st.devices)}"
        text += f" tp{st.tp}" if st.tp != 1 else ""
        text += f" rc={st.recompute}" if st.recompute != "none" else ""
        text += f" sh={st.shard}" if st.shard != "none" else ""
        parts.append(text)
    return " | ".join(parts)


def plan_on_devices(plan: Plan, cluster: Cluster, devices: Sequence[int]) -> Plan:
    """The plan re-addressed to ``cluster``'s devices: sub-cluster device ``i`` becomes ``devices[i]``.

    ``devices`` are the job's global device indices in host-major order (as :class:`Placer` hands them
    out), so the plan's rank order is kept. The result passes ``Plan.check()`` against ``cluster``.
    """
    if len(devices) < len(plan.devices_used) or max(plan.devices_used) >= len(devices):
        raise SchedulerError(
            f"plan {plan.id[:12]} uses {len(plan.devices_used)} devices but only {len(devices)} were given"
        )
    stages = tuple(dataclasses.replace(s, devices=tuple(devices[d] for d in s.devices)) for s in plan.stages)
    mem = {devices[d]: v for d, v in plan.predictions.device_memory_bytes.items() if d < len(devices)}
    return dataclasses.replace(
        plan,
        request=dataclasses.replace(plan.request, cluster=cluster),
        stages=stages,
        rank_map=build_rank_map(cluster, [s.devices for s in stages]),
        predictions=dataclasses.replace(plan.predictions, device_memory_bytes=mem),
    )
