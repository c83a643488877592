"""SQLite storage of plans, validations, jobs and their artifacts (WAL mode, one file).

Tables:

- ``plans`` / ``validations`` ("subjects"): one row per distinct request. The id is the content address of
  the canonical request (``canonical_hash``), so the same request maps to the same row and is solved once.
  ``status`` is ``queued``, ``running``, ``done`` or ``failed``; a failure stores the error type, message,
  kind (``distplan.service.errors.ErrorKind``; the HTTP status is derived from it at the edge, never stored)
  and whether retrying can help (``retryable``, from the kind: interrupted, cancelled, timed out, internal).
- ``jobs``: one row per attempt at producing a subject; a new attempt happens only after a retryable failure.
- ``artifacts``: named JSON/text blobs of a subject (``plan``, ``graph``, ``timeline``, ``launcher``,
  ``report``), kept apart so reading a plan does not load its (large) graph.

All methods are thread-safe (one connection behind a lock: SQLite serialises writers anyway, and every
statement here is short). State changes of a job and its subject happen in one transaction, so they never
disagree. :meth:`Store.recover` runs at startup and marks jobs that were queued or running when the previous
server stopped as failed (``Interrupted``), so nothing stays "running" forever.

Schema versions (``meta.schema_version``): 1 stored an HTTP status per failure (``error_status``); 2 stores
the error kind (``error_kind``). Opening a version-1 database migrates it in place, in one transaction:
each old failure's kind is recovered from its error type and status
(:func:`~distplan.service.errors.legacy_kind`), and the status column is dropped.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distplan.service.errors import ErrorKind, legacy_kind

__all__ = ["JOB_STATES", "Database", "Failure", "JobRecord", "Store", "SubjectRecord"]

JOB_STATES = ("queued", "running", "done", "failed")
SubjectKind = Literal["plan", "validation", "price"]
# "price": a job's device-set shapes priced for a scheduler (distplan.service.schedule_manager).
_TABLE: dict[str, str] = {"plan": "plans", "validation": "validations", "price": "prices"}

_SUBJECT_COLUMNS = """
    id TEXT PRIMARY KEY,
    parent_id TEXT,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    job_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_type TEXT,
    error_message TEXT,
    error_kind TEXT,
    retryable INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS plans ({_SUBJECT_COLUMNS});
