"""The plan report: one self-contained HTML page (inline CSS, JS and SVG; nothing fetched from the network).

    >>> from distplan.presentation.report import render_report          # doctest: +SKIP
    >>> html = render_report(plan, graph=graph, timeline=timeline)       # doctest: +SKIP

The page has these parts, each drawn from plain plan data:

- a summary (predicted iteration time, throughput, bubble, speed-up over the equal-split baseline and
  over the best baseline, devices used);
- the **cluster**: hosts as boxes, devices as tiles coloured by the stage they run (unused devices grey),
  each with a memory bar against the device's usable capacity;
- the **stages**: per stage its devices, modules, a time bar (forward + backward of one microbatch, against
  the bottleneck stage) and a memory bar (against the device kind's usable memory);
- the **model**: its modules in graph order, coloured by stage (widths by compute when a graph is given);
- the **timeline**: the simulated iteration as inline SVG (:mod:`distplan.presentation.pictures`);
- the **baselines** the planner compared against, and the **solver** report.

[Note: report page]
:func:`report_page` decides what the page shows (numbers already formatted, fractions, colours) as plain
records; the Jinja2 template ``templates/report.html`` (with ``report.css``, ``report.js`` and the shared
``timeline.svg``) only marks them up, and escapes every value (autoescaping), so a module or cluster name
can never inject markup. Every element that belongs to a stage carries ``data-stage="<index>"`` and every
device tile ``data-device="<index>"``, so the page can be checked (and highlighted on hover) by stage and
device. Colours: [Note: report colours] in :mod:`distplan.presentation.colours`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distplan.graph import OpGraph
from distplan.plan import Plan
from distplan.presentation._jinja import environment
from distplan.presentation.colours import STAGE_COLOURS, stage_colour, tint
from distplan.presentation.formatting import (
    device_ranges,
    format_bytes,
    format_degrees,
    format_flops,
    format_seconds,
    layer_summary,
    short_module,
)
from distplan.presentation.pictures import TimelineDrawing, timeline_drawing
from distplan.timeline import Timeline

__all__ = [
    "BaselineRow",
    "ModuleRun",
    "ReportPage",
    "baseline_rows",
    "best_baseline",
    "equal_split_speedup",
    "model_runs",
    "render_report",
    "report_page",
]

# Baseline names that mean "equal layers per device", the split users get by default (torchtitan,
# torch.distributed.pipelining). The planner names it ``equal_layers``; the prefix keeps older names working.
_EQUAL_SPLIT_PREFIX = "equal"


# ---------------------------------------------------------------------------------------------- baselines
@dataclass(frozen=True, slots=True)
class BaselineRow:
    """One line of the baseline comparison: ``speedup`` is baseline time / plan time (``None`` when the
    baseline does not fit in memory)."""

    name: str
    iteration_time_s: float | None
    speedup: float | None


def baseline_rows(plan: Plan) -> list[BaselineRow]:
    """The plan's baselines with the plan's speed-up over each, fastest baseline first, unfit ones last."""
    own = plan.predictions.iteration_time_s
    rows = []
    for name, t in plan.baselines.items():
        speedup = t / own if t is not None and own > 0 else None
        rows.append(BaselineRow(name, t, speedup))
    rows.sort(key=lambda r: (r.iteration_time_s is None, r.iteration_time_s or 0.0, r.name))
    return rows


def equal_split_speedup(plan: Plan) -> BaselineRow | None:
    """The equal-split baseline's row (equal layers per device), or ``None`` if the plan has none."""
    for r in baseline_rows(plan):
        if r.name.startswith(_EQUAL_SPLIT_PREFIX):
            return r
    return None


def best_baseline(plan: Plan) -> BaselineRow | None:
    """The fastest baseline that fits, or ``None``."""
    fitting = [r for r in baseline_rows(plan) if r.iteration_time_s is not None]
    return fitting[0] if fitting else None


# ---------------------------------------------------------------------------------------------- model runs
@dataclass(frozen=True, slots=True)
class ModuleRun:
    """A run of consecutive graph nodes with one module prefix, all in one stage (one tile of the model
    strip). ``weight`` is its forward + backward FLOPs (1 when the graph carries none)."""

    module: str
    stage: int
    start: int
    end: int
    weight: float
    param_bytes: int


def _stage_of_positions(plan: Plan, n: int) -> list[int]:
    owner = [0] * n
    for s in plan.stages:
        for p in range(max(0, s.start), min(n, s.end)):
            owner[p] = s.index
    return owner


