"""Peak memory of each CPU rank of a lowered plan, beside what its stage must hold.

    python benchmarks/rank_memory.py [--model gpt2-xl] [--ranks 4] [--steps 2] [--out FILE]

The model (default GPT-2 XL, 1.56B parameters: 6.2 GB in fp32, so 4 ranks each holding a full copy need
25 GB, more than this 24 GiB machine) is traced on ``meta`` and cut into ``--ranks`` pipeline stages of
about equal parameter bytes (a fixed layout through the planner's cost model, which also predicts each
device's memory). Each rank runs ``distplan.lower`` (the model built on ``meta``, only its stage
materialised from the reproducible initialisation) and ``--steps`` training steps with plain SGD (no
optimizer state: parameters + gradients of the largest stage are ~3.3 GB, so four ranks fit beside the
runtime; Adam's two moments would double that). Each rank records its peak RSS (``VmHWM``) and its stage's
parameter, gradient and optimizer-state bytes (measured on its tensors after the last step).

The fixed runtime overhead (Python, torch, gloo, the captured graph and its split, the schedule, activations
of one microbatch) is measured, not assumed: the same ranks run the same plan on the same architecture with
every hidden size cut to 64 (``--overhead-width``; same layers, graph, cut positions), and a rank's overhead
is its peak RSS there minus the state it held. The check, per rank::

    peak RSS <= 1.5 x (parameter + gradient + optimizer bytes) + overhead

Writes one JSON file (default ``benchmarks/results/rank_memory.json``) and prints a table; exits 1 if a
rank breaks the bound. ``--worker`` is the rank side (started through ``torch.distributed.run``).
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


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ---------------------------------------------------------------------------------------------- rank side
def worker(config_path: str) -> int:
    """One rank: lower, train, record memory into ``<dir>/rank<R>.json``."""
    cfg = json.loads(Path(config_path).read_text())
    import torch
    import torch.distributed as dist

    import distplan
    from distplan.graph import OpGraph
    from distplan.plan import Plan

    torch.set_num_threads(1)
    rss_imported = _status_bytes("VmRSS")
    plan = Plan.from_dict(cfg["plan"])
    graph = OpGraph.load(cfg["graph"])
    model: Any = cfg["model"]
    if cfg["reduced"]:
        # The overhead run: the same layers and graph at a tiny width (a CPU build of a few MB).
        from distplan.tracer import resolve_model

        full = resolve_model(model, batch=plan.replica_microbatch(0), seq=cfg["seq"], device="meta")
        model = full.width_reduced(max_hidden=cfg["reduced"])
    t0 = time.perf_counter()
    runner = distplan.lower(
        plan,
        model,
        seq=cfg["seq"],
        graph=None if cfg["reduced"] else graph,
        check_graph=not cfg["reduced"],  # the reduced copy has the full model's structure but other sizes
        optimizer=cfg["optimizer"],
        lr=cfg["lr"],
        device="cpu",
        timeout_s=cfg["timeout_s"],
    )
    t_lower = time.perf_counter() - t0
    rss_lowered = _status_bytes("VmRSS")
    batch = runner.source.sample(plan.request.global_batch, seed=1)
    losses = []
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        losses.append(runner.train_step(batch.args, batch.target, batch.kwargs))
    t_steps = time.perf_counter() - t0
    params = runner.stage_parameters()
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    optim_bytes = 0
    if runner.optimizer is not None:
        for st in runner.optimizer.state.values():
            optim_bytes += sum(
                v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor)
            )
    buffer_bytes = sum(b.numel() * b.element_size() for b in runner.stage_buffers().values())
    info = runner.rank_info
    out = {
        "rank": info.rank,
        "stages": list(info.stages),
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optim_bytes": optim_bytes,
        "buffer_bytes": buffer_bytes,
        "params": sum(p.numel() for p in params.values()),
        "rss_imported_bytes": rss_imported,
        "rss_lowered_bytes": rss_lowered,
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "predicted_bytes": plan.stages[info.stages[0]].memory_bytes,
        "losses": losses,
        "lower_s": round(t_lower, 2),
        "steps_s": round(t_steps, 2),
    }
    Path(cfg["dir"], f"rank{info.rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------- parent
def balanced_layout(graph: Any, stages: int, microbatches: int) -> str:
    """A 1F1B layout with ``stages`` stages of about equal parameter bytes, one rank each."""
    total = sum(n.param_bytes for n in graph.nodes)
    cuts: list[int] = []
    acc = 0
    for i, n in enumerate(graph.nodes):
        acc += n.param_bytes
        if len(cuts) < stages - 1 and acc >= total * (len(cuts) + 1) / stages:
            cuts.append(i + 1)
    bounds = [0, *cuts, len(graph.nodes)]
    parts = [f"{bounds[s]}:{bounds[s + 1]}@{s}" for s in range(stages)]
    return f"1f1b m{microbatches}x1 | " + " | ".join(parts)


def make_plan(model: str, *, ranks: int, seq: int, optimizer: str) -> tuple[Any, Any]:
    """The traced graph and a plan of ``ranks`` parameter-balanced stages on ``cpu-local``."""
    from distplan.planner import evaluate
    from distplan.tracer import trace

    graph = trace(model, batch=1, seq=seq)
    plan = evaluate(
        graph,
        cluster="cpu-local",
        layout=balanced_layout(graph, ranks, max(ranks, 4)),
        global_batch=max(ranks, 4),
        optimizer=optimizer,
    )
    return graph, plan


def run(
    model: str,
    graph: Any,
    plan: Any,
    *,
    steps: int,
    seq: int,
    optimizer: str,
    reduced: int | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Run ``plan`` on its CPU ranks (the width-``reduced`` copy when given); per-rank records."""
    ranks = plan.world_size
    with tempfile.TemporaryDirectory(prefix="distplan-rankmem-") as tmp:
        d = Path(tmp)
        graph.save(d / "graph.json")
        cfg = {
            "dir": tmp,
            "plan": plan.to_dict(),
            "graph": str(d / "graph.json"),
            "model": model,
            "reduced": reduced,
            "seq": seq,
            "steps": steps,
            "optimizer": optimizer,
            "lr": 1e-4,
            "timeout_s": timeout_s,
        }
        (d / "config.json").write_text(json.dumps(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            str(Path(__file__).resolve()),
            "--worker",
            str(d / "config.json"),
        ]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 120, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"ranks failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        rows = [json.loads((d / f"rank{k}.json").read_text()) for k in range(ranks)]
    return {"reduced": reduced, "wall_s": round(wall, 1), "ranks": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="gpt2-xl", help="model spec (default: gpt2-xl)")
    p.add_argument("--ranks", type=int, default=4, help="CPU ranks = pipeline stages (default: 4)")
    p.add_argument("--steps", type=int, default=2, help="training steps (default: 2)")
    p.add_argument("--seq", type=int, default=16, help="sequence length (default: 16)")
    p.add_argument("--optimizer", default="sgd", help="optimizer (default: sgd, no state)")
    p.add_argument(
        "--overhead-width", type=int, default=64, help="hidden size of the overhead run (default: 64)"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="limit of each run, s (default: 900)")
    p.add_argument("--out", default=str(RESULTS / "rank_memory.json"), help="JSON to write")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    graph, plan = make_plan(args.model, ranks=args.ranks, seq=args.seq, optimizer=args.optimizer)
    common = {"steps": args.steps, "seq": args.seq, "optimizer": args.optimizer, "timeout_s": args.timeout}
    small = run(args.model, graph, plan, reduced=args.overhead_width, **common)
    full = run(args.model, graph, plan, reduced=None, **common)
    ok = True
    rows = []
    for s, f in zip(small["ranks"], full["ranks"], strict=True):
        overhead = s["peak_rss_bytes"] - (s["param_bytes"] + s["grad_bytes"] + s["optim_bytes"])
        state = f["param_bytes"] + f["grad_bytes"] + f["optim_bytes"]
        bound = 1.5 * state + overhead
        passed = f["peak_rss_bytes"] <= bound
        ok &= passed
        rows.append({**f, "overhead_bytes": overhead, "bound_bytes": int(bound), "within_bound": passed})
    full_copy = graph.param_bytes  # the whole model's parameters (tied weights once), fp32
    try:
        machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        machine = 0
    result = {
        "model": args.model,
        "ranks": args.ranks,
        "optimizer": args.optimizer,
        "steps": args.steps,
        "seq": args.seq,
        "layout": plan.layout,
        "machine_memory_bytes": machine,
        "params": graph.num_params,
        "full_fp32_copy_bytes": full_copy,
        "full_copies_on_all_ranks_bytes": full_copy * args.ranks,
        "overhead_run": {"hidden_size": args.overhead_width, "ranks": small["ranks"]},
        "rule": "peak RSS <= 1.5 x (param + grad + optimizer bytes) + overhead (narrow run's peak RSS - its state)",
        "rank_rows": rows,
        "passed": ok,
        "wall_s": {"overhead_run": small["wall_s"], "full_run": full["wall_s"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    gib = 2**30
    print(f"{args.model} on {args.ranks} CPU ranks ({plan.layout}), {args.optimizer}, {args.steps} steps")
    print(f"whole model fp32: {full_copy / gib:.2f} GiB per copy; machine: {machine / gib:.1f} GiB")
    print(
        f"{'rank':>4} {'params GiB':>10} {'grads GiB':>9} {'optim GiB':>9} {'overhead GiB':>12} "
        f"{'peak RSS GiB':>12} {'bound GiB':>9} {'plan GiB':>8}  ok"
    )
    for r in rows:
        print(
            f"{r['rank']:>4} {r['param_bytes'] / gib:>10.2f} {r['grad_bytes'] / gib:>9.2f} "
            f"{r['optim_bytes'] / gib:>9.2f} {r['overhead_bytes'] / gib:>12.2f} {r['peak_rss_bytes'] / gib:>12.2f} "
            f"{r['bound_bytes'] / gib:>9.2f} {r['predicted_bytes'] / gib:>8.2f}  {'yes' if r['within_bound'] else 'NO'}"
        )
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
