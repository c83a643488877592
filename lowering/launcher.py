"""Emit a self-contained launcher for a plan: ``plan.json``, ``train.py``, ``launch.sh``, ``commands.txt``.

``train.py`` imports distplan, rebuilds the model from its spec, calls :func:`distplan.lower` and trains on
synthetic seeded data, printing the loss per step on the last stage. The ``torchrun`` command of each host
passes that host's index (``--host-index``), so ranks follow the plan whatever order the ``c10d`` rendezvous
numbers the hosts in (see [Note: rank translation] in ``distplan.lowering.runtime``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from distplan.errors import LoweringError
from distplan.plan import Plan

__all__ = ["HostCommand", "LauncherFiles", "emit_launcher", "host_commands"]


@dataclass(frozen=True, slots=True)
class HostCommand:
    """The launch line of one host: ``node_rank`` among the plan's hosts, the cluster's host index and name,
    and the number of processes it runs."""

    node_rank: int
    host_index: int
    host: str
    nproc: int
    command: str


@dataclass(frozen=True, slots=True)
class LauncherFiles:
    """What :func:`emit_launcher` wrote.

    Attributes:
        out_dir / plan_json / train_py / launch_sh / commands_txt: the files.
        hosts: one :class:`HostCommand` per host, in node-rank order.
        commands: the host commands' text, in node-rank order.
        local_command: the single-machine CPU test command (all ranks on this machine).
    """

    out_dir: Path
    plan_json: Path
    train_py: Path
    launch_sh: Path
    commands_txt: Path
    hosts: tuple[HostCommand, ...]
    commands: tuple[str, ...]
    local_command: str

    def to_dict(self) -> dict[str, object]:
        return {
            "out_dir": str(self.out_dir),
            "files": [str(p) for p in (self.plan_json, self.train_py, self.launch_sh, self.commands_txt)],
            "commands": list(self.commands),
            "local_command": self.local_command,
            "hosts": [
                {"node_rank": h.node_rank, "host_index": h.host_index, "host": h.host, "nproc": h.nproc}
                for h in self.hosts
            ],
        }


def host_commands(plan: Plan, *, port: int = 29500, script: str = "train.py") -> tuple[HostCommand, ...]:
    """One ``torchrun`` line per host of the plan (host-major, see [Note: rank order] in ``distplan.plan``)."""
    hosts: dict[int, tuple[str, int]] = {}
    for r in plan.rank_map:
        name, n = hosts.get(r.host_index, (r.host, 0))
        hosts[r.host_index] = (name, n + 1)
    order = sorted(hosts)
    endpoint = f"{hosts[order[0]][0]}:{port}"
    out = []
    for node_rank, h in enumerate(order):
        name, n = hosts[h]
        cmd = (
            f"torchrun --nnodes {len(order)} --node-rank {node_rank} --nproc-per-node {n} "
            f"--rdzv-backend c10d --rdzv-endpoint {endpoint} --rdzv-id distplan-{plan.id[:12]} "
            f"{script} --host-index {h}"
        )
        out.append(HostCommand(node_rank, h, name, n, cmd))
    return tuple(out)


_TRAIN_PY = '''\
"""Train {model_doc} with the distplan plan in plan.json (written by `distplan lower`).

Plan: {layout}
Ranks: {world} ({hosts} host(s)). Launch with the torchrun line of each host in commands.txt, or on one
machine's CPU: torchrun --standalone --nproc-per-node {world} train.py --device cpu

Every rank builds the model from the same spec and seed (identical weights), takes its stage(s) from
distplan.lower and trains on one fixed synthetic batch, so the printed loss falls step by step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

