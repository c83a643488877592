"""``distplan demo`` beyond its default (the default run is tests/ux/test_readme.py): JSON output with the
report page and plan file, and a failing validation exits 1 naming the failed rank.

Both use a tiny model on a two-rank cluster whose small memory forces a two-stage pipeline, so they take
seconds, not a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distplan.plan import Plan

CLUSTER = """\
name: two-small-ranks
description: two CPU ranks with 1 MiB each, too little for the whole model
kinds:
  - {name: cpu-rank, memory_bytes: 1048576, memory_bandwidth_gbyte_s: 20, peak_tflops: {fp32: 0.16}, efficiency: 0.5}
hosts:
  - name: localhost
    devices: [{kind: cpu-rank, count: 2}]
    link: {bandwidth_gbyte_s: 5, latency_us: 50}
"""
TINY = ["--model", "gpt-tiny", "--seq", "64", "--global-batch", "8"]


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    cmd = [sys.executable, "-m", "distplan.cli", "demo", *TINY, "--cluster", "cluster.yaml", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_json_with_report_and_plan_file(tmp_path: Path) -> None:
    r = _demo(tmp_path, "--json", "--report", "out/report.html", "--plan-out", "out/plan.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip() == "", r.stderr  # --json: no progress, no chatter
    d = json.loads(r.stdout)
    assert d["passed"] is True and d["validation"]["passed"] is True
    assert d["validation"]["ranks"] == 2
    assert d["layout"].count("|") == 2  # two stages
    plan = Plan.load(tmp_path / "out/plan.json")
    assert plan.layout == d["layout"]
    assert d["speedup_vs_equal_split"] == pytest.approx(
        plan.baselines[d["equal_split_baseline"]] / plan.predictions.iteration_time_s
    )
    assert set(d["seconds"]) == {"trace", "plan", "simulate", "validate"}
    page = (tmp_path / "out/report.html").read_text()
    assert 'data-stage="1"' in page and "gpt-tiny" in page


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_exits_1_when_validation_fails(tmp_path: Path) -> None:
    r = _demo(tmp_path, "--inject-fault", "raise:1")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Validation: FAILED" in r.stdout
    assert "rank 1" in r.stdout and "injected fault" in r.stdout
    assert "Traceback" not in r.stderr
