"""Validation wall time by number of rank processes on this machine, and the large-model policy.

    python benchmarks/validate_speed.py [--quick]

Cases: gpt-tiny as a pipeline of 2, 4 and 8 stages (one process per stage), gpt-tiny on 2 stages x dp 8
(16 processes, run at full rank count with ``max_ranks=16``), and a GPT-2 XL plan for 16 GPUs (2 stages x dp 8,
planned by the real solver on ``a100x8-v100x8``) validated with the default policy: width-reduced (hidden
64) and dp reduced to 1, i.e. 2 processes. Prints a table and writes
``benchmarks/results/validate_speed.json``. Goal (issue 4): a failing rank is reported in < 30 s; a
16-GPU plan of a large model validates here in minutes, not hours.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distplan.lowering import validate
from distplan.plan import GraphRef, Plan, PlanRequest, Stage, build_rank_map
from distplan.planner import plan as make_plan
from distplan.profiles import load_cluster
from distplan.tracer import trace

RESULTS = Path(__file__).resolve().parent / "results"


def pipeline_plan(spec: str, stages: int, dp: int, *, microbatches: int | None = None) -> Plan:
    g = trace(spec, batch=1, seq=16)
    microbatches = microbatches or max(4, stages)  # 1F1B needs at least one microbatch per stage
    c = load_cluster("a100x8-v100x8")
    n = len(g)
    bounds = [n * k // stages for k in range(stages + 1)]
    st = tuple(
        Stage(
            i, bounds[i], bounds[i + 1], tuple(range(i * dp, (i + 1) * dp)), c.devices()[i * dp].kind, dp=dp
        )
        for i in range(stages)
    )
    req = PlanRequest(c, global_batch=microbatches * dp)
    return Plan(req, GraphRef.of(g), st, microbatches, dp, "1f1b", build_rank_map(c, [s.devices for s in st]))


def row(name: str, report, extra: dict | None = None) -> dict:  # type: ignore[no-untyped-def]
    d = report.to_dict()
    return {
        "case": name,
        "passed": d["passed"],
        "ranks": d["ranks"],
        "width_reduced": d["width_reduced"],
        "dp_reduced": d["dp_reduced"],
        "seconds": d["seconds"],
        **{k: v for k, v in d["timings"].items()},
        "max_rel_error": d["max_rel_error"],
        "error": d["error"],
        **(extra or {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the 16-process and GPT-2 XL cases")
    args = ap.parse_args()
    rows = []
    for stages in (2, 4, 8):
        p = pipeline_plan("gpt-tiny", stages, 1)
        rows.append(row(f"gpt-tiny {stages} stages", validate(p, "gpt-tiny", max_ranks=16)))
        print(rows[-1], flush=True)
    p = pipeline_plan("gpt-tiny", 2, 1)
    rows.append(row("gpt-tiny 2 stages, rank 1 killed", validate(p, "gpt-tiny", inject_fault="kill:1")))
    print(rows[-1], flush=True)
    if not args.quick:
        p = pipeline_plan("gpt-tiny", 2, 8)
        rows.append(
            row("gpt-tiny 2 stages x dp 8 (all 16)", validate(p, "gpt-tiny", max_ranks=16, timeout_s=600))
        )
        print(rows[-1], flush=True)
        t0 = time.perf_counter()
        g = trace("gpt2-xl", batch=1, seq=1024)
        xl = make_plan(g, cluster="a100x8-v100x8", global_batch=64, time_limit_s=10)
        plan_s = time.perf_counter() - t0
        rows.append(
            row(
                f"gpt2-xl 16-GPU plan ({xl.layout.split(' | ')[0]}, {xl.num_stages} stages x dp {xl.dp})",
                validate(xl, "gpt2-xl", timeout_s=600),
                {"trace_and_plan_s": round(plan_s, 1)},
            )
        )
        print(rows[-1], flush=True)
    print()
    print(
        f"{'case':58} {'ranks':>5} {'width':>8} {'dp->1':>5} {'total s':>8} {'prep s':>7} {'ranks s':>8} {'passed':>7}"
    )
    for r in rows:
        print(
            f"{r['case']:58} {r['ranks']:5d} {('reduced' if r['width_reduced'] else 'full'):>8} "
            f"{('yes' if r['dp_reduced'] else 'no'):>5} {r['seconds']:8.1f} {r.get('prepare_s', 0):7.1f} "
            f"{r.get('ranks_s', 0):8.1f} {r['passed']!s:>7}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "validate_speed.json").write_text(json.dumps({"rows": rows}, indent=1))
    print(f"\nwrote {RESULTS / 'validate_speed.json'}")


if __name__ == "__main__":
    main()
