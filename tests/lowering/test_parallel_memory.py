"""Recomputation lowers the activation memory the lowered program really holds, measured on the CPU.

Method (see [Note: measuring activation memory] in ``distplan.lowering.memory``): one gloo rank runs a
one-stage GPipe plan (4 microbatches, so every forward runs before any backward); one step runs under the
PyTorch profiler with ``profile_memory=True`` and the signed sizes of its ``[memory]`` events, summed in time
order, give the bytes allocated in the step and still live at the end of the last forward (what is held
for the backward) and at the peak. GPT-2 with attention written out (``attn_implementation="eager"``), so
the attention scores are real activations that selective recomputation can drop.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from lowering_helpers import PYTHON, cli_env

from distplan.plan import GraphRef, Plan, PlanRequest, Stage, build_rank_map
from distplan.profiles import load_cluster
from distplan.tracer import resolve_model, trace

HERE = Path(__file__).resolve().parent
SEQ = 64
EAGER = {"attn_implementation": "eager"}


def _plan(recompute: str) -> Plan:
    g = trace(resolve_model("gpt2-tiny", batch=2, seq=SEQ, device="meta", config_overrides=EAGER), seq=SEQ)
    c = load_cluster("cpu-local")
    stage = Stage(0, 0, len(g), (0,), c.devices()[0].kind, recompute=recompute)
    req = PlanRequest(c, global_batch=8, schedule="gpipe")
    return Plan(req, GraphRef.of(g), (stage,), 4, 2, "gpipe", build_rank_map(c, [stage.devices]))


@pytest.mark.slow
def test_recomputation_holds_less_activation_memory(tmp_path: Path) -> None:
    cfg = {
        "model": "gpt2-tiny",
        "seq": SEQ,
        "config_overrides": EAGER,
        "plans": [_plan(rc).to_dict() for rc in ("none", "selective", "full")],
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [PYTHON, str(HERE / "parallel_memory_rank.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = {d["recompute"]: d for d in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
    assert set(got) == {"none", "selective", "full"}, proc.stdout
    none, sel, full = got["none"], got["selective"], got["full"]
    for d in got.values():
        assert d["events"] > 0 and d["after_forward_bytes"] > 0
    # Held for the backward after all 4 forwards: full keeps only each microbatch's input (token ids);
    # selective drops at least the attention weights (softmax's output, 2 samples x 4 heads x 64 x 64
    # floats per layer, 2 layers, 4 microbatches: 1 MiB); ask for half of it.
    scores = 4 * 2 * (2 * 4 * SEQ * SEQ * 4)
    assert full["after_forward_bytes"] < sel["after_forward_bytes"] < none["after_forward_bytes"]
    assert none["after_forward_bytes"] - sel["after_forward_bytes"] >= scores // 2
    assert full["after_forward_bytes"] < none["after_forward_bytes"] / 4
    assert full["peak_bytes"] < none["peak_bytes"]