import distplan
from distplan.plan import Plan

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description="distplan training entry point")
    p.add_argument("--plan", default=str(HERE / "plan.json"), help="plan JSON (default: plan.json here)")
    p.add_argument("--model", default={model!r}, help="model spec (default: %(default)s)")
    p.add_argument("--steps", type=int, default={steps}, help="training steps (default: %(default)s)")
    p.add_argument("--seq", type=int, default={seq}, help="sequence length (default: %(default)s)")
    p.add_argument("--lr", type=float, default={lr}, help="learning rate (default: %(default)s)")
    p.add_argument("--optimizer", default={optimizer!r}, help="sgd, adam or adamw (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA if present")
    p.add_argument("--host-index", type=int, default=None, help="this host's index in the plan (multi-host)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="collective timeout, s (default: %(default)s)")
    p.add_argument("--output", default={output!r}, help="model output the loss reads (default: %(default)s)")
    args = p.parse_args()

    model = args.model
    if (HERE / model).is_file():  # a config.json shipped next to this script
        model = str(HERE / model)
    plan = Plan.load(args.plan)
    runner = distplan.lower(
        plan,
        model,
        seq=args.seq,
        optimizer=args.optimizer,
        lr=args.lr,
        device=None if args.device == "auto" else args.device,
        host_index=args.host_index,
        timeout_s=args.timeout,
        seed=args.seed,
        output=args.output,
    )
    info = runner.rank_info
    batch = runner.source.sample(plan.request.global_batch, seed=args.seed + 1)
    for step in range(args.steps):
        loss = runner.train_step(batch.args, batch.target, batch.kwargs)
        if loss is not None and info.replica == 0:
            print(f"step {{step}} loss {{loss:.6f}} (rank {{info.rank}}, stage {{info.stages[-1]}})", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def emit_launcher(
    plan: Plan,
    model_spec: str,
    out_dir: str | Path,
    *,
    steps: int = 5,
    seq: int = 512,
    lr: float = 1e-3,
    optimizer: str | None = None,
    port: int = 29500,
    output: str | None = None,
) -> LauncherFiles:
    """Write the launcher of ``plan`` for ``model_spec`` into ``out_dir`` (created if missing).

    A ``model_spec`` that is an existing file (an HF ``config.json``) is copied next to ``train.py``.
    ``output`` is the output selector ``train.py`` passes to :func:`distplan.lower` (its ``--output``
    default; see [Note: output selector] in ``distplan.lowering.outputs``).

        >>> files = emit_launcher(plan, "gpt-tiny", "run/")          # doctest: +SKIP
        >>> print(files.commands[0])                                 # doctest: +SKIP
        torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint ...
    """
    if steps < 1:
        raise LoweringError(f"steps must be >= 1, got {steps}")
    if not model_spec:
        raise LoweringError("model spec must not be empty")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoweringError(f"cannot create output folder {str(out)!r}: {e.strerror or e}") from e
    spec = model_spec
    src = Path(model_spec)
    if src.is_file():
        target = out / src.name
        if src.resolve() != target.resolve():
            shutil.copyfile(src, target)
        spec = src.name
    hosts = host_commands(plan, port=port)
    world = plan.world_size
    local = f"torchrun --standalone --nproc-per-node {world} train.py --device cpu"
    plan_json = out / "plan.json"
    plan.save(plan_json)
    train_py = out / "train.py"
    train_py.write_text(
        _TRAIN_PY.format(
            model_doc=spec,
            model=spec,
            layout=plan.layout,
            world=world,
            hosts=len(hosts),
            steps=steps,
            seq=seq,
            lr=lr,
            optimizer=optimizer or plan.request.optimizer,
            output=output,
        )
    )
    lines = [
        f"# {plan.layout}",
        f"# {world} ranks on {len(hosts)} host(s). Run in this folder on each host (replace the rendezvous host",
        "# name with its address if needed):",
    ]
    for h in hosts:
        lines.append(f"# host {h.host} (index {h.host_index}, {h.nproc} processes):")
        lines.append(h.command)
    lines += ["# all ranks on this machine's CPU (test):", local, ""]
    commands_txt = out / "commands.txt"
    commands_txt.write_text("\n".join(lines))
    cases = "\n".join(f'  {h.host_index}) exec {h.command} "$@" ;;  # {h.host}' for h in hosts)
    launch = f"""#!/usr/bin/env bash
# Launch the plan {plan.id[:12]} ({plan.layout}).
# On each host:  ./launch.sh HOST_INDEX [train.py options]     (host indices: {", ".join(str(h.host_index) for h in hosts)})
# On one machine's CPU, all {world} ranks:  ./launch.sh local [train.py options]
set -euo pipefail
cd "$(dirname "$0")"
case "${{1:-}}" in
{cases}
  local) shift; exec {local} "$@" ;;
  *) echo "usage: $0 HOST_INDEX|local [train.py options]" >&2; exit 2 ;;
esac
"""
    # `shift` before exec for host cases too, so extra options reach train.py.
    launch = launch.replace(") exec torchrun --nnodes", ") shift; exec torchrun --nnodes")
    launch_sh = out / "launch.sh"
    launch_sh.write_text(launch)
    launch_sh.chmod(0o755)
    return LauncherFiles(
        out_dir=out,
        plan_json=plan_json,
        train_py=train_py,
        launch_sh=launch_sh,
        commands_txt=commands_txt,
        hosts=hosts,
        commands=tuple(h.command for h in hosts),
        local_command=local,
    )