def _runs_at_depth(graph: OpGraph, owner: Sequence[int], depth: int) -> list[ModuleRun]:
    runs: list[ModuleRun] = []
    for i, node in enumerate(graph.nodes):
        prefix = ".".join(node.module.split(".")[:depth]) if node.module else "(inputs)"
        w = float(node.fwd_flops + node.bwd_flops)
        if runs and runs[-1].module == prefix and runs[-1].stage == owner[i]:
            last = runs[-1]
            runs[-1] = ModuleRun(
                prefix, last.stage, last.start, i + 1, last.weight + w, last.param_bytes + node.param_bytes
            )
        else:
            runs.append(ModuleRun(prefix, owner[i], i, i + 1, w, node.param_bytes))
    return runs


def model_runs(plan: Plan, graph: OpGraph, *, max_runs: int = 64) -> list[ModuleRun]:
    """The model as module runs coloured by stage, at the deepest module depth that keeps at most
    ``max_runs`` runs (so a 32-layer model shows its layers, a tiny one its sub-modules)."""
    owner = _stage_of_positions(plan, len(graph.nodes))
    max_depth = max((len(n.module.split(".")) for n in graph.nodes if n.module), default=1)
    best = _runs_at_depth(graph, owner, 1)
    for depth in range(2, max_depth + 1):
        runs = _runs_at_depth(graph, owner, depth)
        if len(runs) > max_runs:
            break
        best = runs
    # Zero-FLOP runs (inputs, reshapes) still get a sliver so every stage stays visible.
    total = sum(r.weight for r in best) or float(len(best))
    floor = total * 0.004
    return [
        ModuleRun(r.module, r.stage, r.start, r.end, max(r.weight, floor, 1.0), r.param_bytes) for r in best
    ]


# ---------------------------------------------------------------------------------------------- page records
# What each part of the page shows, formatted; ``templates/report.html`` marks it up (see [Note: report page]).
@dataclass(frozen=True, slots=True)
class _Bar:
    """A horizontal bar: filled ``width`` percent (clamped to 0-100, one decimal), a label on it; ``over``
    outlines it red (more than the capacity it is drawn against)."""

    width: str
    fill: str
    label: str
    over: bool


def _bar(fraction: float, colour: str, *, label: str, over: bool = False) -> _Bar:
    pct = max(0.0, min(1.0, fraction)) * 100
    return _Bar(f"{pct:.1f}", tint(colour, 0.35), label, over)


@dataclass(frozen=True, slots=True)
class _Card:
    title: str
    value: str
    sub: str


@dataclass(frozen=True, slots=True)
class _Device:
    """A device tile: ``stage`` is ``None`` for an unused device; ``memory`` the percent of its usable
    memory the plan uses (``0`` .. ``100``)."""

    index: int
    kind: str
    label: str
    stage: int | None
    colour: str
    background: str
    tip: str
    memory: str


@dataclass(frozen=True, slots=True)
class _Host:
    index: int
    name: str
    link: str
    devices: tuple[_Device, ...]


@dataclass(frozen=True, slots=True)
class _StageRow:
    index: int
    colour: str
    devices: str
    kind: str
    dp: int
    start: int
    end: int
    modules: str
    summary: str
    time: _Bar
    memory: _Bar


@dataclass(frozen=True, slots=True)
class _Tile:
    """A tile of the model strip: ``grow`` its flex-grow (its share of the compute)."""

    stage: int
    tip: str
    grow: str
    colour: str
    text: str


@dataclass(frozen=True, slots=True)
class _LegendEntry:
    stage: int
    colour: str
    kind: str
    devices: int


@dataclass(frozen=True, slots=True)
class _BaselineLine:
    """A baseline's row; ``bar`` is ``None`` when it does not fit in memory."""

    name: str
    bar: _Bar | None
    speedup: str


@dataclass(frozen=True, slots=True)
class ReportPage:
    """What the report page shows, every number formatted (see [Note: report page]); built by
    :func:`report_page`, marked up by ``templates/report.html``. ``graph_note`` is ``None`` without a
    graph, ``timeline`` ``None`` without a timeline, ``baselines`` empty when the plan carries none."""

    title: str
    graph_name: str
    cluster_name: str
    subtitle: str
    layout: str
    cards: tuple[_Card, ...]
    cluster_note: str
    hosts: tuple[_Host, ...]
    stages: tuple[_StageRow, ...]
    graph_note: str | None
    tiles: tuple[_Tile, ...]
    legend: tuple[_LegendEntry, ...]
    timeline_note: str
    timeline: TimelineDrawing | None
    own: _Bar
    baselines: tuple[_BaselineLine, ...]
    solver: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]
    plan_id: str


