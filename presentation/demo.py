"""The main job: the whole pipeline on a built-in default, with a summary a newcomer can read.

    >>> from distplan.presentation.demo import run_demo, summary_dict     # doctest: +SKIP
    >>> result = run_demo(model="gpt2", cluster="a100x8-v100x8")   # doctest: +SKIP
    >>> summary_dict(result)["validation"]["passed"]               # doctest: +SKIP
    True

Steps: **trace** a real built-in model on the meta device, **plan** it with the CP-SAT planner on a mixed
cluster preset, **simulate** one iteration, **validate** the lowered plan for real on this machine's CPU
(gloo; on a width-reduced copy when the model or plan is too big for the CPU, which the validation decides
and reports), then summarise: plan table, predicted iteration time, speed-up over the equal-split baseline
and over the best baseline, the validation verdict. ``distplan demo`` is its CLI (:mod:`.demo_cli`).

With the command modules, the only part of this package that runs the pipeline (tracer, planner, lowering);
it imports them inside :func:`run_demo`, so the rest of the package, and the CLI's start-up, need nothing
but distplan's core.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distplan.errors import DistplanError
from distplan.graph import OpGraph
from distplan.plan import Plan
from distplan.presentation.formatting import format_seconds
from distplan.presentation.report import best_baseline, equal_split_speedup
from distplan.timeline import Timeline

__all__ = [
    "DEFAULT_CLUSTER",
    "DEFAULT_GLOBAL_BATCH",
    "DEFAULT_MODEL",
    "DEFAULT_SEQ",
    "DEFAULT_TIME_LIMIT_S",
    "VALIDATION_TIMEOUT_S",
    "DemoResult",
    "run_demo",
    "summary_dict",
    "summary_lines",
]

#: The built-in default: GPT-2 (124M, Hugging Face's architecture) on 4 A100-80G + 4 T4-16G, two device
#: kinds several times apart in speed and memory, where an even split wastes the A100s. Eight devices keep
#: the CPU validation (one process per rank) within the minute the whole demo should take here.
DEFAULT_MODEL = "gpt2"
DEFAULT_CLUSTER = "a100x4-t4x4"
DEFAULT_GLOBAL_BATCH = 64
DEFAULT_SEQ = 1024
DEFAULT_TIME_LIMIT_S = 5.0
#: Limit of the whole CPU validation run (and of each collective in it): generous for a loaded 2-core
#: machine, still far below gloo's 30-minute default should a rank hang.
VALIDATION_TIMEOUT_S = 240.0

Progress = Callable[[Any], None]


class _PhaseCallback:
    """What :func:`run_demo` reports to: ``phase(title)`` when a step starts, ``__call__(event)`` for the
    step's own progress events (solver and validation)."""

    def __init__(self, progress: Any | None) -> None:
        self._p = progress

    def phase(self, title: str) -> None:
        if self._p is None:
            return
        set_title = getattr(self._p, "set_title", None)
        if callable(set_title):
            set_title(title)
        else:
            self._p(title)

    def __call__(self, event: Any) -> None:
        if self._p is not None:
            self._p(event)


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Everything the demo made. ``validation`` is the lowering's ``ValidationReport`` (``None`` when
    validation was not asked for); ``seconds`` is the wall time of each step."""

    model: str
    cluster: str
    graph: OpGraph
    plan: Plan
    timeline: Timeline | None
    validation: Any | None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """The validation verdict, or ``None`` when there was no validation."""
        return None if self.validation is None else bool(self.validation.passed)


def run_demo(
    *,
    model: str = DEFAULT_MODEL,
    cluster: str = DEFAULT_CLUSTER,
    global_batch: int = DEFAULT_GLOBAL_BATCH,
    seq: int = DEFAULT_SEQ,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    validate: bool = True,
    steps: int = 1,
    progress: Any | None = None,
    inject_fault: str | None = None,
) -> DemoResult:
    """Trace, plan, simulate and validate ``model`` on ``cluster`` (a preset name or a YAML file).

    ``progress`` receives each step's progress events (a :class:`distplan.presentation.progress.ProgressLine` fits).
    ``inject_fault`` is passed to the validation (a testing aid: ``"raise:R"`` makes rank R fail).
    Raises the pipeline's own :class:`~distplan.errors.DistplanError` subclasses on bad input; a failed
    validation is *returned* (``result.passed is False``), not raised, so the caller can show it.
    """
    from distplan.limits import REQUEST_RANGES
    from distplan.request import as_request

    # The request (and the trace size) is checked before anything heavy is loaded: a bad value fails at
    # once, naming its field (see [Note: the request spine] in distplan.request).
    request = as_request(cluster=cluster, global_batch=global_batch, time_limit_s=time_limit_s)
    REQUEST_RANGES["seq"].check("seq", seq)
    if steps < 1:
        raise DistplanError(f"--steps must be >= 1, got {steps}")
    from distplan.planner import plan as make_plan
    from distplan.planner import simulate
    from distplan.tracer import trace  # loads torch

    cb = _PhaseCallback(progress)
    seconds: dict[str, float] = {}
    the_cluster = request.cluster

    cb.phase(f"tracing {model} (seq {seq}) on the meta device")
    t0 = time.perf_counter()
    graph = trace(model, batch=1, seq=seq)
    seconds["trace"] = time.perf_counter() - t0

    cb.phase(f"planning on {the_cluster.name} ({the_cluster.num_devices} devices)")
    t0 = time.perf_counter()
    plan = make_plan(graph, request, progress=cb)
    seconds["plan"] = time.perf_counter() - t0

    cb.phase("simulating one iteration")
    t0 = time.perf_counter()
    timeline = simulate(plan, graph)
    seconds["simulate"] = time.perf_counter() - t0

    report = None
    if validate:
        from distplan.lowering import validate as run_validation

        cb.phase(f"validating on CPU ({plan.world_size} ranks planned)")
        t0 = time.perf_counter()
        report = run_validation(
            plan, model, steps=steps, timeout_s=VALIDATION_TIMEOUT_S, progress=cb, inject_fault=inject_fault
        )
        seconds["validate"] = time.perf_counter() - t0
    return DemoResult(model, the_cluster.name, graph, plan, timeline, report, seconds)


# ---------------------------------------------------------------------------------------------- summary
def _validation_dict(report: Any) -> dict[str, Any]:
    to_dict = getattr(report, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {"passed": bool(report.passed)}


def summary_dict(result: DemoResult) -> dict[str, Any]:
    """The demo's machine-readable summary (what ``distplan demo --json`` prints)."""
    plan, graph = result.plan, result.graph
    eq = equal_split_speedup(plan)
    best = best_baseline(plan)
    return {
        "model": result.model,
        "cluster": result.cluster,
        "graph": {
            "name": graph.name,
            "num_nodes": len(graph.nodes),
            "num_params": graph.num_params,
            "param_bytes": graph.param_bytes,
            "fwd_flops": graph.fwd_flops,
        },
        "layout": plan.layout,
        "predicted_iteration_time_s": plan.predictions.iteration_time_s,
        "throughput_samples_s": plan.predictions.throughput_samples_s,
        "equal_split_baseline": None if eq is None else eq.name,
        "speedup_vs_equal_split": None if eq is None else eq.speedup,
        "best_baseline": None if best is None else best.name,
        "speedup_vs_best_baseline": None if best is None else best.speedup,
        "baselines": dict(plan.baselines),
        "solver": plan.solver.to_dict(),
        "plan": plan.to_dict(),
        "validation": None if result.validation is None else _validation_dict(result.validation),
        "passed": result.passed,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }


def _validation_line(report: Any) -> str:
    d = _validation_dict(report)
    verdict = "PASSED" if d.get("passed") else "FAILED"
    bits = []
    if d.get("ranks") is not None:
        bits.append(f"{d['ranks']} CPU rank{'s' if d['ranks'] != 1 else ''} (gloo)")
    if d.get("steps") is not None:
        bits.append(f"{d['steps']} training step{'s' if d['steps'] != 1 else ''}")
    if d.get("width_reduced"):
        bits.append("width-reduced copy (same layers and cut points)")
    if d.get("dp_reduced"):
        bits.append("one replica per stage")
    errs = []
    if d.get("max_abs_error") is not None:
        errs.append(f"max abs error {d['max_abs_error']:.2g}")
    if d.get("max_rel_error") is not None:
        errs.append(f"max rel error {d['max_rel_error']:.2g}")
    tol = d.get("tolerance")
    names = {"loss": "loss", "grad": "gradients", "param": "parameters"}
    if isinstance(tol, (int, float)):
        errs.append(f"relative tolerance {tol:.0e}")
    elif isinstance(tol, dict) and tol:
        parts = [f"{names.get(k, k)} {v:.0e}" for k, v in tol.items() if isinstance(v, (int, float))]
        errs.append("relative tolerance: " + ", ".join(parts))
    line = f"Validation: {verdict}"
    if bits:
        line += " — " + ", ".join(bits)
    if errs:
        line += "; vs one device: " + ", ".join(errs)
    if not d.get("passed") and d.get("error"):
        line += f"\n  error: {d['error']}"
    return line


def summary_lines(result: DemoResult) -> list[str]:
    """The human summary after the table: predicted time, speed-ups, validation verdict (plain text)."""
    plan = result.plan
    p = plan.predictions
    lines = [
        f"Predicted iteration time: {format_seconds(p.iteration_time_s)} "
        f"({p.throughput_samples_s:,.1f} samples/s, global batch {plan.request.global_batch}, "
        f"pipeline bubble {p.bubble_fraction * 100:.0f}%)"
    ]
    eq = equal_split_speedup(plan)
    if eq is None:
        lines.append("Speed-up over equal split: - (the planner reported no equal-split baseline)")
    elif eq.speedup is None:
        lines.append(
            f"Speed-up over equal split: the equal split ({eq.name}) does not fit in memory; this plan does"
        )
    else:
        lines.append(
            f"Speed-up over equal split: {eq.speedup:.2f}x (equal layers per device: "
            f"{format_seconds(eq.iteration_time_s)} per iteration)"
        )
    best = best_baseline(plan)
    if best is not None and best.speedup is not None:
        lines.append(
            f"Speed-up over the best baseline: {best.speedup:.2f}x ({best.name}: {format_seconds(best.iteration_time_s)})"
        )
    if result.validation is not None:
        lines.append(_validation_line(result.validation))
    else:
        lines.append("Validation: not run (--no-validate)")
    return lines
