"""GPT-2 XL (1.56B parameters; a full fp32 copy is 6.2 GB, four copies do not fit this 24 GiB machine beside
the runtime) lowered on 4 CPU ranks: each rank builds the model on meta, materialises only its stage and
trains one SGD step; its peak RSS stays below 1.5 x its parameter + gradient + optimizer bytes plus the
runtime overhead, measured by the same ranks on the same plan at hidden size 64
(``benchmarks/rank_memory.py``, whose JSON this test reads)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_gpt2_xl_on_four_cpu_ranks_holds_only_its_stage(tmp_path: Path) -> None:
    out = tmp_path / "rank_memory.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rank_memory.py"), "--steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=2600,
        env=env,
    )
    res = json.loads(out.read_text()) if out.exists() else {}
    assert r.returncode == 0 and res.get("passed"), r.stdout[-3000:] + r.stderr[-3000:]
    assert res["model"] == "gpt2-xl" and res["params"] > 1.5e9 and res["ranks"] == 4
    rows = res["rank_rows"]
    assert [row["rank"] for row in rows] == [0, 1, 2, 3]
    gib = 2**30
    for row in rows:
        state = row["param_bytes"] + row["grad_bytes"] + row["optim_bytes"]
        assert row["grad_bytes"] == row["param_bytes"] and row["optim_bytes"] == 0  # SGD: no state
        assert row["peak_rss_bytes"] <= 1.5 * state + row["overhead_bytes"], row
        # The runtime overhead is a fixed cost, not a hidden copy of the model.
        assert 0 < row["overhead_bytes"] < 2 * gib, row
        # No rank ever held the whole model.
        assert row["peak_rss_bytes"] < res["full_fp32_copy_bytes"], row
        assert all(math.isfinite(x) for x in row["losses"] if x is not None)
    # The stages cover the model: every parameter on some rank (the tied embedding on two).
    held = sum(row["param_bytes"] for row in rows)
    assert res["full_fp32_copy_bytes"] <= held < 1.1 * res["full_fp32_copy_bytes"]
    losses = [row["losses"] for row in rows if row["losses"][0] is not None]
    assert len(losses) == 1 and len(losses[0]) == 1
