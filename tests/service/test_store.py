"""The SQLite store on a real database file: content addressing, job lifecycle, restart recovery."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

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
    assert not store.fail(job.id, Failure("X", "late", 500, True))
    assert store.get("plan", "p1").status == "done"  # type: ignore[union-attr]


def test_user_error_is_final_but_retryable_failure_rearms(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    _, job = store.submit("plan", "bad", {})
    assert job is not None and store.start(job.id)
    store.fail(job.id, Failure("InfeasiblePlanError", "12 GiB short", 422, False))
    rec, again = store.submit("plan", "bad", {})
    assert (
        again is None
        and rec.status == "failed"
        and rec.error_message == "12 GiB short"
        and rec.error_status == 422
    )

    _, job = store.submit("plan", "flaky", {})
    assert job is not None
    store.fail(job.id, Failure("Cancelled", "cancelled", 409, True))
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
