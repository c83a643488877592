"""Solve and validation jobs: a bounded pool of worker processes with per-job time limits and cancellation.

[Note: why not ProcessPoolExecutor]
``concurrent.futures.ProcessPoolExecutor`` cannot stop a task that has started: ``Future.cancel`` only works
while it waits, and killing one of its processes breaks the whole pool (every other running job fails with
``BrokenProcessPool``). A solver that overruns or a client that cancels must stop *its* job only. So each of
the ``workers`` slots owns one spawned process (``multiprocessing`` *spawn* context: no inherited locks or
threads from the server) and a dispatcher thread. A job that is cancelled or overruns its time limit gets its
process killed (with its process group, so a validation's rank processes go too) and the slot starts a new
one. The processes import torch, the tracer and the planner once at start (``warm-up``), so a job does not
pay for that; ``Settings.worker_init`` names a function each worker also runs then (e.g. to pre-import model
code). Jobs submitted during the warm-up wait in the queue and run when a worker is ready: nothing the API
answers depends on the workers' state (requests are checked against :mod:`distplan.service.catalog`).

Jobs and results cross the process boundary as JSON bytes (``send_bytes``/``recv_bytes``), never pickles.

The queue is bounded: when ``queue_limit`` jobs already wait for a worker, :meth:`JobManager.submit` raises
:class:`~distplan.service.errors.QueueFullError` (answered ``429`` with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from distplan.service.catalog import Catalog
from distplan.service.errors import ConflictError, ErrorKind, NotFoundError, QueueFullError
from distplan.service.settings import Settings
from distplan.service.store import Failure, JobRecord, Store, SubjectKind, SubjectRecord

__all__ = ["JobManager"]

log = logging.getLogger("distplan.service.jobs")

_POLL_S = 0.05
# What a client can change in its request when a job of this kind overruns the server's limit.
_TIMEOUT_ADVICE = {
    "plan": "send a model with fewer layers, a lower time_limit_s, or a graph traced elsewhere",
    "validation": "send fewer steps, or validate where you have the time: `distplan validate` with the "
    "plan.json of GET /v1/plans/{id}/launcher",
}
_READY_TIMEOUT_S = 300.0


@dataclass(slots=True)
class _Item:
    job_id: str
    kind: str
    subject_id: str
    payload: dict[str, Any]
    timeout_s: float
    cancel: threading.Event = field(default_factory=threading.Event)


class _Slot:
    """One worker process and the pipe to it."""

    def __init__(self, index: int, worker_init: str | None = None) -> None:
        self.index = index
        self.worker_init = worker_init
        self.ready = False
        self.catalog: dict[str, Any] | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None

    def start(self) -> None:
        from distplan.service.work import worker_main

        parent, child = self._ctx.Pipe(duplex=True)
        # Not a daemon: a validation job starts rank processes, which daemonic processes may not do.
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, self.worker_init),
            name=f"distplan-worker-{self.index}",
            daemon=False,
        )
        proc.start()
        child.close()
        self._proc, self._conn, self.ready = proc, parent, False

    def wait_ready(self, stopping: threading.Event) -> bool:
        """Block until the worker has warmed up; ``False`` if it died or the manager stops."""
        assert self._conn is not None
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not stopping.is_set() and time.monotonic() < deadline:
            try:
                if self._conn.poll(_POLL_S):
                    msg = json.loads(self._conn.recv_bytes())
                    self.ready = bool(msg.get("ready"))
                    if self.ready:
                        self.catalog = msg.get("catalog")
                    else:
                        log.error("worker %d failed to start: %s", self.index, msg.get("error"))
                    return self.ready
            except (EOFError, OSError):
                return False
            if not self._proc.is_alive():
                return False
        return False

    def kill(self) -> None:
        """Kill the worker and every process it started (it leads its own process group)."""
        proc = self._proc
        self.ready = False
        if proc is None:
            return
        if proc.is_alive() and proc.pid is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        proc.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def run(self, item: _Item, stopping: threading.Event) -> tuple[dict[str, str] | None, Failure | None]:
        """Run one job; return its artifacts or why it failed. Kills and restarts the worker on timeout or
        cancellation."""
        assert self._conn is not None
        deadline = time.monotonic() + item.timeout_s
        try:
            self._conn.send_bytes(json.dumps({"task": item.kind, "payload": item.payload}).encode())
        except (BrokenPipeError, OSError) as e:
            self._restart()
            return None, Failure(
                "WorkerCrashed", f"could not hand the job to a worker ({e}); retry", ErrorKind.WORKER_CRASHED
            )
        while True:
            try:
                if self._conn.poll(_POLL_S):
                    msg = json.loads(self._conn.recv_bytes())
                    break
            except (EOFError, OSError):
                code = self._proc.exitcode if self._proc is not None else None
                self._restart()
                return None, Failure(
                    "WorkerCrashed",
                    f"the worker process died (exit code {code}) while running this {item.kind} job, "
                    "most likely out of memory; retry, or use a smaller model",
                    ErrorKind.WORKER_CRASHED,
                )
            if item.cancel.is_set() or stopping.is_set():
                if stopping.is_set():
                    self.kill()
                else:
                    self._restart()
                if item.cancel.is_set():
                    return None, Failure(
                        "Cancelled",
                        f"{item.kind} job {item.job_id} was cancelled by a client",
                        ErrorKind.CANCELLED,
                    )
                return None, Failure(
                    "Interrupted",
                    "the server shut down while this job ran; submit the request again to retry",
                    ErrorKind.INTERRUPTED,
                )
            if time.monotonic() > deadline:
                self._restart()
                return None, Failure(
                    "JobTimeout",
                    f"{item.kind} job ran longer than the server's limit of {item.timeout_s:g} s and was stopped; "
                    + _TIMEOUT_ADVICE.get(item.kind, "use a smaller model"),
                    ErrorKind.TIMEOUT,
                )
        if msg.get("ok"):
            return {str(k): str(v) for k, v in msg["artifacts"].items()}, None
        try:
            kind = ErrorKind(msg.get("kind"))
        except ValueError:
            kind = ErrorKind.INTERNAL
        return None, Failure(str(msg.get("type", "InternalError")), str(msg.get("message", "")), kind)

    def _restart(self) -> None:
        self.kill()
        self.start()


class JobManager:
    """Queue, run, time-limit and cancel jobs; record every state change in the :class:`Store`."""

    def __init__(self, store: Store, settings: Settings, catalog: Catalog | None = None) -> None:
        self.store = store
        self.settings = settings
        self._catalog = catalog
        self._catalog_checked = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: deque[_Item] = deque()
        self._running: dict[str, _Item] = {}
        self._idle = 0
        self._slots = [_Slot(i, settings.worker_init) for i in range(settings.workers)]
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker processes and their dispatcher threads (returns at once; see :attr:`ready`)."""
        for slot in self._slots:
            t = threading.Thread(
                target=self._loop, args=(slot,), name=f"distplan-dispatch-{slot.index}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop dispatching, fail what is queued (``Interrupted``), kill the workers."""
        self._stopping.set()
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for item in pending:
            self.store.fail(
                item.job_id,
                Failure("Interrupted", "the server shut down before this job ran", ErrorKind.INTERRUPTED),
            )
        for t in self._threads:
            t.join(timeout=15)
        for slot in self._slots:
            slot.kill()

    @property
    def ready(self) -> bool:
        """Whether a worker has warmed up, so queued work runs now (``/readyz``). Work is accepted and
        queued before that too. A worker being replaced after a cancellation does not make the instance
        unready; ``stats`` has the counts."""
        return any(s.ready for s in self._slots)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "workers": len(self._slots),
                "workers_ready": sum(s.ready for s in self._slots),
                "queued": len(self._pending),
                "running": len(self._running),
                "queue_limit": self.settings.queue_limit,
            }

    # ------------------------------------------------------------------ submit / wait / cancel
    def submit(
        self,
        kind: SubjectKind,
        subject_id: str,
        request: dict[str, Any],
        payload: dict[str, Any],
        *,
        timeout_s: float,
        parent_id: str | None = None,
        artifacts: dict[str, str] | None = None,
    ) -> tuple[SubjectRecord, JobRecord | None]:
        """The subject with this id; queue a job for it unless it exists (and did not fail retryably).

        Raises ``QueueFullError`` when a new job would exceed the queue limit.
        """
        with self._cond:
            existing = self.store.get(kind, subject_id)
            if existing is not None and not (existing.status == "failed" and existing.retryable):
                return existing, None
            waiting = len(self._pending) - self._idle
            if waiting >= self.settings.queue_limit:
                raise QueueFullError(
                    f"the job queue is full ({len(self._pending)} jobs wait for {len(self._slots)} workers, "
                    f"limit {self.settings.queue_limit}); retry in {self.settings.retry_after_s} s",
                    retry_after_s=self.settings.retry_after_s,
                )
            record, job = self.store.submit(
                kind, subject_id, request, parent_id=parent_id, artifacts=artifacts
            )
            if job is not None:
                self._pending.append(_Item(job.id, kind, subject_id, payload, timeout_s))
                self._cond.notify()
            return record, job

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """Wait up to ``timeout_s`` for a job to end; return its record (ended or not)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.setdefault(job_id, []).append(fut)
        try:
            job = self.store.job(job_id)
            if job is None or job.status in ("done", "failed") or timeout_s <= 0:
                return job
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout_s)
            return self.store.job(job_id)
        finally:
            with self._lock:
                lst = self._waiters.get(job_id, [])
                if fut in lst:
                    lst.remove(fut)
                if not lst:
                    self._waiters.pop(job_id, None)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job (a running one is killed by its slot within ~50 ms)."""
        with self._cond:
            job = self.store.job(job_id)
            if job is None:
                raise NotFoundError(f"no job with id {job_id!r}")
            if job.status in ("done", "failed"):
                raise ConflictError(f"job {job_id} has already ended ({job.status}); nothing to cancel")
            for item in self._pending:
                if item.job_id == job_id:
                    self._pending.remove(item)
                    self.store.fail(
                        job_id,
                        Failure(
                            "Cancelled",
                            f"{item.kind} job {job_id} was cancelled by a client",
                            ErrorKind.CANCELLED,
                        ),
                    )
                    break
            else:
                running = self._running.get(job_id)
                if running is not None:
                    running.cancel.set()
        self._notify(job_id)
        job = self.store.job(job_id)
        assert job is not None
        return job

    # ------------------------------------------------------------------ dispatch
    def _notify(self, job_id: str) -> None:
        with self._lock:
            futs = list(self._waiters.get(job_id, ()))
        for fut in futs:
            fut.get_loop().call_soon_threadsafe(_resolve, fut)

    def _loop(self, slot: _Slot) -> None:
        slot.start()
        while not self._stopping.is_set():
            if not slot.ready and not slot.wait_ready(self._stopping):
                if self._stopping.is_set():
                    return
                log.error("worker %d did not start; restarting it in 5 s", slot.index)
                slot.kill()
                if self._stopping.wait(5.0):
                    return
                slot.start()
                continue
            self._check_catalog(slot)
            with self._cond:
                self._idle += 1
                while not self._pending and not self._stopping.is_set():
                    self._cond.wait()
                self._idle -= 1
                if self._stopping.is_set():
                    return
                item = self._pending.popleft()
                if not self.store.start(item.job_id):
                    continue
                self._running[item.job_id] = item
            try:
                artifacts, failure = slot.run(item, self._stopping)
            except Exception as e:  # a bug in the dispatcher itself: record it, keep the slot alive
                log.exception("dispatcher %d failed on job %s", slot.index, item.job_id)
                artifacts, failure = (
                    None,
                    Failure("InternalError", f"internal error ({type(e).__name__})", ErrorKind.INTERNAL),
                )
                slot.kill()
                slot.start()
            if failure is not None:
                self.store.fail(item.job_id, failure)
            else:
                assert artifacts is not None
                self.store.finish(item.job_id, artifacts)
            with self._lock:
                self._running.pop(item.job_id, None)
            self._notify(item.job_id)

    def _check_catalog(self, slot: _Slot) -> None:
        """Log once if the first warm worker's catalogue differs from the one the API checks requests
        against (a stale :data:`~distplan.service.catalog.BUILTIN_MODELS`, or another transformers)."""
        with self._lock:
            if self._catalog_checked or self._catalog is None or slot.catalog is None:
                return
            self._catalog_checked = True
        for line in self._catalog.differences(slot.catalog):
            log.warning("the API's catalogue differs from the workers': %s", line)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
