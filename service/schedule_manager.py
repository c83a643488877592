"""The schedulers a service instance runs: live :class:`~distplan.scheduler.Scheduler` objects over SQLite.

[Note: a job's way through the service]
1. ``POST /v1/schedulers/{id}/jobs`` checks the job with the plan request's rules (``specs.plan_spec``: the
   model, the batch arithmetic, the request spine) and the scheduler's (``JobSpec``), records it as
   ``pricing`` and queues a ``price`` task in the worker pool (:mod:`~distplan.service.schedule_work`):
   trace the model (or read the uploaded graph) and price every shape the policy will consult. The pricing
   is a content-addressed subject like a plan (cluster, policy, model, size, batch, device range), so a
   model seen before is priced once and its next submission is admitted at once.
2. When the prices are in, the job is *admitted*: the prices join the scheduler's cache (and the database),
   the graph is stored by content hash, and ``Scheduler.submit`` decides with every price cached -- no
   planner call on the decision path (see [Note: pricing off the decision path] in
   ``distplan.scheduler.core``). A pricing that fails rejects the job with the error (e.g. a model the
   tracer refuses); one cut off by a restart is run again when the service starts.
3. From then on the scheduler's state says where the job is. Executors report progress, completion and
   failures; clients cancel; the policy's ticks (ageing) are run by a timer thread.

Every change of a scheduler runs under its lock and ends with one transaction (state, new events, new
prices and graphs, job statuses: :meth:`ScheduleStore.save`), so a restart reads back exactly what was
answered. The scheduler's clock is Unix time (never moved backwards).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from distplan._serde import canonical_hash
from distplan.cluster import Cluster
from distplan.errors import DistplanError
from distplan.graph import OpGraph
from distplan.scheduler import (
    JobSpec,
    Price,
    Pricer,
    RestartModel,
    Scheduler,
    SchedulerError,
    make_policy,
)
from distplan.service.catalog import Catalog
from distplan.service.errors import ConflictError, ErrorKind, NotFoundError
from distplan.service.jobs import JobManager
from distplan.service.models import PlanCreate
from distplan.service.schedule_models import ScheduledJobCreate, SchedulerCreate
from distplan.service.schedule_store import SchedulerRow, ScheduleStore, SubmittedJob
from distplan.service.settings import Settings
from distplan.service.specs import check_cluster, plan_spec
from distplan.service.store import Store

__all__ = ["ScheduleManager"]

log = logging.getLogger("distplan.service.schedule")

#: How long the timer thread sleeps at most between looks at the schedulers' next ticks.
_TICK_POLL_S = 30.0


@dataclass(slots=True)
class _Live:
    """One scheduler in memory, with its lock and its next tick."""

    id: str
    name: str
    spec: dict[str, Any]
    sched: Scheduler
    lock: threading.RLock
    created_at: float
    next_tick: float | None = None


class ScheduleManager:
    """Registers schedulers, admits, cancels and reports jobs, runs ticks, and persists every change (see
    [Note: a job's way through the service])."""

    def __init__(
        self, store: Store, sstore: ScheduleStore, jobs: JobManager, settings: Settings, catalog: Catalog
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.sstore = sstore
        self.jobs = jobs
        self.settings = settings
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._timer: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitted: dict[tuple[str, str], asyncio.Event] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> list[tuple[str, str, str]]:
        """Load every stored scheduler, then settle the jobs a previous server left being priced: admit
        those whose prices are in, queue the others' pricing again. Returns ``(scheduler, job, service
        job)`` for the pricings now queued, to be watched (:meth:`watch`). Starts the tick timer."""
        prices = _read_prices(self.sstore.prices())
        for row in self.sstore.schedulers():
            try:
                self._live[row.id] = self._restore(row, prices)
            except SchedulerError as e:  # a state this distplan cannot read: keep the rest running
                log.error("scheduler %s could not be restored: %s", row.id, e)
        queued = []
        for live in list(self._live.values()):
            for sj in self.sstore.jobs(live.id, status="pricing"):
                job_id = self._settle(live, sj)
                if job_id is not None:
                    queued.append((live.id, sj.job_id, job_id))
        self._timer = threading.Thread(target=self._tick_loop, name="distplan-scheduler-ticks", daemon=True)
        self._timer.start()
        return queued

    def stop(self) -> None:
        """Stop the tick timer and the pricing watchers (their jobs are resumed at the next start)."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        if self._timer is not None:
            self._timer.join(timeout=10)
        for t in list(self._tasks):
            t.cancel()

    def _restore(self, row: SchedulerRow, prices: dict[str, Price]) -> _Live:
        pricer = self._pricer(row.spec)
        pricer.merge(prices)
        graphs: dict[str, OpGraph] = {}
        by_hash: dict[str, OpGraph] = {}
        for sj in self.sstore.jobs(row.id, status="admitted"):
            if sj.graph_hash is None:
                continue
            if sj.graph_hash not in by_hash:
                text = self.sstore.graph(sj.graph_hash)
                if text is None:
                    continue
                by_hash[sj.graph_hash] = OpGraph.from_json(text)
            graphs[str(sj.spec["graph"])] = by_hash[sj.graph_hash]
        sched = Scheduler.from_dict(row.state, pricer=pricer, graphs=graphs)
        live = _Live(row.id, row.name, row.spec, sched, threading.RLock(), row.created_at)
        live.next_tick = sched.next_tick()
        return live

    @staticmethod
    def _pricer(spec: dict[str, Any]) -> Pricer:
        pricing = spec["pricing"]
        cluster = Cluster.from_dict(spec["cluster"])
        return Pricer(
            cluster,
            time_limit_s=float(pricing["time_limit_s"]),
            restart=RestartModel.from_dict(pricing["restart"]),
        )

    # ------------------------------------------------------------------ schedulers
    def create(self, body: SchedulerCreate) -> dict[str, Any]:
        """Register a scheduler (cluster checked as for a plan; policy and its parameters by the
        scheduler's own rules). Raises ``DistplanError`` subclasses naming the field."""
        cluster = check_cluster(
            body.cluster,
            max_devices=self.settings.max_cluster_devices,
            calibration=lambda cid: _uploaded(self.store, cid),
        )
        policy = make_policy(body.policy, **body.policy_params)
        restart = RestartModel(
            restart_overhead_s=body.restart_overhead_s,
            storage_bandwidth_bytes_s=body.storage_bandwidth_bytes_s,
            interference=body.interference,
        )
        spec = {
            "cluster": cluster.to_dict(),
            "cluster_request": body.cluster,
            "policy": {"name": policy.name, "params": policy.params()},
            "pricing": {"time_limit_s": body.pricing_time_limit_s, "restart": restart.to_dict()},
        }
        pricer = self._pricer(spec)
        pricer.merge(self._stored_prices())
        now = time.time()
        sched = Scheduler(cluster, policy, pricer=pricer, start_s=now, keep_decisions=False)
        sid = uuid.uuid4().hex
        row = self.sstore.create(sid, body.name, spec, sched.to_dict(graphs=False, events=False))
        live = _Live(sid, body.name, spec, sched, threading.RLock(), row.created_at)
        with self._lock:
            self._live[sid] = live
        return self.public(live)

    def _stored_prices(self) -> dict[str, Price]:
        return _read_prices(self.sstore.prices())

    def get(self, sid: str) -> _Live:
        with self._lock:
            live = self._live.get(sid)
        if live is None:
            raise NotFoundError(f"no scheduler with id {sid!r} (POST /v1/schedulers to register one)")
        return live

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            lives = sorted(self._live.values(), key=lambda lv: (lv.created_at, lv.id))
        return [self.public(lv) for lv in lives]

    def public(self, live: _Live) -> dict[str, Any]:
        with live.lock:
            counts: dict[str, int] = {}
            for sj in self.sstore.jobs(live.id):
                st = self._status(live, sj)
                counts[st] = counts.get(st, 0) + 1
            return {
                "id": live.id,
                "name": live.name,
                "cluster": live.sched.cluster.name,
                "num_devices": live.sched.cluster.num_devices,
                "policy": live.sched.policy.name,
                "policy_params": live.sched.policy.params(),
                "created_at": live.created_at,
                "time_s": live.sched.now,
                "jobs": counts,
                "links": _links(live.id),
            }

    # ------------------------------------------------------------------ jobs in
    def submit(self, sid: str, body: ScheduledJobCreate) -> tuple[dict[str, Any], str | None, bool]:
        """Check and record a job and queue its pricing (see [Note: a job's way through the service]).

        Returns the job's public form, the service job pricing it (None when its prices were in already)
        and whether it was admitted at once.

        Raises:
            DistplanError: bad model, batch or scheduling fields (naming the field); ``ConflictError``: the
                job id is taken; ``QueueFullError``: the worker pool's queue is full.
        """
        live = self.get(sid)
        cluster_req = live.spec["cluster_request"]
        check = PlanCreate.model_validate(
            {
                "model": body.model,
                "batch": body.batch,
                "seq": body.seq,
                "cluster": cluster_req,
                "global_batch": body.global_batch,
                "dtype": body.dtype,
                "optimizer": body.optimizer,
            }
        )
        ps = plan_spec(
            check,
            settings=self.settings,
            catalog=self.catalog,
            calibration=lambda cid: _uploaded(self.store, cid),
        )
        model = ps.request["model"]
        graph_key = (
            f"graph-{model['graph'][:16]}"
            if "graph" in model
            else "model-" + canonical_hash({"model": model, "batch": body.batch, "seq": body.seq})[:16]
        )
        now = max(time.time(), live.sched.now)
        jid = body.id or f"job-{uuid.uuid4().hex[:12]}"
        spec = JobSpec(
            id=jid,
            graph=graph_key,
            global_batch=body.global_batch,
            dtype=body.dtype,
            optimizer=body.optimizer,
            priority=body.priority,
            min_devices=body.min_devices,
            max_devices=body.max_devices if body.max_devices is not None else body.min_devices,
            arrival_s=now,
            total_steps=body.total_steps,
            deadline_s=None if body.deadline_in_s is None else now + body.deadline_in_s,
            name=body.name,
        )
        if spec.min_devices > live.sched.cluster.num_devices:
            raise SchedulerError(
                f"min_devices: {spec.min_devices} is more than the cluster's {live.sched.cluster.num_devices} "
                f"devices (by {spec.min_devices - live.sched.cluster.num_devices})"
            )
        request = {
            "kind": "price",
            "v": 1,
            "cluster": live.spec["cluster"],
            "policy": live.spec["policy"]["name"],
            "pricing": live.spec["pricing"],
            "model": model,
            "batch": ps.request["batch"],
            "seq": ps.request["seq"],
            "job": {
                "global_batch": spec.global_batch,
                "dtype": spec.dtype,
                "optimizer": spec.optimizer,
                "min_devices": spec.min_devices,
                "max_devices": spec.max_devices,
            },
        }
        price_id = canonical_hash(request)
        uploaded = (model["graph"], ps.graph_json) if ps.graph_json is not None and "graph" in model else None
        with live.lock:
            sj = self.sstore.add_job(sid, jid, request, spec.to_dict(), price_id, uploaded)
            if sj is None:
                raise ConflictError(f"scheduler {sid} already has a job {jid!r}; give another id")
        try:
            service_job = self._queue_pricing(sj)
        except Exception:
            self.sstore.set_job_status(
                sid, jid, "rejected", error=("QueueFullError", "not queued", "queue_full")
            )
            raise
        admitted = False
        if service_job is None:
            admitted = self.settle(sid, jid)
        return self.job_public(sid, jid), service_job, admitted

    def _queue_pricing(self, sj: SubmittedJob) -> str | None:
        """Queue the job's pricing unless its prices are in; the service job id, or None."""
        graph = None
        if sj.graph_hash is not None and "graph" in sj.request["model"]:
            text = self.sstore.graph(sj.graph_hash)
            graph = json.loads(text) if text is not None else None
        payload = {"request": sj.request, "graph": graph, "max_graph_nodes": self.settings.max_graph_nodes}
        rec, job = self.jobs.submit(
            "price", sj.price_id, sj.request, payload, timeout_s=self.settings.plan_job_timeout_s
        )
        if job is not None:
            return job.id
        if rec.status in ("queued", "running"):
            return rec.job_id
        return None

    def _settle(self, live: _Live, sj: SubmittedJob) -> str | None:
        """At startup: admit a job whose prices are in, re-queue a pricing cut off by the restart, reject
        one whose pricing failed for good. Returns the service job to watch, if any."""
        rec = self.store.get("price", sj.price_id)
        if rec is not None and (rec.status == "done" or (rec.status == "failed" and not rec.retryable)):
            self.settle(live.id, sj.job_id)
            return None
        try:
            return self._queue_pricing(sj)
        except Exception as e:  # queue full at startup: reject with the reason, the client may resubmit
            self.sstore.set_job_status(
                live.id, sj.job_id, "rejected", error=(type(e).__name__, str(e), ErrorKind.QUEUE_FULL.value)
            )
            return None

    def settle(self, sid: str, jid: str) -> bool:
        """The job's pricing has ended: admit it (its prices are in) or reject it (the pricing failed).
        Returns whether it was admitted. A job cancelled meanwhile stays cancelled."""
        live = self.get(sid)
        with live.lock:
            sj = self.sstore.job(sid, jid)
            if sj is None or sj.status != "pricing":
                return False
            rec = self.store.get("price", sj.price_id)
            if rec is None or rec.status in ("queued", "running"):
                return False
            if rec.status == "failed":
                self.sstore.set_job_status(
                    sid,
                    jid,
                    "rejected",
                    error=(
                        rec.error_type or "Error",
                        rec.error_message or "",
                        (rec.error_kind or ErrorKind.INTERNAL).value,
                    ),
                )
                return False
            prices_text = self.store.artifact(sj.price_id, "prices")
            graph_text = self.store.artifact(sj.price_id, "graph")
            if prices_text is None or graph_text is None:
                self.sstore.set_job_status(
                    sid, jid, "rejected", error=("InternalError", "the pricing stored no prices", "internal")
                )
                return False
            doc = json.loads(prices_text)
            prices = Pricer.read_document(doc, f"pricing {sj.price_id}")
            graph = OpGraph.from_json(graph_text)
            spec = JobSpec.from_dict(sj.spec)
            live.sched.pricer.merge(prices)
            now = max(time.time(), live.sched.now)
            live.sched.submit(spec, now, graph=graph)
            self._persist(
                live,
                prices=doc.get("prices", {}),
                graphs={graph.content_hash: graph_text},
                job_status={jid: "admitted"},
                graph_hash=(jid, graph.content_hash),
            )
        return True

    def watch(self, sid: str, jid: str, service_job: str) -> asyncio.Event:
        """Admit the job when its pricing ends (an asyncio task on the running loop); the returned event is
        set once it is settled."""
        key = (sid, jid)
        ev = self._admitted.get(key)
        if ev is None:
            ev = self._admitted[key] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._await_pricing(sid, jid, service_job, ev))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ev

    async def _await_pricing(self, sid: str, jid: str, service_job: str, ev: asyncio.Event) -> None:
        from fastapi.concurrency import run_in_threadpool

        try:
            while not self._stopping.is_set():
                job = await self.jobs.wait(service_job, 30.0)
                if job is None or job.status in ("done", "failed"):
                    break
            if not self._stopping.is_set():
                await run_in_threadpool(self.settle, sid, jid)
        except asyncio.CancelledError:
            raise
        except Exception:  # keep the server up; the job stays `pricing` and is settled at the next start
            log.exception("settling job %s of scheduler %s failed", jid, sid)
        finally:
            ev.set()
            self._admitted.pop((sid, jid), None)

    # ------------------------------------------------------------------ jobs: events from executors and users
    def _record(self, live: _Live, jid: str) -> Any:
        rec = live.sched.jobs.get(jid)
        if rec is None:
            sj = self.sstore.job(live.id, jid)
            if sj is None:
                raise NotFoundError(f"scheduler {live.id} has no job {jid!r}")
            raise ConflictError(f"job {jid!r} is {self._status(live, sj)}; the scheduler has not admitted it")
        return rec

    def cancel(self, sid: str, jid: str) -> dict[str, Any]:
        live = self.get(sid)
        with live.lock:
            sj = self.sstore.job(sid, jid)
            if sj is None:
                raise NotFoundError(f"scheduler {sid} has no job {jid!r}")
            if sj.status == "pricing":
                self.sstore.set_job_status(sid, jid, "cancelled", only_from="pricing")
                return self.job_public(sid, jid)
            rec = self._record(live, jid)
            if not rec.active:
                raise ConflictError(
                    f"job {jid!r} is {rec.status}; only a waiting or running job can be cancelled"
                )
            live.sched.cancel(jid, max(time.time(), live.sched.now))
            self._persist(live)
        return self.job_public(sid, jid)

    def finish(self, sid: str, jid: str) -> dict[str, Any]:
        live = self.get(sid)
        with live.lock:
            rec = self._record(live, jid)
            if not rec.running:
                raise ConflictError(f"job {jid!r} is {rec.status}; only a running job can finish")
            live.sched.finish(jid, max(time.time(), live.sched.now))
            self._persist(live)
        return self.job_public(sid, jid)

    def fail(self, sid: str, jid: str, reason: str) -> dict[str, Any]:
        live = self.get(sid)
        with live.lock:
            rec = self._record(live, jid)
            if not rec.running:
                raise ConflictError(f"job {jid!r} is {rec.status}; only a running job can fail")
            live.sched.fail(jid, max(time.time(), live.sched.now))
            self._persist(live, note=(jid, reason) if reason else None)
        return self.job_public(sid, jid)

    def progress(self, sid: str, jid: str, steps: int | None, samples: float | None) -> dict[str, Any]:
        if (steps is None) == (samples is None):
            raise SchedulerError("progress: give exactly one of steps_done or samples_done")
        live = self.get(sid)
        with live.lock:
            rec = self._record(live, jid)
            done = float(samples) if samples is not None else float(steps or 0) * rec.spec.global_batch
            live.sched.report_progress(jid, done, max(time.time(), live.sched.now))
            self._persist(live)
        return self.job_public(sid, jid)

    # ------------------------------------------------------------------ reading
    def _status(self, live: _Live, sj: SubmittedJob) -> str:
        if sj.status != "admitted":
            return sj.status
        rec = live.sched.jobs.get(sj.job_id)
        return rec.status if rec is not None else "rejected"

    def job_public(self, sid: str, jid: str) -> dict[str, Any]:
        live = self.get(sid)
        with live.lock:
            sj = self.sstore.job(sid, jid)
            if sj is None:
                raise NotFoundError(f"scheduler {sid} has no job {jid!r}")
            return self._job_public(live, sj)

    def jobs_public(self, sid: str) -> list[dict[str, Any]]:
        live = self.get(sid)
        with live.lock:
            return [self._job_public(live, sj) for sj in self.sstore.jobs(sid)]

    def _job_public(self, live: _Live, sj: SubmittedJob) -> dict[str, Any]:
        spec = sj.spec
        rec = live.sched.jobs.get(sj.job_id) if sj.status == "admitted" else None
        price = self.store.get("price", sj.price_id)
        pricing: dict[str, Any] = {"price_id": sj.price_id, "job_id": price.job_id if price else None}
        for p in live.sched.pricings:
            if p.job_id == sj.job_id:
                pricing.update(planner_calls_at_admission=p.planner_calls, admission_s=p.seconds)
        summary = self.store.artifact(sj.price_id, "pricing")
        if summary is not None:
            pricing.update(json.loads(summary))
        error = None
        if sj.error_type is not None:
            error = {"type": sj.error_type, "message": sj.error_message or ""}
        placement = None
        wait_reason = None
        if rec is not None and rec.running and rec.placement is not None:
            placement = self._placement(live, rec.placement)
        if rec is not None and rec.status == "waiting":
            alloc = live.sched.allocation()
            wait_reason = next((w.reason for w in alloc.waiting if w.job_id == sj.job_id), None)
        return {
            "id": sj.job_id,
            "scheduler_id": live.id,
            "status": self._status(live, sj),
            "name": spec.get("name", ""),
            "priority": spec["priority"],
            "min_devices": spec["min_devices"],
            "max_devices": spec["max_devices"],
            "global_batch": spec["global_batch"],
            "total_steps": spec.get("total_steps"),
            "submitted_at": sj.created_at,
            "model": sj.request["model"],
            "placement": placement,
            "wait_reason": wait_reason,
            "samples_done": rec.samples_done if rec is not None else 0.0,
            "steps_done": rec.samples_done / spec["global_batch"] if rec is not None else 0.0,
            "preemptions": rec.preemptions if rec is not None else 0,
            "pricing": pricing,
            "error": error,
            "links": {
                "self": f"/v1/schedulers/{live.id}/jobs/{sj.job_id}",
                "scheduler": f"/v1/schedulers/{live.id}",
                **({"pricing_job": f"/v1/jobs/{price.job_id}"} if price is not None and price.job_id else {}),
            },
        }

    def _placement(self, live: _Live, pl: Any) -> dict[str, Any]:
        out = pl.to_dict()
        plan = live.sched.plan(pl.job_id)
        # One id for the plan a client sees: the plan on the job's devices (what its manifest runs); the
        # plan priced on the shape (the same stages on canonical devices) keeps its own id beside it.
        out["shape_plan_id"] = pl.plan_id
        out["plan_id"] = plan.id
        out["layout"] = plan.layout
        out["plan"] = plan.to_dict()
        return out

    def allocation(self, sid: str) -> dict[str, Any]:
        live = self.get(sid)
        with live.lock:
            alloc = live.sched.allocation()
            return {
                "scheduler_id": sid,
                "time_s": alloc.time_s,
                "running": [self._placement(live, p) for p in alloc.running],
                "waiting": [w.to_dict() for w in alloc.waiting],
                "pricing": [sj.job_id for sj in self.sstore.jobs(sid, status="pricing")],
            }

    def plan(self, sid: str, jid: str) -> tuple[Any, SubmittedJob]:
        """A running job's plan on its devices, and its record (for launchers and manifests)."""
        live = self.get(sid)
        with live.lock:
            rec = self._record(live, jid)
            if not rec.running:
                raise ConflictError(f"job {jid!r} is {rec.status}; only a running job has a plan")
            sj = self.sstore.job(sid, jid)
            assert sj is not None
            return live.sched.plan(jid), sj

    def rejection_kind(self, sid: str, jid: str) -> str:
        """The error kind of a rejected job's pricing (what its HTTP status is derived from)."""
        sj = self.sstore.job(sid, jid)
        return (sj.error_kind if sj is not None else None) or ErrorKind.INTERNAL.value

    def manifest(self, sid: str, jid: str, fmt: str, image: str) -> str:
        """A running job as a Kubernetes Indexed Job or a Slurm script (``distplan.presentation.manifests``):
        each host runs its ``torchrun`` line of the job's plan, resuming from ``/checkpoints/<job>`` when the
        job has a checkpoint. The model is the request's built-in name; an ``hf_config`` is read as
        ``config.json`` beside ``train.py``, and a graph names no code (fill in ``--model``)."""
        from distplan.lowering.launcher import host_commands, scheduled_train_args
        from distplan.presentation.manifests import RDZV, ManifestJob, render_manifest

        live = self.get(sid)
        plan, sj = self.plan(sid, jid)
        with live.lock:
            rec = live.sched.jobs[jid]
            done = int(rec.samples_done // rec.spec.global_batch)
            resume = rec.has_checkpoint
        model = sj.request["model"]
        spec = (
            str(model["builtin"])
            if "builtin" in model
            else "config.json"
            if "hf_config" in model
            else "your_package.module:factory"
        )
        args = scheduled_train_args(
            spec,
            job_id=jid,
            steps_left=None if rec.spec.total_steps is None else rec.spec.total_steps - done,
            seq=sj.request["seq"] or 512,
            optimizer=rec.spec.optimizer,
            resume=resume,
        )
        hosts = host_commands(plan, args=args, endpoint=RDZV)
        vendor = {k.vendor for k in plan.request.cluster.kinds.values()}
        resource = "amd.com/gpu" if vendor == {"AMD"} else "nvidia.com/gpu"
        job = ManifestJob.from_plan(
            plan, hosts, job_id=jid, priority=rec.spec.priority, image=image, resource=resource
        )
        return render_manifest(job, fmt)

    def events(self, sid: str, after: int, limit: int) -> dict[str, Any]:
        self.get(sid)
        rows = self.sstore.events(sid, after=after, limit=limit)
        return {
            "scheduler_id": sid,
            "events": [{"seq": seq, **body} for seq, body in rows],
            "next_after": rows[-1][0] if rows else after,
        }

    # ------------------------------------------------------------------ persistence and ticks
    def _persist(
        self,
        live: _Live,
        *,
        prices: dict[str, Any] | None = None,
        graphs: dict[str, str] | None = None,
        job_status: dict[str, str] | None = None,
        graph_hash: tuple[str, str] | None = None,
        note: tuple[str, str] | None = None,
    ) -> None:
        """Write the scheduler's state and its new events (one transaction); the events then leave memory
        (the database holds the log). ``note``: (job, text) added to that job's first new event (a failure's
        reason as an executor gave it)."""
        events = [e.to_dict() for e in live.sched.events]
        if note is not None:
            for e in events:
                if e["job_id"] == note[0]:
                    e["data"] = {**e["data"], "reason": note[1]}
                    e["detail"] = f"{e['detail']} ({note[1]})"
                    break
        state = live.sched.to_dict(graphs=False, events=False)
        self.sstore.save(
            live.id,
            state,
            events,
            prices,
            graphs,
            job_status,
            job_graphs=dict([graph_hash]) if graph_hash is not None else None,
        )
        live.sched.events.clear()
        live.next_tick = live.sched.next_tick()
        with self._wake:
            self._wake.notify_all()

    def _tick_loop(self) -> None:
        while not self._stopping.is_set():
            now = time.time()
            with self._lock:
                lives = list(self._live.values())
            nxt = math.inf
            for live in lives:
                t = live.next_tick
                if t is None:
                    continue
                if t <= now:
                    try:
                        with live.lock:
                            live.sched.tick(max(now, live.sched.now))
                            self._persist(live)
                    except Exception:  # keep ticking the others
                        log.exception("tick of scheduler %s failed", live.id)
                        live.next_tick = None
                    t = live.next_tick if live.next_tick is not None else math.inf
                nxt = min(nxt, t)
            wait = min(_TICK_POLL_S, max(0.0, nxt - time.time()))
            with self._wake:
                if not self._stopping.is_set():
                    self._wake.wait(timeout=wait)


def _links(sid: str) -> dict[str, str]:
    base = f"/v1/schedulers/{sid}"
    return {
        "self": base,
        "jobs": f"{base}/jobs",
        "allocation": f"{base}/allocation",
        "events": f"{base}/events",
    }


def _uploaded(store: Store, cid: str) -> dict[str, Any] | None:
    text = store.artifact(cid, "calibration")
    return None if text is None else dict(json.loads(text))


def _read_prices(rows: dict[str, Any]) -> dict[str, Price]:
    """Stored prices by key; an entry that does not read back (written by another distplan) is left out,
    and is planned again when a job needs it."""
    out: dict[str, Price] = {}
    for key, body in rows.items():
        try:
            out[key] = Price.from_dict(body, f"stored price {key}")
        except DistplanError:
            continue
    return out
