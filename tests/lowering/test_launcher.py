"""Launcher emission, rank layout and the runtime's argument checks (no processes), and the end-to-end
path: ``distplan trace`` -> ``distplan plan`` (real solver, mixed preset) -> ``distplan lower`` -> the
emitted ``torchrun`` command on this machine's CPU -> the loss falls over 5 steps."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from lowering_helpers import PYTHON, cli_env, cut, hand_plan, layout_plan

from distplan.errors import LoweringError
from distplan.lowering import emit_launcher, lower, train
from distplan.lowering.runtime import _plan_rank, plan_layout
from distplan.plan import Plan


def _two_host_plan() -> Plan:
    b = cut("gpt-tiny", 0.5)
    # stage 0 on the T4 host (host index 1), stage 1 on the A100 host (host index 0); dp 2 each
    return layout_plan(
        "gpt-tiny", f"1f1b m2x2 | 0:{b}@4,5 | {b}:{{n}}@0,1", global_batch=4, cluster="a100x4-t4x4"
    )


def test_emit_launcher_writes_one_command_per_host(tmp_path: Path) -> None:
    plan = _two_host_plan()
    files = emit_launcher(plan, "gpt-tiny", tmp_path / "run", steps=3, seq=32)
    assert [h.host_index for h in files.hosts] == [0, 1]
    # Only the options that differ from train.py's defaults follow the model spec.
    assert files.commands[0] == (
        "torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --rdzv-backend c10d "
        f"--rdzv-endpoint a100-node:29500 --rdzv-id distplan-{plan.id[:12]} train.py --host-index 0 "
        "--model gpt-tiny --steps 3 --seq 32"
    )
    assert "--nnodes 2 --node-rank 1 --nproc-per-node 2" in files.commands[1]
    assert files.commands[1].endswith("--host-index 1 --model gpt-tiny --steps 3 --seq 32")
    assert files.local_command == (
        "torchrun --standalone --nproc-per-node 4 train.py --device cpu --model gpt-tiny --steps 3 --seq 32"
    )
    assert Plan.load(files.plan_json) == plan
    text = files.commands_txt.read_text()
    for c in (*files.commands, files.local_command):
        assert c in text
    launch = files.launch_sh.read_text()
    assert os.access(files.launch_sh, os.X_OK)
    assert "0) shift; exec torchrun --nnodes 2 --node-rank 0" in launch and "local) shift; exec" in launch
    # train.py is the package's entry point itself, not text generated for this plan.
    assert files.train_py.read_text() == Path(train.__file__).read_text()
    # Its options parse as the commands give them.
    args = train.parse_args(shlex.split(files.commands[0].split(" train.py ", 1)[1]))
    assert (args.model, args.steps, args.seq, args.lr, args.host_index) == ("gpt-tiny", 3, 32, 1e-3, 0)


def test_config_json_model_is_copied_next_to_train_py(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "gpt2"}')
    files = emit_launcher(
        _two_host_plan(), str(cfg), tmp_path / "run", checkpoint="/data/my weights", optimizer="adam"
    )
    assert (tmp_path / "run" / "config.json").read_text() == cfg.read_text()
    assert files.local_command.endswith(
        "train.py --device cpu --model config.json --optimizer adam --checkpoint '/data/my weights'"
    )
    args = train.parse_args(shlex.split(files.local_command.split(" train.py ", 1)[1]))
    assert (args.model, args.optimizer, args.checkpoint) == ("config.json", "adam", "/data/my weights")


def test_train_options_are_checked() -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "gpt-tiny", "--checkpoint", "a", "--resume", "b"])
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "gpt-tiny", "--steps", "-1"])
    with pytest.raises(SystemExit):
        train.parse_args(["--steps", "2"])  # no model


def test_plan_rank_from_host_index_and_local_rank() -> None:
    plan = _two_host_plan()
    # Host-major ranks: A100 host (index 0) holds ranks 0, 1 (stage 1); T4 host (index 1) ranks 2, 3.
    assert _plan_rank(plan, torch_rank=0, local_rank=0, host_index=1) == 2
    assert _plan_rank(plan, torch_rank=3, local_rank=1, host_index=0) == 1
    assert _plan_rank(plan, torch_rank=3, local_rank=1, host_index=None) == 3
    with pytest.raises(LoweringError, match="no rank for host index 5"):
        _plan_rank(plan, torch_rank=0, local_rank=0, host_index=5)
    layout = plan_layout(plan)
    assert layout.stage_ranks == ((2, 3), (0, 1))
    assert layout.pipeline_ranks == ((2, 0), (3, 1))


def test_interleaved_stages_must_loop_over_ranks() -> None:
    q = [cut("gpt-tiny", f) for f in (0.25, 0.5, 0.75)]
    bad = hand_plan(
        "gpt-tiny", bounds=q, devices=[(0,), (1,), (1,), (0,)], schedule="interleaved-1f1b", microbatches=2
    )
    with pytest.raises(LoweringError, match="stages must loop over the pipeline ranks"):
        plan_layout(bad)


def test_lower_outside_torchrun_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _two_host_plan()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(LoweringError, match="RANK is not set: run under torchrun"):
        lower(plan, "gpt-tiny")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LoweringError, match="launched with 2 processes but the plan needs 4"):
        lower(plan, "gpt-tiny")


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env["PATH"] = os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")])
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_end_to_end_trace_plan_lower_torchrun(tmp_path: Path) -> None:
    cli = [PYTHON, "-m", "distplan.cli"]
    _run([*cli, "trace", "gpt-tiny", "--seq", "32", "--out", "graph.json"], tmp_path)
    _run(
        [
            *cli,
            "plan",
            "graph.json",
            "--cluster",
            "a100x4-t4x4",
            "--global-batch",
            "8",
            "--time-limit",
            "5",
            "--out",
            "plan.json",
        ],
        tmp_path,
    )
    _run([*cli, "lower", "plan.json", "--model", "gpt-tiny", "--out", "run", "--seq", "32"], tmp_path)
    plan = Plan.load(tmp_path / "plan.json")
    # The single-host CPU test command, exactly as emitted (last line of commands.txt).
    command = (tmp_path / "run" / "commands.txt").read_text().strip().splitlines()[-1]
    assert command == (
        f"torchrun --standalone --nproc-per-node {plan.world_size} train.py --device cpu --model gpt-tiny --seq 32"
    )
    proc = _run(shlex.split(command), tmp_path / "run", timeout=400)
    losses = [float(m) for m in re.findall(r"^step \d+ loss ([0-9.]+)", proc.stdout, flags=re.M)]
    assert len(losses) == 5, proc.stdout
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_1f1b_with_fewer_microbatches_than_stages_is_rejected() -> None:
    q = [cut("gpt-tiny", f) for f in (0.25, 0.5, 0.75)]
    plan = hand_plan("gpt-tiny", bounds=q, devices=[(0,), (1,), (2,), (3,)], schedule="1f1b", microbatches=2)
    with pytest.raises(LoweringError, match="2 microbatches for 4 stages"):
        plan_layout(plan)