def _cards(plan: Plan) -> tuple[_Card, ...]:
    p = plan.predictions
    eq = equal_split_speedup(plan)
    best = best_baseline(plan)
    cards = [
        _Card("predicted iteration", format_seconds(p.iteration_time_s), "per training step (cost model)"),
        _Card(
            "throughput",
            f"{p.throughput_samples_s:,.1f}/s",
            f"samples per second, global batch {plan.request.global_batch}",
        ),
        _Card("pipeline bubble", f"{p.bubble_fraction * 100:.1f}%", "idle share of the used devices"),
    ]
    if eq is not None:
        val = f"{eq.speedup:.2f}×" if eq.speedup is not None else "fits only here"
        sub = (
            f"over {eq.name} ({format_seconds(eq.iteration_time_s)})"
            if eq.iteration_time_s is not None
            else f"{eq.name} does not fit in memory"
        )
        cards.append(_Card("speed-up vs equal split", val, sub))
    if best is not None and best.speedup is not None:
        cards.append(
            _Card(
                "speed-up vs best baseline",
                f"{best.speedup:.2f}×",
                f"over {best.name} ({format_seconds(best.iteration_time_s)})",
            )
        )
    used = len(plan.devices_used)
    total = plan.request.cluster.num_devices
    cards.append(
        _Card("devices used", f"{used} / {total}", f"{plan.num_stages} stages × {format_degrees(plan)}")
    )
    return tuple(cards)


def _hosts(plan: Plan) -> tuple[_Host, ...]:
    cluster = plan.request.cluster
    stage_of: dict[int, int] = {}
    for s in plan.stages:
        for d in s.devices:
            stage_of.setdefault(d, s.index)
    mem = plan.predictions.device_memory_bytes
    hosts = []
    for hi, host in enumerate(cluster.hosts):
        tiles = []
        for dev in cluster.devices():
            if dev.host_index != hi:
                continue
            st = stage_of.get(dev.index)
            if st is None:
                tiles.append(_Device(dev.index, dev.kind, dev.label, None, "", "", "", "0"))
                continue
            cap = cluster.kinds[dev.kind].usable_memory_bytes
            colour = stage_colour(st)
            used = mem.get(dev.index, plan.stages[st].memory_bytes)
            tip = (
                f"device {dev.index} {dev.label} ({dev.kind}): stage {st}, "
                f"{format_bytes(used)} of {format_bytes(cap)} usable"
            )
            tiles.append(
                _Device(
                    dev.index,
                    dev.kind,
                    dev.label,
                    st,
                    colour,
                    tint(colour, 0.82),
                    tip,
                    f"{min(100.0, 100 * used / cap):.0f}",
                )
            )
        hosts.append(_Host(hi, host.name, f"{host.link.bandwidth_bytes_s / 1e9:g}", tuple(tiles)))
    return tuple(hosts)


def _stage_rows(plan: Plan) -> tuple[_StageRow, ...]:
    cluster = plan.request.cluster
    compute = [s.fwd_time_s + s.bwd_time_s for s in plan.stages]
    slowest = max(compute) or 1.0
    rows = []
    for s, c in zip(plan.stages, compute, strict=True):
        colour = stage_colour(s.index)
        cap = cluster.kinds[s.kind].usable_memory_bytes if s.kind in cluster.kinds else 0
        frac = s.memory_bytes / cap if cap else 0.0
        t_label = (
            f"{format_seconds(c)} (fwd {format_seconds(s.fwd_time_s)}, bwd {format_seconds(s.bwd_time_s)})"
        )
        m_label = f"{format_bytes(s.memory_bytes)} / {format_bytes(cap)} ({frac * 100:.0f}%)"
        rows.append(
            _StageRow(
                index=s.index,
                colour=colour,
                devices=device_ranges(s.devices),
                kind=s.kind,
                dp=s.dp,
                start=s.start,
                end=s.end,
                modules=", ".join(s.modules),
                summary=layer_summary(s.modules) or "-",
                time=_bar(c / slowest, colour, label=t_label),
                memory=_bar(frac, colour, label=m_label, over=frac > 1.0),
            )
        )
    return tuple(rows)


