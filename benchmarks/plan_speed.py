"""Planning time as the cluster grows (8..128 devices) and as the graph grows (12..80 layers).

    python benchmarks/plan_speed.py [--time-limit 10]

Tracing is excluded (graphs are cached by ``_graphs.load``; the layer sweep uses torch-free synthetic
Llama-shaped graphs of the given depth). Prints a table and writes ``benchmarks/results/plan_speed.json``.
Goal (issue 3): Llama-7B on 64 mixed GPUs planned in under 10 s, growth near-linear in devices.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _graphs import load

from distplan.planner import plan
from distplan.planner.synthetic import synthetic_transformer
from distplan.profiles import load_cluster

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("h100-sxm-80g", "a100-sxm-80g", "v100-sxm2-32g")


def mixed_cluster(devices: int) -> dict:
    """``devices / 8`` hosts of 8 GPUs, kinds cycling H100, A100, V100; 100 Gb/s between hosts."""
    links = {"h100-sxm-80g": 450, "a100-sxm-80g": 300, "v100-sxm2-32g": 150}
    hosts = []
    for h in range(max(1, devices // 8)):
        kind = KINDS[h % len(KINDS)]
        hosts.append(
            {
                "name": f"host{h}",
                "devices": [{"kind": kind, "count": min(8, devices)}],
                "link": {"bandwidth_gbyte_s": links[kind], "latency_us": 5},
            }
        )
    return {
        "name": f"mixed-{devices}",
        "hosts": hosts,
        "network": {"bandwidth_gbit_s": 100, "latency_us": 20},
    }


def run(graph, cluster, *, global_batch: int, time_limit: float, workers: int) -> dict:
    t0 = time.perf_counter()
    p = plan(
        graph,
        cluster=cluster,
        global_batch=global_batch,
        dtype="bf16",
        time_limit_s=time_limit,
        workers=workers,
        baselines=False,
    )
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "iteration_time_s": p.predictions.iteration_time_s,
        "gap": p.solver.gap,
        "status": p.solver.status,
        "num_stages": p.num_stages,
        "dp": p.dp,
        "notes": list(p.solver.notes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    rows = []
    llama, source = load("llama-7b", 2048)
    print(f"device sweep: llama-7b ({source}, {len(llama.nodes)} nodes), bf16, global batch 256")
    for n in (8, 16, 32, 64, 128):
        r = run(
            llama,
            load_cluster(mixed_cluster(n)),
            global_batch=256,
            time_limit=args.time_limit,
            workers=args.workers,
        )
        r.update(sweep="devices", devices=n, layers=32, cluster=f"mixed-{n}")
        rows.append(r)
        print(
            f"  {n:4d} devices: {r['wall_s']:6.2f} s  gap {r['gap']:6.1%}  {r['num_stages']} stages x dp {r['dp']}",
            flush=True,
        )
    r = run(llama, "mixed-64", global_batch=256, time_limit=args.time_limit, workers=args.workers)
    r.update(sweep="goal", devices=64, layers=32, cluster="mixed-64")
    rows.append(r)
    goal = "met" if r["wall_s"] < 10 else "NOT met"
    print(
        f"goal: llama-7b on the mixed-64 preset planned in {r['wall_s']:.2f} s (< 10 s: {goal}), gap {r['gap']:.1%}"
    )
    print("layer sweep: synthetic Llama-7B-wide graphs (hidden 4096), mixed-32, bf16, global batch 128")
    c32 = load_cluster(mixed_cluster(32))
    for layers in (12, 24, 32, 48, 64, 80):
        g = synthetic_transformer(layers=layers, hidden=4096, heads=32, ffn=11008, vocab=32000, seq=2048)
        r = run(g, c32, global_batch=128, time_limit=args.time_limit, workers=args.workers)
        r.update(sweep="layers", devices=32, layers=layers, cluster="mixed-32", nodes=len(g.nodes))
        rows.append(r)
        print(
            f"  {layers:3d} layers ({len(g.nodes)} nodes): {r['wall_s']:6.2f} s  gap {r['gap']:6.1%}",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "plan_speed.json"
    out.write_text(json.dumps({"time_limit_s": args.time_limit, "rows": rows}, indent=1))
    print(
        f"\n{'sweep':8s} {'devices':>7s} {'layers':>6s} {'wall s':>7s} {'gap':>6s} {'stages':>6s} {'dp':>3s}"
    )
    for r in rows:
        print(
            f"{r['sweep']:8s} {r['devices']:7d} {r['layers']:6d} {r['wall_s']:7.2f} {r['gap']:6.1%} "
            f"{r['num_stages']:6d} {r['dp']:3d}"
        )
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
