"""``distplan schedule``: replay a job set (trace file) on a cluster under a policy, print the metrics.

Imports no torch: graphs come from the job set (synthetic, OpGraph JSON files, or inline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

__all__ = ["register", "schedule_summary"]


def schedule_summary(result: Any) -> dict[str, Any]:
    """The JSON ``distplan schedule --json`` prints: the benchmark row's keys first (see
    ``distplan.scheduler.simulate`` [Note: metrics]), then extras, then per-job outcomes."""
    m = result.metrics()
    return {
        **m,
        "unfinished_jobs": [{"id": i, "reason": r} for i, r in result.unfinished],
        "jobs_detail": [o.to_dict() for o in result.outcomes],
    }


def register(app: typer.Typer) -> None:
    """Add ``schedule`` to the ``distplan`` app."""

    @app.command("schedule")
    def schedule_command(
        jobs: Path = typer.Argument(..., help="A job set / trace JSON file (see distplan.scheduler.model)."),
        cluster: str = typer.Option(..., "--cluster", help="Cluster preset name or YAML/JSON file."),
        policy: str = typer.Option(
            "distplan", "--policy", help="distplan, fifo, las, gavel or strict-priority (default: distplan)."
        ),
        objective: str = typer.Option(
            "jct",
            "--objective",
            help="distplan's objective: jct, throughput, max-min or finish-time (default: jct).",
        ),
        ageing_bound: float = typer.Option(
            14400.0, "--ageing-bound", help="distplan's ageing bound in seconds (default: 14400)."
        ),
        time_limit: float = typer.Option(
            5.0, "--time-limit", help="Planner time limit per device-set shape, seconds (default: 5)."
        ),
        price_cache: Path | None = typer.Option(
            None, "--price-cache", help="Read and write planner prices in this JSON file (default: none)."
        ),
        events_out: Path | None = typer.Option(
            None, "--events", help="Write the event log (every decision with reasons) here (default: none)."
        ),
        state_out: Path | None = typer.Option(
            None, "--state", help="Write the scheduler's final state JSON here (default: none)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
        emit: str | None = typer.Option(
            None,
            "--emit",
            help="Write the running jobs at --emit-at as manifests: k8s (Indexed Job) or slurm (sbatch) "
            "(default: none).",
        ),
        emit_dir: Path | None = typer.Option(
            None,
            "--emit-dir",
            help="Folder for the manifests, one file per job (default: none; required with --emit).",
        ),
        emit_at: float = typer.Option(
            0.0,
            "--emit-at",
            help="Simulated time (s) whose allocation is emitted: the last decision at or before it "
            "(default: 0; the first decision).",
        ),
        image: str = typer.Option(
            "distplan:latest",
            "--image",
            help="Container image of the k8s manifests (default: distplan:latest).",
        ),
    ) -> None:
        """Simulate a job set on a cluster under a scheduling policy and print JCT, waits and utilisation."""
        from distplan.presentation.cli_support import write_output
        from distplan.profiles import load_cluster
        from distplan.scheduler import JobSet, Pricer, make_policy, simulate
        from distplan.scheduler.model import SchedulerError

        if emit is not None and emit not in ("k8s", "slurm"):
            raise SchedulerError(f"--emit must be k8s or slurm, got {emit!r}")
        if (emit is None) != (emit_dir is None):
            raise SchedulerError("--emit and --emit-dir go together (a format and a folder)")
        if emit_at < 0:
            raise SchedulerError(f"--emit-at must be a time >= 0 s, got {emit_at:g}")
        if not jobs.exists():
            raise SchedulerError(f"job set file {str(jobs)!r} does not exist")
        js = JobSet.load(jobs)
        c = load_cluster(cluster)
        params: dict[str, Any] = {}
        if policy == "distplan":
            params = {"objective": objective, "ageing_bound_s": ageing_bound}
        elif objective != "jct" or ageing_bound != 14400.0:
            raise SchedulerError("--objective and --ageing-bound apply to --policy distplan only")
        pol = make_policy(policy, **params)
        pricer = Pricer(c, time_limit_s=time_limit, cache_path=price_cache)
        snapshot: list[Any] = []

        def capture(sched: Any, decision: Any) -> None:
            # Keep the running jobs of the last decision at or before --emit-at.
            if emit is not None and decision.time_s <= emit_at:
                snapshot[:] = [_running_jobs(sched)]

        result = simulate(js, c, pol, pricer=pricer, base_dir=jobs.parent, observe=capture)
        if price_cache is not None:
            pricer.save()
        sched = result.scheduler
        assert sched is not None
        if events_out is not None:
            write_output(events_out, json.dumps({"events": [e.to_dict() for e in sched.events]}, indent=1))
        if state_out is not None:
            write_output(state_out, json.dumps(sched.to_dict()))
        summary = schedule_summary(result)
        if emit is not None and emit_dir is not None:
            running = snapshot[0] if snapshot else []
            summary["manifests"] = _emit(running, emit, emit_dir, image=image)
        if json_out:
            typer.echo(json.dumps(summary, indent=1))
            return
        _print(summary)


def _running_jobs(sched: Any) -> list[dict[str, Any]]:
    """What a manifest of each running job needs, taken at a decision: its spec, its plan on its devices,
    steps left, whether it resumes from a checkpoint, its graph's sequence length."""
    out = []
    for rec in sched.jobs.values():
        if not rec.running:
            continue
        spec = rec.spec
        graph = sched.graphs[spec.graph]
        done = int(rec.samples_done // spec.global_batch)
        seq = graph.meta.get("seq")
        out.append(
            {
                "spec": spec,
                "plan": sched.plan(spec.id),
                # Open-ended jobs (no declared steps) run until the scheduler stops them.
                "steps": None if spec.total_steps is None else spec.total_steps - done,
                "resume": rec.has_checkpoint,
                "seq": seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
            }
        )
    return out


def _emit(running: list[dict[str, Any]], fmt: str, folder: Path, *, image: str) -> list[str]:
    """Write one manifest per running job (see ``distplan.presentation.manifests``); the files written."""
    from distplan.lowering.launcher import host_commands, scheduled_train_args
    from distplan.presentation.cli_support import write_output
    from distplan.presentation.manifests import RDZV, ManifestJob, render_manifest

    written = []
    for r in running:
        spec = r["spec"]
        # The job set names graphs, not model code: the graph's key is the train.py --model spec.
        args = scheduled_train_args(
            spec.graph,
            job_id=spec.id,
            steps_left=r["steps"],
            seq=r["seq"] or 512,
            optimizer=spec.optimizer,
            resume=r["resume"],
        )
        hosts = host_commands(r["plan"], args=args, endpoint=RDZV)
        job = ManifestJob.from_plan(r["plan"], hosts, job_id=spec.id, priority=spec.priority, image=image)
        path = folder / f"{job.name}.{'yaml' if fmt == 'k8s' else 'sbatch'}"
        write_output(path, render_manifest(job, fmt))
        written.append(str(path))
    return written


def _print(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"{s['trace']} on {s['cluster']} under {s['policy']}")
    for col in ("job", "priority", "arrival s", "first start s", "finish s", "JCT s", "wait s", "preempted"):
        t.add_column(col)

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    for o in s["jobs_detail"]:
        t.add_row(
            o["id"],
            o["priority"],
            f(o["arrival_s"]),
            f(o["first_start_s"]),
            f(o["finish_s"]),
            f(o["jct_s"]),
            f(o["wait_s"]),
            str(o["preemptions"]),
        )
    con.print(t)
    con.print(
        f"average JCT {s['avg_jct_s']:.0f} s, p99 {s['p99_jct_s']:.0f} s; makespan {s['makespan_s']:.0f} s; "
        f"utilisation {s['utilisation']:.0%}; high-priority p99 wait {s['high_priority_p99_wait_s']:.0f} s; "
        f"max wait {s['max_wait_s']:.0f} s; {s['preemptions']} preemptions"
    )
    con.print(
        f"{s['decisions']} decisions: p50 {s['decision_p50_s'] * 1e3:.0f} ms, p99 {s['decision_p99_s'] * 1e3:.0f} ms, "
        f"max {s['decision_max_s'] * 1e3:.0f} ms; shapes priced at submission: {s['submit_planner_calls']} planner "
        f"calls, {s['submit_pricing_total_s']:.1f} s in all, at most {s['submit_pricing_max_s']:.1f} s per job"
    )
    for u in s["unfinished_jobs"]:
        con.print(f"[yellow]unfinished[/yellow] {u['id']}: {u['reason']}")
    for m in s.get("manifests", []):
        con.print(f"manifest written: {m}")
