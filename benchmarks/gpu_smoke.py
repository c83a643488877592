"""GPU smoke test of the lowering: a plan over all GPUs of this machine, run for real on CUDA/NCCL, checked
against one GPU, with each rank's peak memory beside the plan's prediction.

    benchmarks/gpu_smoke.sh                      # all GPUs of this machine (a few minutes)
    benchmarks/gpu_smoke.sh --dry-run            # the same path on 2 CPU ranks (gloo), no GPU needed

What it does:

1. Finds the GPUs (``torch.cuda.device_count()``, name, memory) and describes them as a one-host cluster:
   the catalogue's device kind whose family appears in the GPU's name and whose memory is closest
   (``NVIDIA H100 80GB HBM3`` -> ``h100-sxm-80g``), else an inline kind with the GPU's memory (its speed
   figures are placeholders: only the memory prediction is compared here).
2. Traces the model on ``meta`` and fixes a layout through the planner's cost model: 2 pipeline stages of
   about equal parameter bytes, each over half the GPUs (data parallel), 1F1B, so point-to-point sends,
   the data-parallel all-reduce and the tied-embedding all-reduce all run (1 GPU: one stage).
3. Runs it with ``torch.distributed.run``, one process per GPU: each rank builds the model on ``meta``,
   materialises only its stage on its GPU from the reproducible initialisation, and trains ``--steps``
   steps of Adam on one fixed seeded batch, recording the loss, ``torch.cuda.max_memory_allocated()`` and
   the iteration time.
4. Runs the same steps on one GPU (the reproducible initialisation gives it the same initial weights) and
   compares the losses (relative tolerance ``--tol``, default 1e-4: fp32 with TF32 off on both sides; the
   pipeline sums the loss per microbatch, so reductions run in another order).
5. Prints a table and writes ``benchmarks/results/gpu_smoke.json`` (``gpu_smoke_cpu_dry_run.json`` for
   the dry run): per rank, peak allocated bytes against the plan's predicted bytes for that device, and
   the loss check. Exit code 0 only when the losses agree.

The dry run takes the CPU path of every step (gloo, ``VmHWM`` for the peak memory, ``gpt2-tiny``).
``--worker`` and ``--reference`` are the rank side and the one-device side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _exact_fp32() -> None:
    """fp32 matmuls and convolutions in full precision on both sides (TF32 would make 1e-3 differences)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- cluster
def local_cluster(n: int, device: str) -> dict[str, Any]:
    """This machine's ``n`` devices as a one-host cluster (see step 1 of the module docstring)."""
    import torch

    from distplan.profiles import device_kinds

    if device == "cpu":
        return {
            "name": f"this-machine-cpu{n}",
            "hosts": [
                {
                    "name": "localhost",
                    "devices": [{"kind": "cpu-epyc-2core", "count": n}],
                    "link": {"bandwidth_gbyte_s": 5, "latency_us": 50},
                }
            ],
        }
    props = torch.cuda.get_device_properties(0)
    name = props.name.lower()
    family = [k for k in device_kinds().values() if k.name.split("-")[0] in name]
    if family:
        kind = min(family, key=lambda k: abs(k.memory_bytes - props.total_memory))
        kinds: list[dict[str, Any]] = []
        kind_name = kind.name
    else:
        kind_name = "this-gpu"
        kinds = [
            {
                "name": kind_name,
                "memory_bytes": int(props.total_memory),
                "memory_reserved_gib": 1,
                "memory_bandwidth_gbyte_s": 1000,  # placeholder: speed figures are not checked here
                "peak_tflops": {"fp32": 20},
                "efficiency": 0.5,
            }
        ]
    return {
        "name": f"this-machine-{n}gpu",
        "kinds": kinds,
        "hosts": [
            {
                "name": "localhost",
                "devices": [{"kind": kind_name, "count": n}],
                "link": {"bandwidth_gbyte_s": 100, "latency_us": 10},
            }
        ],
    }


