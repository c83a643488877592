"""``distplan profile`` for real on this machine's CPU (gloo between two ranks), quick mode."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distplan.calibration import OP_CLASSES, ROW_COUNTS, Calibration
from distplan.errors import CalibrationError
from distplan.profiler import profile


def _non_decreasing(xs: tuple[float, ...]) -> bool:
    return all(b >= a for a, b in itertools.pairwise(xs))


def test_profile_cli_writes_a_calibration_of_every_class_and_the_link(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distplan.cli",
            "profile",
            "--quick",
            "--kind",
            "my-cpu",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, DISTPLAN_PROGRESS="0"),
    )
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["out"] == str(out) and shown["kind"] == "my-cpu" and shown["link"] == "intra-host over gloo"
    cal = Calibration.load(out)
    assert cal.kind == "my-cpu" and cal.meta["mode"] == "quick" and cal.meta["ranks"] == 2
    dev = cal.device
    assert dev is not None and dev.threads == 1
    assert set(dev.classes()) == set(OP_CLASSES)
    assert set(dev.matmul) == {"fp32"} and set(dev.attention) == {"fp32"}
    assert set(dev.optimizer) == {"adam", "adamw", "sgd"}
    assert set(dev.row_matmul) == set(ROW_COUNTS)
    # Operators far from their class's cost per byte get their own curves.
    assert {"aten.tanh.default", "aten.exp.default", "aten.mean.dim"} <= set(dev.targets)
    assert dev.node_times("aten.tanh.default", "elementwise", "fp32") is dev.targets["aten.tanh.default"]
    assert dev.node_times("aten.add.Tensor", "elementwise", "fp32") is dev.ops["elementwise"]
    curves = [t.fwd for t in dev.ops.values()] + [t.bwd for t in dev.ops.values()]
    curves += [dev.matmul["fp32"].fwd, dev.matmul["fp32"].bwd, *dev.optimizer.values()]
    curves += [c for t in dev.row_matmul.values() for c in (t.fwd, t.bwd)]
    for c in curves:
        assert _non_decreasing(c.seconds)
    # The runtime's own costs were measured and written: per microbatch, per iteration, and per pipeline
    # boundary (a two-stage plan run on the two ranks), split evenly between forward and backward. Their
    # sizes are not asserted: on a busy machine the differences they are measured as can vanish.
    assert dev.microbatch_fwd_s == dev.microbatch_bwd_s >= 0 and dev.step_s >= 0
    assert dev.boundary_fwd_s == dev.boundary_bwd_s >= 0
    assert {"microbatch_fwd_s", "boundary_fwd_s", "step_s"} <= set(json.loads(out.read_text())["device"])
    # More work takes longer: the largest matmul measured is slower than the smallest.
    mm = dev.matmul["fp32"].fwd
    assert len(mm.sizes) >= 3 and mm.seconds[-1] > mm.seconds[0]
    link = cal.link
    assert link is not None and link.backend == "gloo" and link.scope == "intra-host"
    assert set(link.collectives) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(set(by_world) == {2} for by_world in link.collectives.values())
    assert link.p2p.sizes[0] == 4 and _non_decreasing(link.p2p.seconds)


def test_profile_refuses_bad_requests_before_measuring(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="mode must be one of quick, default, thorough"):
        profile(mode="fast")
    cores = os.cpu_count() or 1
    with pytest.raises(CalibrationError, match=f"ranks={cores + 1} but this host has {cores} CPU core"):
        profile(ranks=cores + 1, device="cpu")
    with pytest.raises(CalibrationError, match="precision 'tf32' cannot run on cpu"):
        profile(device="cpu", precisions=["tf32"], ranks=1, mode="quick")
    r = subprocess.run(
        [sys.executable, "-m", "distplan.cli", "profile", "--quick", "--thorough"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "at most one of --quick and --thorough" in r.stderr
