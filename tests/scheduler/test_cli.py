"""``distplan schedule`` through the real CLI entry point: the JSON contract, output files, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scheduler_helpers import TINY, job

from distplan.cli import main
from distplan.scheduler import GraphSource, JobSet, Scheduler

CONTRACT = {
    "cluster": str,
    "trace": str,
    "policy": str,
    "avg_jct_s": float,
    "p99_jct_s": float,
    "makespan_s": float,
    "utilisation": float,
    "high_priority_p99_wait_s": float,
    "preemptions": int,
    "max_wait_s": float,
}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def jobs_file(tmp_path: Path, graphs) -> Path:
    # One graph from a file next to the job set (a relative path), one synthetic.
    graphs["tiny"].save(tmp_path / "tiny-graph.json")
    js = JobSet(
        "cli-jobs",
        {
            "tiny": GraphSource("synthetic", dict(TINY)),
            "saved": GraphSource("file", {"file": "tiny-graph.json"}),
        },
        (
            job("a", max_devices=2, total_steps=3000),
            job("b", priority="high", arrival_s=5.0, total_steps=2000),
            job("c", "saved", priority="low", arrival_s=6.0, total_steps=500),
        ),
    )
    path = tmp_path / "jobs.json"
    js.save(path)
    return path


@pytest.mark.parametrize("policy", ["distplan", "strict-priority"])
def test_schedule_json_contract(capsys, tmp_path, jobs_file, policy) -> None:
    events, state = tmp_path / "out" / "events.json", tmp_path / "out" / "state.json"
    code, out, err = run_cli(
        [
            "schedule",
            str(jobs_file),
            "--cluster",
            "a100x4-t4x4",
            "--policy",
            policy,
            "--json",
            "--events",
            str(events),
            "--state",
            str(state),
        ],
        capsys,
    )
    assert code == 0, err
    s = json.loads(out)
    for k, t in CONTRACT.items():
        assert isinstance(s[k], t), (k, s[k])
    assert (s["cluster"], s["trace"], s["policy"]) == ("a100x4-t4x4", "cli-jobs", policy)
    assert s["finished"] == 3 and s["unfinished_jobs"] == []
    assert {j["id"] for j in s["jobs_detail"]} == {"a", "b", "c"}
    assert s["avg_jct_s"] == pytest.approx(sum(j["jct_s"] for j in s["jobs_detail"]) / 3)
    kinds = [e["kind"] for e in json.loads(events.read_text())["events"]]
    assert kinds.count("arrival") == 3 and kinds.count("finish") == 3
    # The saved state reloads wherever it is read from (the graph file's path was made absolute).
    restored = Scheduler.from_dict(json.loads(state.read_text()))
    assert {r.status for r in restored.jobs.values()} == {"finished"}
    assert restored.graphs["saved"].content_hash == restored.graphs["tiny"].content_hash


def test_schedule_table_names_every_job(capsys, jobs_file) -> None:
    code, out, err = run_cli(["schedule", str(jobs_file), "--cluster", "a100x4-t4x4"], capsys)
    assert code == 0, err
    assert "average JCT" in out and all(f" {j} " in out for j in ("a", "b", "c"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "best"], "unknown policy 'best'; known: distplan, fifo, las, gavel, strict-priority"),
        (["--objective", "speed"], "objective must be one of jct, throughput, max-min, finish-time"),
        (["--policy", "fifo", "--objective", "max-min"], "apply to --policy distplan only"),
        (["--cluster", "no-such-preset"], "unknown cluster preset 'no-such-preset'"),
    ],
)
def test_schedule_bad_options_are_named(capsys, jobs_file, extra, message) -> None:
    args = ["schedule", str(jobs_file), "--cluster", "a100x4-t4x4", *extra]
    code, _out, err = run_cli(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_schedule_bad_files_are_named(capsys, tmp_path) -> None:
    code, _, err = run_cli(["schedule", str(tmp_path / "none.json"), "--cluster", "a100x4-t4x4"], capsys)
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"jobs": [{"id": "x", "graph": "g", "global_batch": 8}]}))
    code, _, err = run_cli(["schedule", str(bad), "--cluster", "a100x4-t4x4"], capsys)
    assert code == 2 and "unknown graph 'g'" in err


def test_scheduler_never_imports_torch() -> None:
    code = (
        "import sys, distplan.scheduler, distplan.scheduler.cli\n"
        "from distplan.profiles import load_cluster\n"
        "from distplan.scheduler import CATALOGUE, generate_trace, make_policy, simulate\n"
        "c = load_cluster('a100x4-t4x4')\n"
        "t = generate_trace(3, c, seed=1, catalogue=CATALOGUE[:1])\n"
        "for p in ('distplan', 'gavel'):\n"
        "    assert simulate(t, c, make_policy(p)).metrics()['finished'] == 3\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
