"""The SQLite store on a real database file: content addressing, job lifecycle, restart recovery."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from distplan.service.errors import ErrorKind
from distplan.service.store import Failure, Store


def test_wal_mode_and_tables(tmp_path: Path) -> None:
    store = Store(tmp_path / "sub" / "db.sqlite")
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    tables = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"plans", "validations", "jobs", "artifacts"} <= tables
    store.close()


def test_same_id_is_one_subject_and_one_job(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    rec1, job1 = store.submit("plan", "abc", {"x": 1})
    rec2, job2 = store.submit("plan", "abc", {"x": 1})
    assert job1 is not None and job2 is None
    assert rec1.id == rec2.id == "abc" and rec2.job_id == job1.id and rec2.attempts == 1
    assert store.count_jobs("queued") == 1


def test_job_lifecycle_and_artifacts(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    _, job = store.submit("plan", "p1", {"x": 1})
    assert job is not None
    assert store.start(job.id)
    assert store.get("plan", "p1").status == "running"  # type: ignore[union-attr]
    store.finish(job.id, {"plan": '{"a": 1}', "timeline": "[]"})
    rec = store.get("plan", "p1")
    assert rec is not None and rec.status == "done"
    assert store.artifact("p1", "plan") == '{"a": 1}'
    assert store.job(job.id).status == "done"  # type: ignore[union-attr]
    # A finished job cannot be failed afterwards.
    assert not store.fail(job.id, Failure("X", "late", ErrorKind.INTERNAL))
    assert store.get("plan", "p1").status == "done"  # type: ignore[union-attr]


def test_user_error_is_final_but_retryable_failure_rearms(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    _, job = store.submit("plan", "bad", {})
    assert job is not None and store.start(job.id)
    store.fail(job.id, Failure("InfeasiblePlanError", "12 GiB short", ErrorKind.UNPROCESSABLE))
    rec, again = store.submit("plan", "bad", {})
    assert (
        again is None
        and rec.status == "failed"
        and rec.error_message == "12 GiB short"
        and rec.error_kind is ErrorKind.UNPROCESSABLE
        and not rec.retryable
    )

    _, job = store.submit("plan", "flaky", {})
    assert job is not None
    store.fail(job.id, Failure("Cancelled", "cancelled", ErrorKind.CANCELLED))
    rec, again = store.submit("plan", "flaky", {})
    assert again is not None and again.id != job.id
    assert rec.status == "queued" and rec.attempts == 2 and rec.error_type is None


def test_recover_marks_interrupted_jobs_failed(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = Store(path)
    _, queued = store.submit("plan", "q", {})
    _, running = store.submit("validation", "v", {}, parent_id="q")
    _, done = store.submit("plan", "d", {})
    assert queued and running and done
    store.start(running.id)
    store.start(done.id)
    store.finish(done.id, {"plan": "{}"})
    store.close()

    store = Store(path)  # "the server restarted"
    assert store.recover() == 2
    for kind, sid, jid in (("plan", "q", queued.id), ("validation", "v", running.id)):
        rec = store.get(kind, sid)  # type: ignore[arg-type]
        assert rec is not None and rec.status == "failed" and rec.error_type == "Interrupted"
        assert rec.error_kind is ErrorKind.INTERRUPTED
        assert "restarted" in (rec.error_message or "") and rec.retryable
        assert store.job(jid).status == "failed"  # type: ignore[union-attr]
    assert store.get("plan", "d").status == "done"  # type: ignore[union-attr]
    assert store.recover() == 0


def test_concurrent_submits_create_one_job(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    jobs: list[object] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        _, job = store.submit("plan", "same", {"k": 1})
        jobs.append(job)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(j is not None for j in jobs) == 1
    assert store.count_jobs("queued") == 1


def test_other_connection_sees_committed_state(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = Store(path)
    store.submit("plan", "x", {"a": 1})
    other = sqlite3.connect(str(path))
    assert other.execute("SELECT status FROM plans WHERE id='x'").fetchone()[0] == "queued"
    other.close()


# A database written by the service before error kinds (schema 1): HTTP statuses in ``error_status``.
_SCHEMA_1 = """
CREATE TABLE plans (id TEXT PRIMARY KEY, parent_id TEXT, request TEXT NOT NULL, status TEXT NOT NULL,
    job_id TEXT, attempts INTEGER NOT NULL DEFAULT 0, error_type TEXT, error_message TEXT,
    error_status INTEGER, retryable INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE validations (id TEXT PRIMARY KEY, parent_id TEXT, request TEXT NOT NULL, status TEXT NOT NULL,
    job_id TEXT, attempts INTEGER NOT NULL DEFAULT 0, error_type TEXT, error_message TEXT,
    error_status INTEGER, retryable INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, subject_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, error_type TEXT, error_message TEXT,
    error_status INTEGER);
CREATE TABLE artifacts (owner_id TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (owner_id, name));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_schema_1_database_is_migrated_to_error_kinds(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(str(path))
    old.executescript(_SCHEMA_1)
    rows = [  # (plan id, error type, HTTP status stored by the old service, retryable)
        ("infeasible", "InfeasiblePlanError", 422, 0),
        ("cancelled", "Cancelled", 409, 1),
        ("timeout", "JobTimeout", 422, 1),
        ("crashed", "WorkerCrashed", 503, 1),
        ("bug", "InternalError", 500, 1),
        ("newer", "SomeFutureError", 404, 0),
    ]
    for pid, etype, code, retry in rows:
        old.execute(
            "INSERT INTO jobs VALUES (?, 'plan', ?, 'failed', 1.0, 1.0, 2.0, ?, 'why', ?)",
            (f"job-{pid}", pid, etype, code),
        )
        old.execute(
            "INSERT INTO plans VALUES (?, NULL, '{}', 'failed', ?, 1, ?, 'why', ?, ?, 1.0, 2.0)",
            (pid, f"job-{pid}", etype, code, retry),
        )
    old.execute(
        "INSERT INTO plans VALUES ('ok', NULL, '{}', 'done', 'job-ok', 1, NULL, NULL, NULL, 0, 1.0, 2.0)"
    )
    old.commit()
    old.close()

    store = Store(path)  # a new server opens the old file
    expected = {
        "infeasible": ErrorKind.UNPROCESSABLE,
        "cancelled": ErrorKind.CANCELLED,
        "timeout": ErrorKind.TIMEOUT,
        "crashed": ErrorKind.WORKER_CRASHED,
        "bug": ErrorKind.INTERNAL,
        "newer": ErrorKind.NOT_FOUND,  # an unknown type keeps the meaning of its old status
    }
    for pid, kind in expected.items():
        rec = store.get("plan", pid)
        assert rec is not None and rec.error_kind is kind, (pid, rec)
        assert store.job(f"job-{pid}").error_kind is kind  # type: ignore[union-attr]
    ok = store.get("plan", "ok")
    assert ok is not None and ok.status == "done" and ok.error_kind is None
    # Retryable failures are still re-run when the request comes again; final ones are still answered.
    _, job = store.submit("plan", "cancelled", {})
    assert job is not None
    rec, again = store.submit("plan", "infeasible", {})
    assert again is None and rec.error_kind is ErrorKind.UNPROCESSABLE
    columns = {r[1] for r in store._db.execute("PRAGMA table_info(plans)")}
    assert "error_kind" in columns and "error_status" not in columns
    assert store._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
    store.close()
    assert Store(path).get("plan", "timeout").error_kind is ErrorKind.TIMEOUT  # type: ignore[union-attr]


def test_newer_schema_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "db"
    Store(path).close()
    db = sqlite3.connect(str(path))
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        Store(path)
