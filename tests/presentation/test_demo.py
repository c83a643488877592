"""``distplan demo`` beyond its default (the default run is tests/ux/test_readme.py): JSON output, the
report page and plan file, and a failing validation (a fault injected into rank 1) that exits 1 naming the
rank.

A tiny model on a two-rank cluster whose small memory forces a two-stage pipeline keeps it to seconds.
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
def test_demo_json_report_and_a_failing_validation_exits_1(tmp_path: Path) -> None:
    r = _demo(
        tmp_path,
        "--json",
        "--report",
        "out/report.html",
        "--plan-out",
        "out/plan.json",
        "--inject-fault",
        "raise:1",
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.strip() == "", r.stderr  # --json: no progress, no chatter
    d = json.loads(r.stdout)
    assert d["passed"] is False and d["validation"]["passed"] is False
    assert d["validation"]["ranks"] == 2
    assert "rank 1" in d["validation"]["error"] and "injected fault" in d["validation"]["error"]
    # The 1 MiB ranks cannot hold the whole model's state: two stages, or one stage sharding it over both.
    assert d["layout"].count("|") == 2 or " sh=" in d["layout"], d["layout"]
    # The plan and the page are written even when the validation fails, to look at what failed.
    plan = Plan.load(tmp_path / "out/plan.json")
    assert plan.layout == d["layout"]
    assert d["speedup_vs_equal_split"] == pytest.approx(
        plan.baselines[d["equal_split_baseline"]] / plan.predictions.iteration_time_s
    )
    assert set(d["seconds"]) == {"trace", "plan", "simulate", "validate"}
    page = (tmp_path / "out/report.html").read_text()
    assert f'data-stage="{plan.num_stages - 1}"' in page and "gpt-tiny" in page
