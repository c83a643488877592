"""Validation for real (one gloo process per rank) of the model kinds that used to break the lowering:
keyword inputs with a batch dimension, dict/tuple/dataclass outputs, random ops, in-place ops at the start
of a stage, batch statistics and buffers written by the forward. Each kind on a model shaped like the
reported case and on one more model of the same kind (``fault_models.py``)."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from lowering_helpers import PYTHON, cli_env

from distplan.graph import OpGraph
from distplan.lowering import Tolerance, ValidationReport, validate
from distplan.plan import Plan
from distplan.planner import evaluate
from distplan.tracer import trace

HERE = Path(__file__).resolve().parent
TOL = Tolerance(loss=1e-5, grad=1e-4, param=1e-4, buffer=1e-4)
GPT2_DROPOUT = str(HERE / "gpt2_dropout_config.json")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank processes import ``fault_models`` by spec."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(x for x in (str(HERE), os.environ.get("PYTHONPATH")) if x)
    )


@functools.cache
def _graph(spec: str) -> OpGraph:
    return trace(spec, batch=2, seq=8)


def _plan(spec: str, layout: str, *, global_batch: int, cuts: list[str] | None = None) -> Plan:
    """``layout`` with ``{n}`` the node count and ``{c0}``, ``{c1}``, ... the positions of the nodes named in
    ``cuts`` (a stage starts at each), else ``{a}`` and ``{b}`` at a third and two thirds."""
    g = _graph(spec)
    names = [n.name for n in g.nodes]
    pos = {f"c{i}": names.index(c) for i, c in enumerate(cuts or [])}
    text = layout.format(n=len(g), a=len(g) // 3, b=2 * len(g) // 3, **pos)
    return evaluate(g, cluster="cpu-local", layout=text, global_batch=global_batch)


def _passed(report: ValidationReport, *, ranks: int) -> None:
    assert report.passed, report.summary()
    assert report.ranks == ranks and report.error is None
    assert report.max_rel_error <= 1e-4
    for got, want in zip(report.losses, report.reference_losses, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want)


# ---------------------------------------------------------------------------------------------- keyword inputs
def test_keyword_mask_is_cut_into_replicas_and_microbatches() -> None:
    spec = "fault_models:masked_stack"
    plan = _plan(spec, "gpipe m2x4 | 0:{a}@0,1 | {a}:{n}@2,3", global_batch=8)
    report = validate(plan, spec, steps=2, tolerance=TOL)
    _passed(report, ranks=4)
    assert report.reference == "global-batch" and report.random_ops == ()


def test_keyword_ids_cut_and_keyword_table_passed_whole() -> None:
    spec = "fault_models:segment_net"
    plan = _plan(spec, "1f1b m4x1 | 0:{a}@0 | {a}:{b}@1 | {b}:{n}@2", global_batch=4)
    _passed(validate(plan, spec, tolerance=TOL), ranks=3)


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize(
    ("spec", "output", "used"),
    [
        ("fault_models:dict_head", None, "logits"),  # the default rule picks `logits`
        ("fault_models:dataclass_head", None, "logits"),  # captured by fx: the dataclass is a graph node
    ],
)
def test_structured_output_validates(spec: str, output: str | None, used: str) -> None:
    plan = _plan(spec, "gpipe m2x2 | 0:{a}@0 | {a}:{n}@1", global_batch=4)
    report = validate(plan, spec, output=output, tolerance=TOL)
    _passed(report, ranks=2)
    assert report.output == used
    assert any(f"the loss reads output {used!r}" in n for n in report.notes)


def test_tuple_output_selected_on_the_command_line(tmp_path: Path) -> None:
    spec = "fault_models:tuple_head"
    path = tmp_path / "plan.json"
    _plan(spec, "1f1b m2x2 | 0:{a}@0 | {a}:{n}@1", global_batch=4).save(path)
    env = cli_env()
    env["PYTHONPATH"] = os.environ["PYTHONPATH"] + os.pathsep + env["PYTHONPATH"]
    cmd = [PYTHON, "-m", "distplan.cli", "validate", str(path), "--model", spec]
    proc = subprocess.run(
        [*cmd, "--output", "1.0", "--json"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["passed"] is True and out["output"] == "1.0"
    proc = subprocess.run([*cmd, "--output", "1.5"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "output selector '1.5': output.1 is a tuple of 2 entries, which has no entry '5'" in proc.stderr


# ---------------------------------------------------------------------------------------------- random ops
def test_dropout_model_validates_with_random_ops_pinned() -> None:
    """The reported case: GPT-2 with dropout 0.1 everywhere (embedding, attention, residual, MLP)."""
    plan = _plan(GPT2_DROPOUT, "1f1b m2x1 | 0:{a}@0 | {a}:{n}@1", global_batch=2)
    report = validate(plan, GPT2_DROPOUT, steps=2, tolerance=TOL)
    _passed(report, ranks=2)
    modules = {r.split(" ")[0] for r in report.random_ops}
    assert {"transformer.drop", "transformer.h.0.attn", "transformer.h.3.mlp.dropout"} <= modules
    assert any(n.startswith("random ops pinned") for n in report.notes)


def test_hand_made_random_ops_validate() -> None:
    spec = "fault_models:noisy_net"
    plan = _plan(spec, "gpipe m2x2 | 0:{a}@0 | {a}:{n}@1", global_batch=4)
    report = validate(plan, spec, tolerance=TOL)
    _passed(report, ranks=2)
    ops = {r.split("(")[1].split(",")[0] for r in report.random_ops}
    assert {"aten.rand.default", "aten.rand_like.default", "aten.randn_like.default"} <= ops, ops


# ---------------------------------------------------------------------------------------------- in-place ops
@pytest.mark.parametrize(
    ("spec", "cuts"),
    [
        ("fault_models:relu_inplace_stack", ["relu_", "relu__2"]),
        ("fault_models:inplace_residual", ["mul__1", "slice_3"]),  # mul_, and add_ on a slice of the input
    ],
)
def test_stages_starting_with_in_place_ops_validate(spec: str, cuts: list[str]) -> None:
    plan = _plan(spec, "gpipe m2x2 | 0:{c0}@0 | {c0}:{c1}@1 | {c1}:{n}@2", global_batch=4, cuts=cuts)
    _passed(validate(plan, spec, tolerance=TOL), ranks=3)


# ---------------------------------------------------------------------------------------------- batch statistics
def test_batchnorm_under_microbatching_is_named_and_compared_with_its_buffers() -> None:
    spec = "fault_models:bn_stack"
    plan = _plan(spec, "gpipe m4x2 | 0:{a}@0 | {a}:{b}@1 | {b}:{n}@2", global_batch=8)
    report = validate(plan, spec, steps=2, tolerance=TOL)
    _passed(report, ranks=3)
    assert report.reference == "microbatched"
    assert report.batch_stat_layers == ("1 (BatchNorm1d)", "4 (BatchNorm1d)", "7 (BatchNorm1d)")
    buffers = {t.name for t in report.tensors if t.kind == "buffer"}
    assert {"1.num_batches_tracked", "4.running_mean", "7.running_var"} <= buffers
    assert any("effect of microbatching on the model" in n for n in report.notes)


def test_batchnorm2d_and_a_counter_with_data_parallel_replicas() -> None:
    spec = "fault_models:conv_bn"
    plan = _plan(spec, "gpipe m2x4 | 0:{c0}@0,1 | {c0}:{n}@2,3", global_batch=8, cuts=["relu"])
    report = validate(plan, spec, tolerance=TOL)
    _passed(report, ranks=4)
    assert report.batch_stat_layers == ("bn1 (BatchNorm2d)", "bn2 (BatchNorm2d)")
    assert "samples_seen" in report.written_buffers
    seen = next(t for t in report.tensors if t.kind == "buffer" and t.name == "samples_seen")
    assert seen.copies >= 2 and seen.passed  # every replica against its own reference


# ---------------------------------------------------------------------------------------------- launcher
def test_lower_with_output_and_run_the_launcher_on_keyword_inputs(tmp_path: Path) -> None:
    """``distplan lower --output`` writes commands whose train.py selects that output and passes the keyword
    mask."""
    spec = "fault_models:masked_dict_head"
    _plan(spec, "gpipe m2x2 | 0:{a}@0 | {a}:{n}@1", global_batch=4).save(tmp_path / "plan.json")
    env = cli_env()
    env["PYTHONPATH"] = os.environ["PYTHONPATH"] + os.pathsep + env["PYTHONPATH"]
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")])
    cmd = [PYTHON, "-m", "distplan.cli", "lower", "plan.json", "--model", spec, "--out", "run"]
    proc = subprocess.run(
        [*cmd, "--output", "logits"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = (tmp_path / "run" / "commands.txt").read_text().strip().splitlines()[-1]
    assert local.endswith(f"train.py --device cpu --model {spec} --output logits")
    proc = subprocess.run(
        [*shlex.split(local), "--lr", "0.05"],
        cwd=tmp_path / "run",
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [float(m) for m in re.findall(r"^step \d+ loss ([0-9.]+)", proc.stdout, flags=re.M)]
    assert len(losses) == 5, proc.stdout
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