def _tiles(plan: Plan, graph: OpGraph | None) -> tuple[_Tile, ...]:
    if graph is None:
        # Without a graph: each stage's modules, equally wide.
        return tuple(
            _Tile(s.index, f"{m} — stage {s.index}", "1", stage_colour(s.index), short_module(m))
            for s in plan.stages
            for m in s.modules or (f"nodes {s.start}–{s.end}",)
        )
    runs = model_runs(plan, graph)
    total = sum(r.weight for r in runs) or 1.0
    tiles = []
    for r in runs:
        tip = (
            f"{r.module} — stage {r.stage}, nodes {r.start}–{r.end}, "
            f"{format_flops(r.weight)}, params {format_bytes(r.param_bytes)}"
        )
        short = short_module(r.module)
        # Label only tiles wide enough to hold it (the strip is about 1150 px wide); the rest keep
        # their name in the tooltip, so narrow tiles do not run into each other.
        room = r.weight / total * 1150
        if room < 6.5 * len(short) + 6:
            last = short.rsplit(".", 1)[-1]
            short = last if room >= 6.5 * len(last) + 4 else ""
        tiles.append(_Tile(r.stage, tip, f"{r.weight:.6g}", stage_colour(r.stage), short))
    return tuple(tiles)


def _baseline_lines(plan: Plan) -> tuple[_Bar, tuple[_BaselineLine, ...]]:
    """The plan's own bar and one line per baseline, all against the longest iteration time."""
    rows = baseline_rows(plan)
    own = plan.predictions.iteration_time_s
    longest = max([own] + [r.iteration_time_s for r in rows if r.iteration_time_s is not None]) or 1.0
    lines = []
    for r in rows:
        if r.iteration_time_s is None:
            lines.append(_BaselineLine(r.name, None, "-"))
            continue
        bar = _bar(r.iteration_time_s / longest, "#64748b", label=format_seconds(r.iteration_time_s))
        lines.append(_BaselineLine(r.name, bar, f"{r.speedup:.2f}×" if r.speedup is not None else "-"))
    return _bar(own / longest, STAGE_COLOURS[0], label=format_seconds(own)), tuple(lines)


def report_page(plan: Plan, graph: OpGraph | None = None, timeline: Timeline | None = None) -> ReportPage:
    """What :func:`render_report` shows for ``plan`` (arguments as there), as plain records."""
    req = plan.request
    cluster = req.cluster
    s = plan.solver
    graph_note = None
    if graph is not None:
        graph_note = (
            f"{graph.name}: {len(graph.nodes):,} graph nodes, {graph.num_params:,} parameters, "
            f"{format_flops(graph.fwd_flops)} forward per trace batch."
        )
    timeline_note = ""
    if timeline is not None:
        timeline_note = (
            f"One simulated iteration ({plan.schedule}, {plan.num_microbatches} microbatches of "
            f"{plan.microbatch_size}): {format_seconds(timeline.iteration_time_s)}, bubble "
            f"{timeline.bubble_fraction * 100:.1f}%."
        )
    own, baselines = _baseline_lines(plan)
    return ReportPage(
        title=f"distplan: {plan.graph.name} on {cluster.name}",
        graph_name=plan.graph.name,
        cluster_name=cluster.name,
        subtitle=(
            f"{plan.num_stages} pipeline stages × {format_degrees(plan)}, {plan.schedule}, "
            f"{plan.num_microbatches} microbatches of {plan.microbatch_size}"
        ),
        layout=plan.layout,
        cards=_cards(plan),
        cluster_note=(
            f"{cluster.name}: {cluster.description} — network between hosts "
            f"{cluster.network.bandwidth_bytes_s * 8 / 1e9:g} Gb/s."
        ),
        hosts=_hosts(plan),
        stages=_stage_rows(plan),
        graph_note=graph_note,
        tiles=_tiles(plan, graph),
        legend=tuple(
            _LegendEntry(st.index, stage_colour(st.index), st.kind, len(st.devices)) for st in plan.stages
        ),
        timeline_note=timeline_note,
        timeline=None if timeline is None else timeline_drawing(timeline, standalone=False),
        own=own,
        baselines=baselines,
        solver=(
            ("solver", s.solver),
            ("status", s.status),
            ("objective", format_seconds(s.objective_s)),
            ("best bound", format_seconds(s.bound_s)),
            ("gap", f"{s.gap * 100:.2f}%"),
            ("solve time", format_seconds(s.seconds)),
            ("layout", plan.layout),
            (
                "request",
                f"global batch {req.global_batch}, {req.dtype}, {req.optimizer}, "
                f"time limit {req.time_limit_s:g} s",
            ),
            ("plan id", plan.id),
        ),
        notes=tuple(s.notes),
        plan_id=plan.id,
    )


def render_report(plan: Plan, graph: OpGraph | None = None, timeline: Timeline | None = None) -> str:
    """The plan's report as one self-contained HTML page (see the module docstring).

    ``graph`` (the traced model the plan is for) sizes the model view by compute; ``timeline`` (from
    ``distplan.planner.simulate``) draws the iteration. Both are optional: without them those parts say
    what is missing.
    """
    page = report_page(plan, graph, timeline)
    return environment().get_template("report.html").render(page=page).strip()