CREATE TABLE IF NOT EXISTS validations ({_SUBJECT_COLUMNS});
CREATE TABLE IF NOT EXISTS prices ({_SUBJECT_COLUMNS});
CREATE INDEX IF NOT EXISTS validations_parent ON validations(parent_id);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error_type TEXT,
    error_message TEXT,
    error_kind TEXT
);
CREATE TABLE IF NOT EXISTS artifacts (
    owner_id TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (owner_id, name)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_SCHEMA_VERSION = "2"
_FAILURE_TABLES = ("plans", "validations", "jobs")


@dataclass(frozen=True, slots=True)
class SubjectRecord:
    """A stored plan or validation (without its artifacts)."""

    kind: str
    id: str
    parent_id: str | None
    request: dict[str, Any]
    status: str
    job_id: str | None
    attempts: int
    error_type: str | None
    error_message: str | None
    error_kind: ErrorKind | None
    retryable: bool
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One attempt at producing a subject."""

    id: str
    kind: str
    subject_id: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    error_type: str | None
    error_message: str | None
    error_kind: ErrorKind | None


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a job failed: error class name (shown to the client), message, and kind (from which the HTTP
    status and whether a retry can help follow)."""

    error_type: str
    message: str
    kind: ErrorKind

    @property
    def retryable(self) -> bool:
        """Whether the same request, sent again, runs again (see ``ErrorKind.retryable``)."""
        return self.kind.retryable


class Database:
    """The service's SQLite file (its folder made if needed; ``":memory:"`` for none), kept the way every table
    of the service is: one connection shared by the server's threads behind one lock (see the module
    docstring), autocommit with explicit transactions (:meth:`_tx`), rows by column name, write-ahead log,
    30 s busy timeout. The plan store and the scheduler store are both one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


class Store(Database):
    """The service's database. ``Store(path)`` creates the file, its folder and the tables if needed."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        with self._lock:
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (_SCHEMA_VERSION,)
                )
            elif row["value"] == "1":
                self._migrate_from_1()
            elif row["value"] != _SCHEMA_VERSION:
                raise RuntimeError(
                    f"database {self.path} has schema version {row['value']}, this distplan reads 1 and "
                    f"writes {_SCHEMA_VERSION}"
                )

    def _migrate_from_1(self) -> None:
        """Schema 1 -> 2: ``error_status`` (an HTTP code) becomes ``error_kind`` (see the module docstring)."""
        with self._tx() as db:
            for table in _FAILURE_TABLES:
                columns = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if "error_kind" not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN error_kind TEXT")
                if "error_status" not in columns:
                    continue
                rows = db.execute(
                    f"SELECT id, error_type, error_status FROM {table} WHERE error_type IS NOT NULL"
                ).fetchall()
                for r in rows:
                    kind = legacy_kind(r["error_type"], r["error_status"])
                    db.execute(f"UPDATE {table} SET error_kind=? WHERE id=?", (kind.value, r["id"]))
                # DROP COLUMN needs SQLite >= 3.35 (2021); an older one keeps the column, unread and unwritten.
                with contextlib.suppress(sqlite3.OperationalError):
                    db.execute(f"ALTER TABLE {table} DROP COLUMN error_status")
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (_SCHEMA_VERSION,))

    # ------------------------------------------------------------------ startup
    def recover(self) -> int:
        """Mark jobs left queued or running by a previous server as failed (``Interrupted``); return how many."""
        now = time.time()
        reason = (
            "the server restarted while this job was queued or running; submit the request again to retry"
        )
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, kind, subject_id FROM jobs WHERE status IN ('queued', 'running')"
            ).fetchall()
            for r in rows:
                self._fail(
                    db,
                    r["id"],
                    r["kind"],
                    r["subject_id"],
                    Failure("Interrupted", reason, ErrorKind.INTERRUPTED),
                    now,
                )
        return len(rows)

    # ------------------------------------------------------------------ subjects
    def get(self, kind: SubjectKind, subject_id: str) -> SubjectRecord | None:
        """A stored plan or validation by id, or ``None``."""
        with self._lock:
            row = self._db.execute(f"SELECT * FROM {_TABLE[kind]} WHERE id = ?", (subject_id,)).fetchone()
        return None if row is None else _subject(kind, row)

    def submit(
        self,
        kind: SubjectKind,
        subject_id: str,
        request: dict[str, Any],
        *,
        parent_id: str | None = None,
        artifacts: dict[str, str] | None = None,
    ) -> tuple[SubjectRecord, JobRecord | None]:
        """Return the subject with this id, creating it (or re-arming it after a retryable failure) with a new
        queued job. The job is returned only when one was created: the caller must run it.

        ``artifacts`` are stored with a new subject (e.g. an uploaded graph) before its job starts.
        """
        table = _TABLE[kind]
        now = time.time()
        with self._tx() as db:
            row = db.execute(f"SELECT * FROM {table} WHERE id = ?", (subject_id,)).fetchone()
            if row is not None and not (row["status"] == "failed" and row["retryable"]):
                return _subject(kind, row), None
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs(id, kind, subject_id, status, created_at) VALUES (?, ?, ?, 'queued', ?)",
                (job_id, kind, subject_id, now),
            )
            if row is None:
                db.execute(
                    f"INSERT INTO {table}(id, parent_id, request, status, job_id, attempts, created_at, updated_at)"
                    " VALUES (?, ?, ?, 'queued', ?, 1, ?, ?)",
                    (subject_id, parent_id, json.dumps(request, sort_keys=True), job_id, now, now),
                )
            else:
                db.execute(
                    f"UPDATE {table} SET status='queued', job_id=?, attempts=attempts+1, error_type=NULL,"
                    " error_message=NULL, error_kind=NULL, retryable=0, updated_at=? WHERE id=?",
                    (job_id, now, subject_id),
                )
            for name, body in (artifacts or {}).items():
                db.execute(
                    "INSERT OR REPLACE INTO artifacts(owner_id, name, body) VALUES (?, ?, ?)",
                    (subject_id, name, body),
                )
            srow = db.execute(f"SELECT * FROM {table} WHERE id = ?", (subject_id,)).fetchone()
            jrow = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _subject(kind, srow), _job(jrow)

    def list_validations(self, plan_id: str) -> list[SubjectRecord]:
        """The validations of one plan, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM validations WHERE parent_id = ? ORDER BY created_at", (plan_id,)
            ).fetchall()
        return [_subject("validation", r) for r in rows]

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> JobRecord | None:
        """A job by id, or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def start(self, job_id: str) -> bool:
        """Mark a queued job (and its subject) running; ``False`` if it is no longer queued (cancelled)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "queued":
                return False
            db.execute("UPDATE jobs SET status='running', started_at=? WHERE id=?", (now, job_id))
            db.execute(
                f"UPDATE {_TABLE[row['kind']]} SET status='running', updated_at=? WHERE id=? AND job_id=?",
                (now, row["subject_id"], job_id),
            )
        return True

    def finish(self, job_id: str, artifacts: dict[str, str]) -> None:
        """Store a job's results and mark it and its subject done."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] in ("done", "failed"):
                return
            for name, body in artifacts.items():
                db.execute(
                    "INSERT OR REPLACE INTO artifacts(owner_id, name, body) VALUES (?, ?, ?)",
                    (row["subject_id"], name, body),
                )
            db.execute("UPDATE jobs SET status='done', finished_at=? WHERE id=?", (now, job_id))
            db.execute(
                f"UPDATE {_TABLE[row['kind']]} SET status='done', updated_at=? WHERE id=? AND job_id=?",
                (now, row["subject_id"], job_id),
            )

    def fail(self, job_id: str, failure: Failure) -> bool:
        """Mark a queued or running job and its subject failed; ``False`` if it had already ended."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] in ("done", "failed"):
                return False
            self._fail(db, job_id, row["kind"], row["subject_id"], failure, time.time())
        return True

    @staticmethod
    def _fail(
        db: sqlite3.Connection, job_id: str, kind: str, subject_id: str, f: Failure, now: float
    ) -> None:
        db.execute(
            "UPDATE jobs SET status='failed', finished_at=?, error_type=?, error_message=?, error_kind=? WHERE id=?",
            (now, f.error_type, f.message, f.kind.value, job_id),
        )
        db.execute(
            f"UPDATE {_TABLE[kind]} SET status='failed', error_type=?, error_message=?, error_kind=?, retryable=?,"
            " updated_at=? WHERE id=? AND job_id=?",
            (f.error_type, f.message, f.kind.value, int(f.retryable), now, subject_id, job_id),
        )

    def count_jobs(self, status: str) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]
            )

    # ------------------------------------------------------------------ artifacts
    def artifact(self, owner_id: str, name: str) -> str | None:
        """A stored artifact's text, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM artifacts WHERE owner_id = ? AND name = ?", (owner_id, name)
            ).fetchone()
        return None if row is None else str(row["body"])

    def put_artifact(self, owner_id: str, name: str, body: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO artifacts(owner_id, name, body) VALUES (?, ?, ?)",
                (owner_id, name, body),
            )


def _subject(kind: str, row: sqlite3.Row) -> SubjectRecord:
    return SubjectRecord(
        kind=kind,
        id=row["id"],
        parent_id=row["parent_id"],
        request=json.loads(row["request"]),
        status=row["status"],
        job_id=row["job_id"],
        attempts=int(row["attempts"]),
        error_type=row["error_type"],
        error_message=row["error_message"],
        error_kind=_kind(row["error_kind"]),
        retryable=bool(row["retryable"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        kind=row["kind"],
        subject_id=row["subject_id"],
        status=row["status"],
        created_at=float(row["created_at"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        error_kind=_kind(row["error_kind"]),
    )


def _kind(value: str | None) -> ErrorKind | None:
    """A stored kind; one this distplan does not know (written by a newer one) reads as ``internal``."""
    if value is None:
        return None
    try:
        return ErrorKind(value)
    except ValueError:
        return ErrorKind.INTERNAL
