"""``examples/train_pipeline.py`` runs as its docstring says: under torchrun with 2 CPU processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_train_pipeline_example_under_torchrun(tmp_path: Path) -> None:
    cmd = [
        *_torchrun(),
        "--standalone",
        "--nproc-per-node",
        "2",
        "examples/train_pipeline.py",
        "--steps",
        "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTPLAN_PROGRESS": "0"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=220, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # The plan splits the model over both ranks (the example's memory budget forces it: pipeline stages or
    # sharded state, whichever the planner prices faster) ...
    m = re.search(r"plan: (\S+) m(\d+)x(\d+) (\|.*?)\s+\(predicted", out)
    assert m, out[-4000:]
    stages = [part.strip() for part in m.group(4).split("|")[1:]]
    devices = sorted(d for s in stages for d in s.split("@")[1].split()[0].split(","))
    assert devices == ["0", "1"], m.group(0)
    assert len(stages) == 2 or all(" sh=" in s for s in stages), m.group(0)
    # ... and the loss of the five steps, printed once per step by the last stage's first replica, falls.
    losses = [float(x) for x in re.findall(r"step \d+\s+loss ([\d.]+)", out)]
    assert len(losses) == 5, out[-4000:]
    assert losses[-1] < losses[0], losses
