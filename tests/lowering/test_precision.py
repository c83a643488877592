"""The lowering runs matmuls at the precision the plan names (``distplan.lowering.precision``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distplan.errors import LoweringError
from distplan.lowering.precision import autocast_for, set_matmul_precision

_SCRIPT = """
import json, os, torch
import torch.distributed as dist
from distplan.lowering import lower
from distplan.planner import evaluate
from distplan.tracer import trace

g = trace("mlp-tiny", batch=1)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
out = {}
for dtype in ("fp32", "bf16"):
    plan = evaluate(g, cluster="cpu-local", layout=f"gpipe m2x1 | 0:{len(g)}@0", global_batch=2, dtype=dtype)
    runner = lower(plan, "mlp-tiny", device="cpu", check_graph=False, seed=0)
    batch = runner.source.sample(2, seed=0)
    out[dtype] = [runner.step(batch.args, batch.target, batch.kwargs), torch.get_float32_matmul_precision(),
                  plan.request.precision]
print(json.dumps(out))
"""


def test_a_bf16_plan_runs_its_forward_under_autocast() -> None:
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (fp32, mode32, p32), (bf16, mode16, p16) = out["fp32"], out["bf16"]
    assert (p32, p16) == ("fp32", "bf16") and mode32 == mode16 == "highest"
    # Same weights and batch: the bf16 forward rounds, so the loss moves, but only by bf16's precision.
    assert bf16 != fp32
    assert abs(bf16 - fp32) <= 0.05 * abs(fp32)


def test_matmul_modes_and_autocast_contexts() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        set_matmul_precision("tf32")
        assert torch.get_float32_matmul_precision() == "high"
        set_matmul_precision("fp32")
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    with autocast_for("bf16", torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_for("fp32", torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(LoweringError, match="fp16 needs CUDA"):
        autocast_for("fp16", torch.device("cpu"))
    with pytest.raises(LoweringError, match="unknown matmul precision 'int8'"):
        set_matmul_precision("int8")
