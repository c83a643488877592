"""Train a model split by distplan, inside an ordinary torchrun training script.

Run on this machine's CPU with two processes (gloo), from scratch, saving a checkpoint at the end:

    torchrun --standalone --nproc-per-node 2 examples/train_pipeline.py --save ckpt/

then fine-tune from that folder (weights only, a fresh optimizer), or continue the run (weights, optimizer
state, step count), under the same plan or another:

    torchrun --standalone --nproc-per-node 2 examples/train_pipeline.py --checkpoint ckpt/
    torchrun --standalone --nproc-per-node 2 examples/train_pipeline.py --resume ckpt/

``--checkpoint`` also takes a Hugging Face folder (``model.safetensors``, or shards with
``model.safetensors.index.json``) for a model of the same architecture, e.g. ``--model gpt2 --checkpoint
./gpt2`` after ``huggingface-cli download gpt2 --local-dir ./gpt2``. With a plan made earlier (``distplan
plan MODEL --cluster ... --out plan.json``), on the cluster it was made for:

    torchrun --standalone --nproc-per-node 2 examples/train_pipeline.py --plan plan.json

What it does, in the order a training script would:

1. rank 0 traces the model (a built-in name here) on the meta device and asks the planner for a plan on a
   cluster of ``WORLD_SIZE`` devices of this machine's kind, then sends the plan to every rank (one plan,
   even if a solver were to time out differently on two ranks),
2. ``distplan.lower(plan, spec)`` builds the model on the meta device and gives each rank its stage(s),
   materialised on its device and nothing else (from the checkpoint, or from the reproducible
   initialisation: the same weights whatever the plan), and its data-parallel group,
3. each step feeds the same global batch to every rank (each rank takes what its stage needs) and the
   ranks running the last stage print the loss (one fixed batch here, so the loss visibly falls),
4. ``runner.save`` / ``runner.load`` write and read a ``torch.distributed.checkpoint`` folder.

It is deliberately a standalone script rather than the launcher's entry point
(``distplan.lowering.train``, which ``distplan lower`` copies as ``train.py``): it shows distplan inside
a script of your own, including planning at start-up, where the entry point takes a plan file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

import distplan


def local_cluster(world_size: int, memory_mib: float) -> dict[str, object]:
    """This machine as a one-host cluster of ``world_size`` CPU ranks, each with ``memory_mib`` of memory.

    The device kind is defined inline (any datasheet numbers work the same way). The small memory budget
    is what makes the tiny model need splitting, as a large model would on real GPUs: into pipeline stages,
    or with its optimizer state (or more) sharded over the data-parallel replicas, whichever the planner
    finds faster; with a large budget it would rightly keep the whole model on each rank (data parallel).
    """
    return {
        "name": f"this-machine-{world_size}",
        "description": "the CPU ranks of this torchrun launch",
        "kinds": [
            {
                "name": "cpu-rank",
                "memory_bytes": int(memory_mib * 2**20),
                "memory_bandwidth_gbyte_s": 20,
                "peak_tflops": {"fp32": 0.16},
                "efficiency": 0.5,
            }
        ],
        "hosts": [
            {
                "name": "localhost",
                "devices": [{"kind": "cpu-rank", "count": world_size}],
                "link": {"bandwidth_gbyte_s": 5, "latency_us": 50},
            }
        ],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="gpt-tiny", help="built-in model name or HF config.json (default: gpt-tiny)"
    )
    p.add_argument("--seq", type=int, default=64, help="sequence length (default: 64)")
    p.add_argument("--global-batch", type=int, default=8, help="samples per iteration (default: 8)")
    p.add_argument("--steps", type=int, default=5, help="training steps (default: 5)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument(
        "--memory-mib",
        type=float,
        default=1.0,
        help="memory per rank the planner may use, MiB (default: 1.0, too little for the whole model)",
    )
    p.add_argument("--plan", default=None, help="use this plan JSON instead of planning (default: plan now)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="fine-tune these weights: a Hugging Face safetensors folder or a DCP folder (default: fresh start)",
    )
    p.add_argument("--resume", default=None, help="continue the run saved in this DCP folder (default: none)")
    p.add_argument("--save", default=None, help="save a DCP checkpoint here at the end (default: none)")
    args = p.parse_args()
    if args.checkpoint and args.resume:
        p.error("--checkpoint (weights to fine-tune) and --resume (a run to continue) exclude each other")
    return args


def main() -> int:
    args = parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A timeout, so that a rank that dies never leaves the others waiting for half an hour.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))

    # 1. One plan for all ranks: rank 0 makes (or loads) it and broadcasts it as JSON.
    box: list[str | None] = [None]
    if rank == 0:
        if args.plan:
            plan = distplan.Plan.load(args.plan)
        else:
            graph = distplan.trace(args.model, seq=args.seq)
            plan = distplan.plan(
                graph,
                cluster=local_cluster(world, args.memory_mib),
                global_batch=args.global_batch,
                time_limit_s=5,
            )
        box[0] = plan.to_json()
        print(
            f"plan: {plan.layout}  (predicted {plan.predictions.iteration_time_s * 1e3:.1f} ms / iteration)"
        )
    dist.broadcast_object_list(box, src=0)
    assert box[0] is not None
    plan = distplan.Plan.from_json(box[0])
    if plan.world_size != world:
        if rank == 0:
            print(
                f"error: the plan uses {plan.world_size} ranks but torchrun started {world}; "
                f"run with --nproc-per-node {plan.world_size}",
                file=sys.stderr,
            )
        dist.destroy_process_group()
        return 2

    # 2. This rank's stage(s), data-parallel group and optimizer. The model is built on the meta device;
    # only this rank's tensors get memory, from the checkpoint or the reproducible initialisation.
    runner = distplan.lower(
        plan, args.model, seq=args.seq, optimizer="adam", lr=args.lr, checkpoint=args.checkpoint
    )
    info = runner.rank_info
    start = 0
    if args.resume:  # weights, Adam's moments and the step count
        start = runner.load(args.resume).step or 0

    # 3. Train. Every rank gets the same global batch; each takes the slice its stage and replica need.
    # One fixed batch, so that the loss visibly falls within a few steps.
    batch = runner.source.sample(plan.request.global_batch, seed=0)
    for step in range(start, start + args.steps):
        loss = runner.train_step(batch.args, batch.target, batch.kwargs)
        if loss is not None and info.replica == 0 and info.tp_rank == 0:
            print(f"step {step}  loss {loss:.4f}  (rank {rank}, stage {info.stages[-1]})", flush=True)

    # 4. Every rank writes its part; a later run may resume it under another plan.
    if args.save:
        runner.save(args.save, step=start + args.steps)
        if rank == 0:
            print(f"saved {args.save} after step {start + args.steps}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