def make_plan(model: str, n: int, device: str, *, seq: int, optimizer: str) -> Any:
    """2 parameter-balanced stages x dp n/2 (1 stage when n is 1), 1F1B, through the cost model."""
    from distplan.planner import evaluate
    from distplan.tracer import trace

    graph = trace(model, batch=1, seq=seq)
    stages = 2 if n >= 2 else 1
    dp = n // stages
    total = sum(x.param_bytes for x in graph.nodes)
    acc, cut = 0, len(graph.nodes)
    for i, x in enumerate(graph.nodes):
        acc += x.param_bytes
        if stages == 2 and acc >= total / 2:
            cut = i + 1
            break
    m = 4  # microbatches of dp samples: one sample per replica (the layout's size is over all replicas)
    if stages == 2:
        first = ",".join(str(d) for d in range(dp))
        second = ",".join(str(d) for d in range(dp, 2 * dp))
        layout = f"1f1b m{m}x{dp} | 0:{cut}@{first} | {cut}:{len(graph.nodes)}@{second}"
    else:
        layout = f"1f1b m{m}x1 | 0:{len(graph.nodes)}@0"
    return evaluate(
        graph, cluster=local_cluster(n, device), layout=layout, global_batch=m * dp, optimizer=optimizer
    )


# ---------------------------------------------------------------------------------------------- ranks
def worker(cfg_path: str) -> int:
    """One rank (under torch.distributed.run): lower, train, record into ``<dir>/rank<R>.json``."""
    cfg = json.loads(Path(cfg_path).read_text())
    import torch
    import torch.distributed as dist

    import distplan
    from distplan.plan import Plan

    _exact_fp32()
    plan = Plan.from_dict(cfg["plan"])
    device = cfg["device"]
    runner = distplan.lower(
        plan,
        cfg["model"],
        seq=cfg["seq"],
        optimizer=cfg["optimizer"],
        lr=cfg["lr"],
        device=device,
        timeout_s=cfg["timeout_s"],
        seed=cfg["seed"],
        init="reproducible",
    )
    after_lower = _peak_bytes(device)
    batch = runner.source.sample(plan.request.global_batch, seed=cfg["seed"] + 1)
    losses, times = [], []
    for _ in range(cfg["steps"]):
        losses.append(runner.train_step(batch.args, batch.target, batch.kwargs))
        times.append(runner.step_times().iteration_s)
    if device == "cuda":
        torch.cuda.synchronize()
    info = runner.rank_info
    stage = plan.stages[info.stages[0]]
    out = {
        "rank": info.rank,
        "stages": list(info.stages),
        "replica": info.replica,
        "device": info.device,
        "losses": losses,
        "iteration_s": times,
        "peak_bytes_after_lower": after_lower,
        "peak_bytes": _peak_bytes(device),
        "predicted_bytes": stage.memory_bytes,
        "param_bytes": sum(p.numel() * p.element_size() for p in runner.stage_parameters().values()),
    }
    Path(cfg["dir"], f"rank{info.rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
    return 0


def reference(cfg_path: str) -> int:
    """The same steps on one device: the whole model from the same reproducible initialisation."""
    cfg = json.loads(Path(cfg_path).read_text())
    import torch

    from distplan.lowering._model import resolve_source
    from distplan.lowering.init import initialize
    from distplan.lowering.runtime import _make_optimizer
    from distplan.plan import Plan
    from distplan.tracer import resolve_model

    _exact_fp32()
    plan = Plan.from_dict(cfg["plan"])
    dev = torch.device("cuda", 0) if cfg["device"] == "cuda" else torch.device("cpu")
    bundle = resolve_model(cfg["model"], batch=1, seq=cfg["seq"], device="meta", seed=cfg["seed"])
    initialize(bundle.module, seed=cfg["seed"])
    module = bundle.module.to(dev)
    source = resolve_source(bundle, batch=1, seq=cfg["seq"])
    batch = source.sample(plan.request.global_batch, seed=cfg["seed"] + 1)
    args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in batch.args]
    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.kwargs.items()}
    target = batch.target.to(dev)
    opt = _make_optimizer(cfg["optimizer"], list(module.parameters()), cfg["lr"])
    losses = []
    for _ in range(cfg["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = source.loss(source.select(module(*args, **kwargs)), target)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    Path(cfg["dir"], "reference.json").write_text(
        json.dumps({"losses": losses, "peak_bytes": _peak_bytes(cfg["device"])})
    )
    return 0


def _python(args: list[str], *, env: dict[str, str], timeout: float) -> None:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="model spec (default: gpt2 on GPUs, gpt2-tiny on CPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: 512 on GPUs, 32 on CPU)")
    p.add_argument("--steps", type=int, default=3, help="training steps (default: 3)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    p.add_argument("--cpu-ranks", type=int, default=0, help="dry run on this many CPU ranks instead of GPUs")
    p.add_argument("--optimizer", default="adam", help="optimizer (default: adam)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative loss tolerance (default: 1e-4)")
    p.add_argument("--timeout", type=float, default=600.0, help="limit of each run, s (default: 600)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON to write (default: benchmarks/results/gpu_smoke.json, gpu_smoke_cpu_dry_run.json on CPU)",
    )
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.reference:
        return reference(args.reference)

    import torch

    if args.cpu_ranks:
        device, n = "cpu", args.cpu_ranks
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: run with --dry-run (benchmarks/gpu_smoke.sh --dry-run)", file=sys.stderr)
            return 2
        device, n = "cuda", args.gpus or torch.cuda.device_count()
        if n > torch.cuda.device_count():
            print(f"--gpus {n}: this machine has {torch.cuda.device_count()} GPUs", file=sys.stderr)
            return 2
    model = args.model or ("gpt2" if device == "cuda" else "gpt2-tiny")
    seq = args.seq or (512 if device == "cuda" else 32)
    t0 = time.perf_counter()
    plan = make_plan(model, n, device, seq=seq, optimizer=args.optimizer)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
    with tempfile.TemporaryDirectory(prefix="distplan-gpu-smoke-") as tmp:
        cfg = {
            "dir": tmp,
            "plan": plan.to_dict(),
            "model": model,
            "seq": seq,
            "steps": args.steps,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "seed": 0,
            "device": device,
            "timeout_s": args.timeout,
        }
        cfg_path = Path(tmp, "config.json")
        cfg_path.write_text(json.dumps(cfg))
        script = str(Path(__file__).resolve())
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
        _python([*launch, script, "--worker", str(cfg_path)], env=env, timeout=args.timeout + 120)
        _python([script, "--reference", str(cfg_path)], env=env, timeout=args.timeout)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(n)]
        ref = json.loads(Path(tmp, "reference.json").read_text())
    losses = next(r["losses"] for r in ranks if r["losses"][0] is not None and r["replica"] == 0)
    errors = [abs(a - b) / abs(b) for a, b in zip(losses, ref["losses"], strict=True)]
    passed = max(errors) <= args.tol
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "backend": "nccl" if device == "cuda" else "gloo",
        "peak_memory_measure": "torch.cuda.max_memory_allocated" if device == "cuda" else "VmHWM (peak RSS)",
        "model": model,
        "seq": seq,
        "ranks": n,
        "layout": plan.layout,
        "optimizer": args.optimizer,
        "losses": losses,
        "reference_losses": ref["losses"],
        "max_rel_loss_error": max(errors),
        "tolerance": args.tol,
        "passed": passed,
        "predicted_iteration_s": plan.predictions.iteration_time_s,
        "rank_rows": ranks,
        "reference_peak_bytes": ref["peak_bytes"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out or RESULTS / ("gpu_smoke.json" if device == "cuda" else "gpu_smoke_cpu_dry_run.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    gib = 2**30
    print(f"{model} seq {seq} on {n} x {result['device']} ({result['backend']}): {plan.layout}")
    shown = ", ".join(f"{a:.6f}/{b:.6f}" for a, b in zip(losses, ref["losses"], strict=True))
    verdict = "PASSED" if passed else "FAILED"
    print(f"losses (plan/one device) {shown}: max rel error {max(errors):.2e} (tol {args.tol:g}) {verdict}")
    print(
        f"{'rank':>4} {'stage':>5} {'replica':>7} {'peak GiB':>9} {'predicted GiB':>13} {'ratio':>6} {'iter s':>7}"
    )
    for r in ranks:
        ratio = r["peak_bytes"] / r["predicted_bytes"] if r["predicted_bytes"] else float("nan")
        print(
            f"{r['rank']:>4} {r['stages'][0]:>5} {r['replica']:>7} {r['peak_bytes'] / gib:>9.2f} "
            f"{r['predicted_bytes'] / gib:>13.2f} {ratio:>6.2f} {r['iteration_s'][-1]:>7.3f}"
        )
    print(f"predicted iteration {plan.predictions.iteration_time_s:.3f} s; wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
