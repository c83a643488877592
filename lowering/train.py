"""The training entry point of a lowered plan, one process per rank under ``torchrun``.

``distplan lower`` copies this file next to ``plan.json`` as ``train.py`` (edit it there: replace
:func:`batches` with your data loader); it also runs from the package as ``python -m
distplan.lowering.train``. Everything it does is set by its arguments and the plan file::

    # fresh start: weights from the reproducible initialisation (the same whatever the plan)
    torchrun --standalone --nproc-per-node 4 train.py --model gpt2 --steps 100 --save ckpt/
    # fine-tune pretrained weights: a Hugging Face folder (model.safetensors, or shards with
    # model.safetensors.index.json) or a torch.distributed.checkpoint folder; each rank reads its tensors
    torchrun --standalone --nproc-per-node 4 train.py --model gpt2 --checkpoint ./gpt2-weights/
    # resume weights, optimizer state and step count, under this plan or another (DCP reshards by name)
    torchrun --standalone --nproc-per-node 4 train.py --model gpt2 --resume ckpt/ --steps 100
    # preemptible: once the file STOP appears, save to ckpt/ after the current step and exit 0
    torchrun --standalone --nproc-per-node 4 train.py --model gpt2 --save ckpt/ --stop-file STOP

The rank that runs the last stage of the first replica (its first tensor-parallel rank) prints ``step K
loss L`` per step (``K`` counts from
the resumed step). Exit code 0, or non-zero with the error of the failing rank (a collective carries
``--timeout``, so no rank waits on a dead peer for long).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "batches", "main", "parse_args"]

HERE = Path(__file__).resolve().parent

# The defaults of the options the launcher may set; it writes only the ones that differ into the commands.
DEFAULTS: dict[str, Any] = {"steps": 5, "seq": 512, "lr": 1e-3, "optimizer": None, "output": None}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); ``argv`` defaults to ``sys.argv[1:]``."""
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a model with a distplan plan (one process per rank, torchrun)."
    )
    p.add_argument(
        "--plan", default=None, help="plan JSON (default: plan.json next to this script, else in the cwd)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="model spec the plan was made for: built-in name, config.json path or package.module:function",
    )
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="steps to run (default: %(default)s)")
    p.add_argument("--seq", type=int, default=DEFAULTS["seq"], help="sequence length (default: %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate (default: %(default)s)")
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam", "adamw"],
        default=DEFAULTS["optimizer"],
        help="optimizer (default: the plan's)",
    )
    p.add_argument(
        "--output",
        default=DEFAULTS["output"],
        help="model output the loss reads (default: logits or the first)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA if present"
    )
    p.add_argument("--host-index", type=int, default=None, help="this host's index in the plan (multi-host)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and data (default: 0)")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="collective timeout, s (default: %(default)s)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="pretrained weights to fine-tune: Hugging Face safetensors folder or DCP folder (default: none)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="DCP folder written by --save: weights, optimizer, step (default: none)",
    )
    p.add_argument("--save", default=None, help="DCP folder to save to after the last step (default: none)")
    p.add_argument(
        "--save-every", type=int, default=0, help="also save every N steps (default: 0, at the end only)"
    )
    p.add_argument(
        "--until-stopped",
        action="store_true",
        help="run steps until the --stop-file appears instead of --steps of them (an open-ended job a "
        "scheduler stops; default: off)",
    )
    p.add_argument(
        "--stop-file",
        default=None,
        help="stop early once this file exists: after each step the ranks agree, save to --save and exit 0 "
        "(a scheduler preempting the run; default: none)",
    )
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    if args.save_every < 0:
        p.error(f"--save-every must be >= 0, got {args.save_every}")
    if args.checkpoint and args.resume:
        p.error("--checkpoint (weights to fine-tune) and --resume (a run to continue) exclude each other")
    if args.stop_file and not args.save:
        p.error("--stop-file needs --save (the checkpoint a stopped run resumes from)")
    if args.until_stopped and not args.stop_file:
        p.error("--until-stopped needs --stop-file (how the run learns to stop)")
    return args


def _local(path: str) -> str:
    """A relative file path found next to this script (a config.json the launcher copied) is used from there."""
    p = Path(path)
    return str(HERE / p) if not p.is_absolute() and not p.exists() and (HERE / p).exists() else path


def batches(runner: Any, seed: int) -> Iterator[Any]:
    """The training data: here one fixed synthetic batch of the plan's global batch, seeded, for every step
    (so the loss visibly falls, and a resumed run sees what an uninterrupted one saw). Replace it with your
    data loader; each rank may be given the whole global batch and takes what its stage and replica need."""
    batch = runner.source.sample(runner.plan.request.global_batch, seed=seed + 1)
    while True:
        yield batch


def _stop_requested(path: str, device: str) -> bool:
    """Whether any rank sees the stop file: every rank asks at the same step, so all stop together (a rank
    that stopped alone would leave the others waiting in the next step's transfers)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if Path(path).exists() else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def main(argv: Sequence[str] | None = None) -> int:
    """Lower the plan on this rank, train ``--steps`` steps, save if asked. Returns the exit code."""
    args = parse_args(argv)
    import torch.distributed as dist

    import distplan
    from distplan.plan import Plan

    plan_path = args.plan or (str(HERE / "plan.json") if (HERE / "plan.json").exists() else "plan.json")
    plan = Plan.load(plan_path)
    runner = distplan.lower(
        plan,
        _local(args.model),
        seq=args.seq,
        optimizer=args.optimizer,
        lr=args.lr,
        device=None if args.device == "auto" else args.device,
        host_index=args.host_index,
        timeout_s=args.timeout,
        seed=args.seed,
        output=args.output,
        checkpoint=_local(args.checkpoint) if args.checkpoint else None,
    )
    info = runner.rank_info
    start = 0
    if args.resume:
        start = runner.load(args.resume).step or 0
        if info.rank == 0:
            print(f"resumed from {args.resume} after step {start}", flush=True)
    data = batches(runner, args.seed)
    # An open-ended run has no last step: it ends at the stop file.
    end = sys.maxsize if args.until_stopped else start + args.steps
    for k in range(start, end):
        batch = next(data)
        loss = runner.train_step(batch.args, batch.target, batch.kwargs)
        if loss is not None and info.replica == 0 and info.tp_rank == 0:
            print(f"step {k} loss {loss:.6f} (rank {info.rank}, stage {info.stages[-1]})", flush=True)
        done = k + 1
        if args.stop_file and done < end and _stop_requested(args.stop_file, info.device):
            runner.save(args.save, step=done)
            if info.rank == 0:
                print(f"stopped after step {done}; saved {args.save}", flush=True)
            dist.destroy_process_group()
            return 0
        if args.save and args.save_every and done % args.save_every == 0 and done < end:
            runner.save(args.save, step=done)
    if args.save:
        runner.save(args.save, step=start + args.steps)
        if info.rank == 0:
            print(f"saved {args.save} after step {start + args.steps}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
