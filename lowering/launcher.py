"""Emit a self-contained launcher for a plan: ``plan.json``, ``train.py``, ``launch.sh``, ``commands.txt``.

``train.py`` is the package's own entry point, :mod:`distplan.lowering.train`, copied as it is (a real,
tested module, configured by its arguments and the plan file; copied so it can be edited in place, e.g.
its data loader). The ``torchrun`` command of each host passes that host's index (``--host-index``), so
ranks follow the plan whatever order the ``c10d`` rendezvous numbers the hosts in (see [Note: rank
translation] in ``distplan.lowering.runtime``), the model spec, and the options that differ from
``train.py``'s defaults. ``launch.sh`` passes extra options on: ``./launch.sh 0 --checkpoint weights/``
fine-tunes, ``--resume ckpt/`` continues a run saved with ``--save ckpt/``.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distplan.errors import LoweringError
from distplan.plan import Plan

__all__ = ["HostCommand", "LauncherFiles", "emit_launcher", "host_commands", "train_args"]


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


def host_commands(
    plan: Plan, *, port: int = 29500, script: str = "train.py", args: str = "", endpoint: str | None = None
) -> tuple[HostCommand, ...]:
    """One ``torchrun`` line per host of the plan (host-major, see [Note: rank order] in ``distplan.plan``);
    ``args`` follow ``--host-index``. ``endpoint``: the rendezvous ``host:port`` (default: the first host's
    name and ``port``; a manifest passes a shell variable its engine sets)."""
    hosts: dict[int, tuple[str, int]] = {}
    for r in plan.rank_map:
        name, n = hosts.get(r.host_index, (r.host, 0))
        hosts[r.host_index] = (name, n + 1)
    order = sorted(hosts)
    endpoint = endpoint or f"{hosts[order[0]][0]}:{port}"
    out = []
    for node_rank, h in enumerate(order):
        name, n = hosts[h]
        cmd = (
            f"torchrun --nnodes {len(order)} --node-rank {node_rank} --nproc-per-node {n} "
            f"--rdzv-backend c10d --rdzv-endpoint {endpoint} --rdzv-id distplan-{plan.id[:12]} "
            f"{script} --host-index {h}" + (f" {args}" if args else "")
        )
        out.append(HostCommand(node_rank, h, name, n, cmd))
    return tuple(out)


def train_args(
    model_spec: str,
    *,
    steps: int = 5,
    seq: int = 512,
    lr: float = 1e-3,
    optimizer: str | None = None,
    output: str | None = None,
    checkpoint: str | None = None,
) -> str:
    """The ``train.py`` options of a launch, shell-quoted: ``--model`` and every option whose value differs
    from :data:`distplan.lowering.train.DEFAULTS`."""
    from distplan.lowering.train import DEFAULTS

    given: dict[str, Any] = {"steps": steps, "seq": seq, "lr": lr, "optimizer": optimizer, "output": output}
    parts = ["--model", model_spec]
    for key, value in given.items():
        if value is not None and value != DEFAULTS[key]:
            parts += [f"--{key}", str(value)]
    if checkpoint is not None:
        parts += ["--checkpoint", checkpoint]
    return shlex.join(parts)


def scheduled_train_args(
    model_spec: str,
    *,
    job_id: str,
    steps_left: int | None,
    seq: int,
    optimizer: str | None,
    resume: bool,
    root: str = "/checkpoints",
) -> str:
    """The ``train.py`` options of a job a scheduler runs (manifests of ``distplan schedule`` and of the REST
    scheduler): it saves to ``root/<job>``, resumes from there when it has a checkpoint, and stops, saving,
    once ``root/<job>/STOP`` appears (how a scheduler preempts it). ``steps_left`` None: an open-ended job,
    run until stopped; otherwise at least one step."""
    ckpt = f"{root}/{job_id}"
    args = train_args(model_spec, steps=max(1, steps_left or 1), seq=seq, optimizer=optimizer)
    extra = ["--save", ckpt, "--stop-file", f"{ckpt}/STOP"]
    if steps_left is None:
        extra.append("--until-stopped")
    if resume:
        extra += ["--resume", ckpt]
    return args + " " + shlex.join(extra)


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
    checkpoint: str | None = None,
) -> LauncherFiles:
    """Write the launcher of ``plan`` for ``model_spec`` into ``out_dir`` (created if missing).

    ``train.py`` is :mod:`distplan.lowering.train` copied; the commands give it ``--model``, the options
    that differ from its defaults (``steps``, ``seq``, ``lr``, ``optimizer``: the plan's when ``None``;
    ``output``: the output selector, see [Note: output selector] in ``distplan.lowering.outputs``) and
    ``--checkpoint`` when given (pretrained weights every launch fine-tunes). A ``model_spec`` that is an
    existing file (an HF ``config.json``) is copied next to ``train.py`` and named by its file name.

    Raises:
        LoweringError: ``steps`` < 1, an empty spec, a folder that cannot be created.

        >>> files = emit_launcher(plan, "gpt-tiny", "run/")          # doctest: +SKIP
        >>> print(files.commands[0])                                 # doctest: +SKIP
        torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 ... train.py --host-index 0 --model gpt-tiny
    """
    from distplan.lowering import train

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
    args = train_args(
        spec, steps=steps, seq=seq, lr=lr, optimizer=optimizer, output=output, checkpoint=checkpoint
    )
    hosts = host_commands(plan, port=port, args=args)
    world = plan.world_size
    local = f"torchrun --standalone --nproc-per-node {world} train.py --device cpu {args}"
    plan_json = out / "plan.json"
    plan.save(plan_json)
    train_py = out / "train.py"
    shutil.copyfile(train.__file__, train_py)
    lines = [
        f"# {plan.layout}",
        f"# {world} ranks on {len(hosts)} host(s). Run in this folder on each host (replace the rendezvous host",
        "# name with its address if needed):",
    ]
    for h in hosts:
        lines.append(f"# host {h.host} (index {h.host_index}, {h.nproc} processes):")
        lines.append(h.command)
    lines += [
        "# Append to any line: --save DIR (a torch.distributed.checkpoint folder after the last step),",
        "# --resume DIR (continue it, under this plan or another), --checkpoint DIR (fine-tune pretrained",
        "# weights: a Hugging Face safetensors folder or a DCP folder). See: python train.py --help",
        "# all ranks on this machine's CPU (test):",
        local,
        "",
    ]
    commands_txt = out / "commands.txt"
    commands_txt.write_text("\n".join(lines))
    cases = "\n".join(f'  {h.host_index}) shift; exec {h.command} "$@" ;;  # {h.host}' for h in hosts)
    launch = f"""#!/usr/bin/env bash
# Launch the plan {plan.id[:12]} ({plan.layout}).
# On each host:  ./launch.sh HOST_INDEX [train.py options]     (host indices: {", ".join(str(h.host_index) for h in hosts)})
# On one machine's CPU, all {world} ranks:  ./launch.sh local [train.py options]
# Options: --save DIR, --resume DIR, --checkpoint DIR (fine-tune), --steps N, ... (python train.py --help)
set -euo pipefail
cd "$(dirname "$0")"
case "${{1:-}}" in
{cases}
  local) shift; exec {local} "$@" ;;
  *) echo "usage: $0 HOST_INDEX|local [train.py options]" >&2; exit 2 ;;
esac
"""
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
