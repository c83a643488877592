"""SQLite tables of the schedulers the service runs (the same database file as :mod:`~distplan.service.store`).

Tables (created if missing; ``meta.schedule_schema_version`` = 1):

- ``schedulers``: one row per registered scheduler: ``spec`` (what it was created with: cluster, policy,
  pricing, the cluster as the client named it) and ``state``, the :class:`~distplan.scheduler.Scheduler`
  state without graphs and events (``Scheduler.to_dict(graphs=False, events=False)``), rewritten after
  every event, in the transaction that appends the event log.
- ``scheduler_jobs``: every job submitted to a scheduler, from the submission on: its request, its
  ``JobSpec``, the pricing subject that prices it (a row of ``prices``, run in the worker pool) and the
  service's status of it: ``pricing`` (its shapes are being priced), ``admitted`` (the scheduler has it:
  its state there says waiting, running, finished or cancelled), ``rejected`` (pricing failed: the error is
  kept) or ``cancelled`` (withdrawn while being priced).
- ``scheduler_events``: the append-only event log of each scheduler (``seq`` from 1).
- ``scheduler_prices``: the price cache (``Pricer`` entries by key, shared by every scheduler: a key names
  everything a price depends on).
- ``scheduler_graphs``: the graphs of admitted jobs by content hash (a scheduler's state names graphs by
  that hash).

One connection behind a lock (as :class:`~distplan.service.store.Store`); every write that belongs to one
event is one transaction, so a crash leaves the state, its events and its jobs consistent.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import Database

__all__ = ["ScheduleStore", "SchedulerRow", "SubmittedJob"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedulers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scheduler_jobs (
    scheduler_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    request TEXT NOT NULL,
    spec TEXT NOT NULL,
    price_id TEXT NOT NULL,
    graph_hash TEXT,
    status TEXT NOT NULL,
    error_type TEXT,
    error_message TEXT,
    error_kind TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (scheduler_id, job_id)
);
CREATE INDEX IF NOT EXISTS scheduler_jobs_pricing ON scheduler_jobs(status);
CREATE TABLE IF NOT EXISTS scheduler_events (
    scheduler_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (scheduler_id, seq)
);
CREATE TABLE IF NOT EXISTS scheduler_prices (key TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scheduler_graphs (hash TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SCHEMA_VERSION = "1"
JOB_STATES = ("pricing", "admitted", "rejected", "cancelled")


@dataclass(frozen=True, slots=True)
class SchedulerRow:
    """A stored scheduler: id, name, creation spec and state (JSON-ready), times (Unix seconds)."""

    id: str
    name: str
    spec: dict[str, Any]
    state: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class SubmittedJob:
    """A job as the service recorded it at submission (see the module docstring for ``status``)."""

    scheduler_id: str
    job_id: str
    request: dict[str, Any]
    spec: dict[str, Any]
    price_id: str
    graph_hash: str | None
    status: str
    error_type: str | None
    error_message: str | None
    error_kind: str | None
    created_at: float
    updated_at: float


class ScheduleStore(Database):
    """The scheduler tables of the service's database file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        with self._lock:
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schedule_schema_version'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES ('schedule_schema_version', ?)", (_SCHEMA_VERSION,)
                )
            elif row["value"] != _SCHEMA_VERSION:
                raise RuntimeError(
                    f"database {self.path} has scheduler tables of version {row['value']}; this distplan "
                    f"reads {_SCHEMA_VERSION}"
                )

    # ------------------------------------------------------------------ schedulers
    def create(self, sid: str, name: str, spec: Mapping[str, Any], state: Mapping[str, Any]) -> SchedulerRow:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO schedulers(id, name, spec, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (sid, name, json.dumps(spec), json.dumps(state), now, now),
            )
        row = self.scheduler(sid)
        assert row is not None
        return row

    def scheduler(self, sid: str) -> SchedulerRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM schedulers WHERE id = ?", (sid,)).fetchone()
        return None if row is None else _scheduler(row)

    def schedulers(self) -> list[SchedulerRow]:
        """Every scheduler, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM schedulers ORDER BY created_at, id").fetchall()
        return [_scheduler(r) for r in rows]

    def save(
        self,
        sid: str,
        state: Mapping[str, Any],
        events: Sequence[Mapping[str, Any]] = (),
        prices: Mapping[str, Mapping[str, Any]] | None = None,
        graphs: Mapping[str, str] | None = None,
        job_status: Mapping[str, str] | None = None,
        job_graphs: Mapping[str, str] | None = None,
    ) -> int:
        """After an event: the new state, the events it logged, new prices and graphs, and service statuses
        and graph hashes of jobs, in one transaction. Returns the last event's sequence number."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE schedulers SET state = ?, updated_at = ? WHERE id = ?", (json.dumps(state), now, sid)
            )
            last = db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM scheduler_events WHERE scheduler_id = ?", (sid,)
            ).fetchone()[0]
            for e in events:
                last += 1
                db.execute(
                    "INSERT INTO scheduler_events(scheduler_id, seq, body) VALUES (?, ?, ?)",
                    (sid, last, json.dumps(e)),
                )
            for key, body in (prices or {}).items():
                db.execute(
                    "INSERT OR REPLACE INTO scheduler_prices(key, body) VALUES (?, ?)",
                    (key, json.dumps(body)),
                )
            for h, text in (graphs or {}).items():
                db.execute("INSERT OR IGNORE INTO scheduler_graphs(hash, body) VALUES (?, ?)", (h, text))
            for jid, status in (job_status or {}).items():
                db.execute(
                    "UPDATE scheduler_jobs SET status = ?, updated_at = ? WHERE scheduler_id = ? AND job_id = ?",
                    (status, now, sid, jid),
                )
            for jid, h in (job_graphs or {}).items():
                db.execute(
                    "UPDATE scheduler_jobs SET graph_hash = ? WHERE scheduler_id = ? AND job_id = ?",
                    (h, sid, jid),
                )
        return int(last)

    # ------------------------------------------------------------------ jobs
    def add_job(
        self,
        sid: str,
        job_id: str,
        request: Mapping[str, Any],
        spec: Mapping[str, Any],
        price_id: str,
        graph: tuple[str, str] | None = None,
    ) -> SubmittedJob | None:
        """Record a submitted job (status ``pricing``); ``None`` if the scheduler already has that job id.
        ``graph``: an uploaded graph (hash, JSON) stored with it."""
        now = time.time()
        with self._tx() as db:
            if db.execute(
                "SELECT 1 FROM scheduler_jobs WHERE scheduler_id = ? AND job_id = ?", (sid, job_id)
            ).fetchone():
                return None
            db.execute(
                "INSERT INTO scheduler_jobs(scheduler_id, job_id, request, spec, price_id, graph_hash, status,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'pricing', ?, ?)",
                (
                    sid,
                    job_id,
                    json.dumps(request),
                    json.dumps(spec),
                    price_id,
                    graph[0] if graph else None,
                    now,
                    now,
                ),
            )
            if graph is not None:
                db.execute("INSERT OR IGNORE INTO scheduler_graphs(hash, body) VALUES (?, ?)", graph)
        return self.job(sid, job_id)

    def job(self, sid: str, job_id: str) -> SubmittedJob | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM scheduler_jobs WHERE scheduler_id = ? AND job_id = ?", (sid, job_id)
            ).fetchone()
        return None if row is None else _job(row)

    def jobs(self, sid: str, status: str | None = None) -> list[SubmittedJob]:
        """A scheduler's jobs in submission order (``status``: only those)."""
        q = "SELECT * FROM scheduler_jobs WHERE scheduler_id = ?"
        args: tuple[Any, ...] = (sid,)
        if status is not None:
            q += " AND status = ?"
            args += (status,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY created_at, job_id", args).fetchall()
        return [_job(r) for r in rows]

    def set_job_status(
        self,
        sid: str,
        job_id: str,
        status: str,
        *,
        error: tuple[str, str, str] | None = None,
        only_from: str | None = None,
    ) -> bool:
        """Change a job's service status (``error``: type, message, kind); ``only_from``: only if it is in
        that status now. Returns whether it changed."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT status FROM scheduler_jobs WHERE scheduler_id = ? AND job_id = ?", (sid, job_id)
            ).fetchone()
            if row is None or (only_from is not None and row["status"] != only_from):
                return False
            e = error or (None, None, None)
            db.execute(
                "UPDATE scheduler_jobs SET status = ?, error_type = ?, error_message = ?, error_kind = ?,"
                " updated_at = ? WHERE scheduler_id = ? AND job_id = ?",
                (status, e[0], e[1], e[2], now, sid, job_id),
            )
        return True

    # ------------------------------------------------------------------ events, prices, graphs
    def events(self, sid: str, *, after: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """Events with ``seq > after``, oldest first, at most ``limit``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM scheduler_events WHERE scheduler_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (sid, after, limit),
            ).fetchall()
        return [(int(r["seq"]), json.loads(r["body"])) for r in rows]

    def prices(self) -> dict[str, dict[str, Any]]:
        """The whole price cache, by key."""
        with self._lock:
            rows = self._db.execute("SELECT key, body FROM scheduler_prices").fetchall()
        return {r["key"]: json.loads(r["body"]) for r in rows}

    def graph(self, content_hash: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM scheduler_graphs WHERE hash = ?", (content_hash,)
            ).fetchone()
        return None if row is None else str(row["body"])


def _scheduler(row: sqlite3.Row) -> SchedulerRow:
    return SchedulerRow(
        id=row["id"],
        name=row["name"],
        spec=json.loads(row["spec"]),
        state=json.loads(row["state"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _job(row: sqlite3.Row) -> SubmittedJob:
    return SubmittedJob(
        scheduler_id=row["scheduler_id"],
        job_id=row["job_id"],
        request=json.loads(row["request"]),
        spec=json.loads(row["spec"]),
        price_id=row["price_id"],
        graph_hash=row["graph_hash"],
        status=row["status"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        error_kind=row["error_kind"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )
