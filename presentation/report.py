"""The plan report: one self-contained HTML page (inline CSS, JS and SVG; nothing fetched from the network).

    >>> from distplan.presentation.report import render_report          # doctest: +SKIP
    >>> html = render_report(plan, graph=graph, timeline=timeline)  # doctest: +SKIP

The page has five parts, each drawn from plain plan data:

- a summary (predicted iteration time, throughput, bubble, speed-up over the equal-split baseline and
  over the best baseline, solver status);
- the **cluster**: hosts as boxes, devices as tiles coloured by the stage they run (unused devices grey),
  each with a memory bar against the device's usable capacity;
- the **stages**: per stage its devices, modules, a time bar (forward + backward of one microbatch, against
  the bottleneck stage) and a memory bar (against the device kind's usable memory);
- the **model**: its modules in graph order, coloured by stage (widths by compute when a graph is given);
- the **timeline**: the simulated iteration as inline SVG, one row per device, forward / backward /
  communication drawn, idle time left as the row's grey background;
- the **baselines** the planner compared against, and the **solver** report.

Every element that belongs to a stage carries ``data-stage="<index>"`` and every device tile
``data-device="<index>"``, so the page can be checked (and highlighted on hover) by stage and device.
:func:`render_timeline_svg` gives the timeline alone, as a standalone SVG file for docs.

[Note: report colours]
A stage's colour is ``STAGE_COLOURS[index % len(STAGE_COLOURS)]`` everywhere (cluster, stages, model,
timeline); forward is drawn as a light tint of it and backward in full, so both read as "this stage".
Communication is drawn as a band in the lower part of a row (amber for sends, near-black for the
gradient all-reduce), the optimizer step slate grey, idle light grey: none of them is a stage colour.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from distplan.errors import DistplanError
from distplan.graph import OpGraph
from distplan.plan import Plan
from distplan.timeline import Timeline, TimelineEvent

__all__ = [
    "STAGE_COLOURS",
    "BaselineRow",
    "ModuleRun",
    "ReportError",
    "baseline_rows",
    "best_baseline",
    "device_ranges",
    "equal_split_speedup",
    "find_chromium",
    "format_bytes",
    "format_seconds",
    "layer_summary",
    "model_runs",
    "render_report",
    "render_timeline_svg",
    "stage_colour",
    "write_timeline_png",
]

#: Colour per stage, by index modulo the length (see [Note: report colours]).
STAGE_COLOURS = (
    "#2563eb",
    "#16a34a",
    "#dc2626",
    "#9333ea",
    "#ea580c",
    "#0891b2",
    "#ca8a04",
    "#db2777",
    "#4f46e5",
    "#65a30d",
    "#0d9488",
    "#b45309",
)
_UNUSED = "#cbd5e1"
_IDLE = "#eef1f5"
_COMM = "#f59e0b"
_ALLREDUCE = "#0f172a"
_OPTIMIZER = "#64748b"

# Baseline names that mean "equal layers per device", the split users get by default (torchtitan,
# torch.distributed.pipelining). The planner names it ``equal_layers``; the prefix keeps older names working.
_EQUAL_SPLIT_PREFIX = "equal"


class ReportError(DistplanError):
    """A report or picture could not be written (names the file or the missing tool)."""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def stage_colour(index: int) -> str:
    """The colour of a stage (see [Note: report colours])."""
    return STAGE_COLOURS[index % len(STAGE_COLOURS)]


def _tint(colour: str, amount: float) -> str:
    """Mix a ``#rrggbb`` colour with white; ``amount`` 0 keeps it, 1 gives white."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def format_seconds(s: float | None) -> str:
    """Human time: ``812 µs``, ``12.3 ms``, ``1.25 s``; ``-`` for ``None``."""
    if s is None:
        return "-"
    if s == 0:
        return "0 s"
    if abs(s) < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if abs(s) < 1:
        return f"{s * 1e3:.3g} ms" if abs(s) < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.3g} s"


def format_bytes(n: float | None) -> str:
    """Human size in binary units: ``512 B``, ``3.2 MiB``, ``71.4 GiB``."""
    if n is None:
        return "-"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _format_flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


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


# ---------------------------------------------------------------------------------------------- timeline SVG
def _nice_step(span: float, target_ticks: int = 8) -> float:
    raw = span / max(target_ticks, 1)
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


_KIND_LABEL = {
    "fwd": "forward",
    "bwd": "backward",
    "send": "send",
    "allreduce": "all-reduce",
    "optimizer": "optimizer",
}


def _event_fill(e: TimelineEvent) -> str:
    if e.kind == "fwd":
        return _tint(stage_colour(e.stage), 0.45)
    if e.kind == "bwd":
        return stage_colour(e.stage)
    if e.kind == "send":
        return _COMM
    if e.kind == "allreduce":
        return _ALLREDUCE
    return _OPTIMIZER


_ROW_H, _ROW_GAP, _AXIS_AND_LEGEND_H = 22, 5, 58


def _top(title: str | None) -> int:
    return 30 if title else 8


def timeline_svg_height(timeline: Timeline, *, title: str | None = None) -> int:
    """Pixel height of :func:`render_timeline_svg`'s drawing."""
    return _top(title) + len(timeline.devices) * (_ROW_H + _ROW_GAP) + _AXIS_AND_LEGEND_H


def find_chromium() -> str | None:
    """Path of a chromium/chrome executable (``DISTPLAN_CHROMIUM`` first), or ``None``."""
    env = os.environ.get("DISTPLAN_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def write_timeline_png(
    timeline: Timeline,
    path: str | os.PathLike[str],
    *,
    width: int = 1100,
    title: str | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Render :func:`render_timeline_svg` to a PNG with headless chromium (no Python imaging library
    needed). Raises :class:`ReportError` when chromium is missing or fails."""
    exe = find_chromium()
    if exe is None:
        raise ReportError(
            "writing a PNG needs chromium (apt-get install chromium, or set DISTPLAN_CHROMIUM); "
            "the SVG (--timeline-svg) needs nothing"
        )
    svg = render_timeline_svg(timeline, width=width, title=title)
    height = timeline_svg_height(timeline, title=title)
    out = os.path.abspath(os.fspath(path))
    with tempfile.TemporaryDirectory(prefix="distplan-png-") as tmp:
        page = os.path.join(tmp, "timeline.html")
        with open(page, "w", encoding="utf-8") as f:
            f.write(f'<!DOCTYPE html><html><body style="margin:0;background:#fff">{svg}</body></html>')
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={os.path.join(tmp, 'profile')}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            "file://" + page,
        ]
        try:
            if os.path.exists(out):
                os.remove(out)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise ReportError(f"chromium did not finish the PNG within {timeout_s:g} s") from e
        except OSError as e:
            raise ReportError(f"cannot run chromium at {exe!r}: {e.strerror}") from e
        if r.returncode != 0 or not os.path.exists(out):
            raise ReportError(
                f"chromium failed to write {out!r} (exit {r.returncode}): {r.stderr.strip()[-300:]}"
            )


def render_timeline_svg(
    timeline: Timeline, *, width: int = 1100, standalone: bool = True, title: str | None = None
) -> str:
    """The simulated iteration as SVG: one row per device, time left to right (see [Note: report colours]).

    Compute (forward / backward) fills the row; communication and all-reduce are drawn as a band in the
    row's lower part, since they may overlap compute; what is left of the grey row is idle time.
    ``standalone`` adds the XML namespace so the result can be saved as an ``.svg`` file.
    """
    # The label column fits the longest row label (about 6.2 px per character at 11 px), within bounds.
    longest = max((len(x) for x in timeline.labels), default=10)
    label_w = int(min(360, max(120, 6.2 * longest + 28)))
    row_h, gap, top = _ROW_H, _ROW_GAP, _top(title)
    plot_w = max(200, width - label_w - 20)
    rows = list(timeline.devices)
    row_of = {d: i for i, d in enumerate(rows)}
    span = timeline.iteration_time_s or max((e.end_s for e in timeline.events), default=1.0) or 1.0
    axis_y = top + len(rows) * (row_h + gap)
    height = timeline_svg_height(timeline, title=title)

    def x(t: float) -> float:
        return label_w + plot_w * (t / span)

    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    out = [
        f'<svg{ns} class="timeline" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif" font-size="11" '
        f'role="img" aria-label="simulated pipeline timeline">'
    ]
    if standalone:
        out.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>')
    if title:
        out.append(f'<text x="8" y="18" font-size="13" font-weight="600">{_e(title)}</text>')
    # Rows: label and idle background.
    stage_of_device: dict[int, int] = {}
    for e in timeline.events:
        stage_of_device.setdefault(e.device, e.stage)
    labels = list(timeline.labels) + [""] * (len(rows) - len(timeline.labels))
    for i, d in enumerate(rows):
        y = top + i * (row_h + gap)
        st = stage_of_device.get(d)
        attrs = f' data-device="{d}"' + (f' data-stage="{st}"' if st is not None else "")
        out.append(f'<g class="tl-row"{attrs}>')
        colour = stage_colour(st) if st is not None else _UNUSED
        out.append(f'<rect x="{label_w - 8}" y="{y}" width="4" height="{row_h}" fill="{colour}"/>')
        out.append(
            f'<text x="{label_w - 14}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end" fill="#1f2937">'
            f"{_e(labels[i] or f'device {d}')}</text>"
        )
        out.append(
            f'<rect class="idle" x="{label_w}" y="{y}" width="{plot_w}" height="{row_h}" fill="{_IDLE}">'
            f"<title>idle</title></rect>"
        )
        out.append("</g>")
    # Grid and axis.
    step = _nice_step(span)
    unit, scale = ("ms", 1e3) if span < 10 else ("s", 1.0)
    t = 0.0
    while t <= span * 1.0001:
        xx = x(t)
        out.append(
            f'<line x1="{xx:.1f}" y1="{top}" x2="{xx:.1f}" y2="{axis_y}" stroke="#94a3b8" '
            f'stroke-width="0.5" stroke-dasharray="2,3"/>'
        )
        out.append(
            f'<text x="{xx:.1f}" y="{axis_y + 14}" text-anchor="middle" fill="#475569">{t * scale:g}</text>'
        )
        t += step
    out.append(
        f'<text x="{label_w + plot_w}" y="{axis_y + 14}" text-anchor="end" fill="#475569" dx="0" dy="0"></text>'
    )
    out.append(
        f'<text x="{label_w - 14}" y="{axis_y + 14}" text-anchor="end" fill="#475569">time ({unit})</text>'
    )
    # Events: compute first, then communication on top in the lower band.
    compute = [e for e in timeline.events if e.kind in ("fwd", "bwd", "optimizer")]
    comm = [e for e in timeline.events if e.kind in ("send", "allreduce")]
    for group, band in ((compute, False), (comm, True)):
        for e in group:
            if e.device not in row_of:
                continue
            ey = float(top + row_of[e.device] * (row_h + gap))
            eh = float(row_h)
            if band:
                ey, eh = ey + row_h * 0.62, row_h * 0.38
            x0, x1 = x(e.start_s), x(e.end_s)
            w = max(x1 - x0, 0.6)
            mb = f" microbatch {e.microbatch}" if e.microbatch >= 0 else ""
            tip = (
                f"stage {e.stage} {_KIND_LABEL.get(e.kind, e.kind)}{mb}: "
                f"{e.start_s * scale:.4g}–{e.end_s * scale:.4g} {unit}"
            )
            out.append(
                f'<rect class="ev ev-{e.kind}" data-stage="{e.stage}" x="{x0:.2f}" y="{ey:.1f}" '
                f'width="{w:.2f}" height="{eh:.1f}" fill="{_event_fill(e)}" stroke="#ffffff" '
                f'stroke-width="0.4"><title>{_e(tip)}</title></rect>'
            )
            if not band and e.microbatch >= 0 and w >= 14:
                fill = "#1f2937" if e.kind == "fwd" else "#ffffff"
                out.append(
                    f'<text x="{x0 + w / 2:.1f}" y="{ey + eh / 2 + 4:.1f}" text-anchor="middle" '
                    f'font-size="10" fill="{fill}" pointer-events="none">{e.microbatch}</text>'
                )
    # Legend.
    ly = axis_y + 30
    items = [
        ("forward (stage colour, light)", _tint(STAGE_COLOURS[0], 0.45)),
        ("backward (stage colour)", STAGE_COLOURS[0]),
        ("send / receive", _COMM),
        ("gradient all-reduce", _ALLREDUCE),
        ("optimizer", _OPTIMIZER),
        ("idle", _IDLE),
    ]
    lx = 8.0  # from the left edge: the legend (about 800 px) fits whatever the label column's width
    for text, colour in items:
        out.append(
            f'<rect x="{lx:.0f}" y="{ly - 9}" width="12" height="12" fill="{colour}" stroke="#94a3b8" stroke-width="0.5"/>'
        )
        out.append(f'<text x="{lx + 16:.0f}" y="{ly + 1}" fill="#334155">{_e(text)}</text>')
        lx += 16 + 6.2 * len(text) + 18
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- page parts
def _bar(fraction: float, colour: str, *, label: str, over: bool = False) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    cls = "bar over" if over else "bar"
    return (
        f'<div class="{cls}" title="{_e(label)}"><div class="fill" style="width:{pct:.1f}%;background:{_tint(colour, 0.35)}">'
        f"</div><span>{_e(label)}</span></div>"
    )


def _summary(plan: Plan) -> str:
    p = plan.predictions
    eq = equal_split_speedup(plan)
    best = best_baseline(plan)
    cards = [
        ("predicted iteration", format_seconds(p.iteration_time_s), "per training step (cost model)"),
        (
            "throughput",
            f"{p.throughput_samples_s:,.1f}/s",
            f"samples per second, global batch {plan.request.global_batch}",
        ),
        ("pipeline bubble", f"{p.bubble_fraction * 100:.1f}%", "idle share of the used devices"),
    ]
    if eq is not None:
        val = f"{eq.speedup:.2f}×" if eq.speedup is not None else "fits only here"
        sub = (
            f"over {eq.name} ({format_seconds(eq.iteration_time_s)})"
            if eq.iteration_time_s is not None
            else f"{eq.name} does not fit in memory"
        )
        cards.append(("speed-up vs equal split", val, sub))
    if best is not None and best.speedup is not None:
        cards.append(
            (
                "speed-up vs best baseline",
                f"{best.speedup:.2f}×",
                f"over {best.name} ({format_seconds(best.iteration_time_s)})",
            )
        )
    used = len(plan.devices_used)
    total = plan.request.cluster.num_devices
    cards.append(("devices used", f"{used} / {total}", f"{plan.num_stages} stages × dp {plan.dp}"))
    out = ['<section id="summary" class="cards">']
    for title, value, sub in cards:
        out.append(
            f'<div class="card"><div class="k">{_e(title)}</div><div class="v">{_e(value)}</div>'
            f'<div class="s">{_e(sub)}</div></div>'
        )
    out.append("</section>")
    return "\n".join(out)


def _cluster_section(plan: Plan) -> str:
    cluster = plan.request.cluster
    stage_of: dict[int, int] = {}
    for s in plan.stages:
        for d in s.devices:
            stage_of.setdefault(d, s.index)
    mem = plan.predictions.device_memory_bytes
    out = [
        '<section id="cluster"><h2>Cluster</h2>',
        f'<p class="note">{_e(cluster.name)}: {_e(cluster.description)} — network between hosts '
        f"{cluster.network.bandwidth_bytes_s * 8 / 1e9:g} Gb/s. Devices are coloured by the stage they run; grey "
        f"devices are unused.</p>",
        '<div class="hosts">',
    ]
    for hi, host in enumerate(cluster.hosts):
        out.append(
            f'<div class="host" data-host="{hi}"><div class="host-name">{_e(host.name)}'
            f'<span class="link"> intra-host {host.link.bandwidth_bytes_s / 1e9:g} GB/s</span></div>'
            '<div class="devices">'
        )
        for dev in cluster.devices():
            if dev.host_index != hi:
                continue
            kind = cluster.kinds[dev.kind]
            st = stage_of.get(dev.index)
            cap = kind.usable_memory_bytes
            if st is None:
                out.append(
                    f'<div class="device unused" data-device="{dev.index}" title="device {dev.index} '
                    f'{_e(dev.label)} ({_e(dev.kind)}): unused">'
                    f'<div class="dname">d{dev.index}</div><div class="dkind">{_e(dev.kind)}</div>'
                    f'<div class="dstage">unused</div></div>'
                )
                continue
            colour = stage_colour(st)
            used = mem.get(dev.index, plan.stages[st].memory_bytes)
            tip = (
                f"device {dev.index} {dev.label} ({dev.kind}): stage {st}, "
                f"{format_bytes(used)} of {format_bytes(cap)} usable"
            )
            out.append(
                f'<div class="device" data-device="{dev.index}" data-stage="{st}" title="{_e(tip)}" '
                f'style="border-color:{colour};background:{_tint(colour, 0.82)}">'
                f'<div class="dname">d{dev.index}</div><div class="dkind">{_e(dev.kind)}</div>'
                f'<div class="dstage" style="color:{colour}">stage {st}</div>'
                f'<div class="mini"><div style="width:{min(100.0, 100 * used / cap):.0f}%;background:{colour}">'
                f"</div></div></div>"
            )
        out.append("</div></div>")
    out.append("</div></section>")
    return "\n".join(out)


def _short_module(fqn: str) -> str:
    """A tile label: the last name of a module path, with its parent when the last is a layer number
    (``transformer.h.3`` -> ``h.3``)."""
    if not fqn:
        return "(root)"
    parts = fqn.split(".")
    if parts[-1].isdigit() and len(parts) > 1:
        return ".".join(parts[-2:])
    return parts[-1]


def layer_summary(modules: Sequence[str], *, max_chars: int = 60) -> str:
    """A short human list of the layers a stage covers, in order: ``wte, wpe, drop, h.0–h.8``.

    Numbered layers (``transformer.h.3.attn``) fold to ``h.3`` and consecutive ones to a range; other
    modules show their last name, and bare containers (``transformer``, a prefix of other entries) are
    left out.
    """
    mods = [m for m in dict.fromkeys(modules) if m]
    containers = {m for m in mods if any(o.startswith(m + ".") for o in mods)}
    items: list[tuple[str, int | None]] = []
    for m in mods:
        parts = m.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is not None and idx > 0:
            item: tuple[str, int | None] = (parts[idx - 1], int(parts[idx]))
        elif m in containers:
            continue
        else:
            item = (parts[-1], None)
        if item not in items:
            items.append(item)
    out: list[str] = []
    i = 0
    while i < len(items):
        name, num = items[i]
        if num is None:
            out.append(name)
            i += 1
            continue
        j = i
        while j + 1 < len(items) and items[j + 1][0] == name and items[j + 1][1] == (items[j][1] or 0) + 1:
            j += 1
        out.append(f"{name}.{num}" if j == i else f"{name}.{num}–{name}.{items[j][1]}")
        i = j + 1
    text = ", ".join(out)
    if len(text) > max_chars and len(out) > 2:
        text = f"{out[0]} … {out[-1]} ({len(out)} parts)"
    return text


def device_ranges(devices: Sequence[int]) -> str:
    """``d0–d7, d9`` for devices 0..7 and 9."""
    out: list[str] = []
    run: list[int] = []
    for d in [*devices, -2]:
        if run and d == run[-1] + 1:
            run.append(d)
            continue
        if run:
            out.append(f"d{run[0]}" if len(run) == 1 else f"d{run[0]}–d{run[-1]}")
        run = [d]
    return ", ".join(out)


def _stages_section(plan: Plan) -> str:
    cluster = plan.request.cluster
    compute = [s.fwd_time_s + s.bwd_time_s for s in plan.stages]
    slowest = max(compute) or 1.0
    out = [
        '<section id="stages"><h2>Stages</h2>',
        '<p class="note">Time: forward + backward of one microbatch on one replica, against the slowest stage '
        "(the pipeline's bottleneck). Memory: predicted peak per device against the device's usable memory.</p>",
        '<table class="stages"><thead><tr><th>stage</th><th>devices</th><th>kind</th><th>dp</th>'
        "<th>nodes</th><th>modules</th><th>time / microbatch</th><th>memory / capacity</th></tr></thead><tbody>",
    ]
    for s, c in zip(plan.stages, compute, strict=True):
        colour = stage_colour(s.index)
        cap = cluster.kinds[s.kind].usable_memory_bytes if s.kind in cluster.kinds else 0
        frac = s.memory_bytes / cap if cap else 0.0
        t_label = (
            f"{format_seconds(c)} (fwd {format_seconds(s.fwd_time_s)}, bwd {format_seconds(s.bwd_time_s)})"
        )
        m_label = f"{format_bytes(s.memory_bytes)} / {format_bytes(cap)} ({frac * 100:.0f}%)"
        devs = device_ranges(s.devices)
        out.append(
            f'<tr class="stage-row" data-stage="{s.index}"><td><span class="swatch" style="background:{colour}">'
            f"</span>stage {s.index}</td><td>{_e(devs)}</td><td>{_e(s.kind)}</td><td>{s.dp}</td>"
            f'<td>{s.start}–{s.end}</td><td class="mods" title="{_e(", ".join(s.modules))}">'
            f"{_e(layer_summary(s.modules) or '-')}</td>"
            f"<td>{_bar(c / slowest, colour, label=t_label)}</td>"
            f"<td>{_bar(frac, colour, label=m_label, over=frac > 1.0)}</td></tr>"
        )
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _model_section(plan: Plan, graph: OpGraph | None) -> str:
    out = ['<section id="model"><h2>Model</h2>']
    if graph is not None:
        runs = model_runs(plan, graph)
        out.append(
            f'<p class="note">{_e(graph.name)}: {len(graph.nodes):,} graph nodes, {graph.num_params:,} parameters, '
            f"{_format_flops(graph.fwd_flops)} forward per trace batch. Each tile is a module (in graph order), "
            "its width its share of the compute, its colour its stage.</p>"
        )
        out.append('<div class="strip">')
        total = sum(r.weight for r in runs) or 1.0
        for r in runs:
            colour = stage_colour(r.stage)
            tip = (
                f"{r.module} — stage {r.stage}, nodes {r.start}–{r.end}, "
                f"{_format_flops(r.weight)}, params {format_bytes(r.param_bytes)}"
            )
            short = _short_module(r.module)
            # Label only tiles wide enough to hold it (the strip is about 1150 px wide); the rest keep
            # their name in the tooltip, so narrow tiles do not run into each other.
            room = r.weight / total * 1150
            if room < 6.5 * len(short) + 6:
                last = short.rsplit(".", 1)[-1]
                short = last if room >= 6.5 * len(last) + 4 else ""
            out.append(
                f'<div class="tile" data-stage="{r.stage}" title="{_e(tip)}" '
                f'style="flex-grow:{r.weight:.6g};background:{colour}"><span>{_e(short)}</span></div>'
            )
        out.append("</div>")
    else:
        out.append(
            '<p class="note">The modules each stage covers (pass the traced graph to see them sized by compute).</p>'
        )
        out.append('<div class="strip">')
        for s in plan.stages:
            for m in s.modules or (f"nodes {s.start}–{s.end}",):
                colour = stage_colour(s.index)
                short = _short_module(m)
                out.append(
                    f'<div class="tile" data-stage="{s.index}" title="{_e(m)} — stage {s.index}" '
                    f'style="flex-grow:1;background:{colour}"><span>{_e(short)}</span></div>'
                )
        out.append("</div>")
    legend = "".join(
        f'<span class="legend-item" data-stage="{s.index}"><span class="swatch" '
        f'style="background:{stage_colour(s.index)}"></span>stage {s.index} ({_e(s.kind)} × {len(s.devices)})</span>'
        for s in plan.stages
    )
    out.append(f'<div class="legend">{legend}</div></section>')
    return "\n".join(out)


def _timeline_section(plan: Plan, timeline: Timeline | None) -> str:
    out = ['<section id="timeline"><h2>Timeline</h2>']
    if timeline is None:
        out.append(
            '<p class="note">No simulated timeline was given (run <code>distplan simulate</code>).</p>'
        )
    else:
        out.append(
            f'<p class="note">One simulated iteration ({_e(plan.schedule)}, {plan.num_microbatches} microbatches of '
            f"{plan.microbatch_size}): {format_seconds(timeline.iteration_time_s)}, bubble "
            f"{timeline.bubble_fraction * 100:.1f}%. Numbers are microbatch indices; hover for times.</p>"
        )
        out.append('<div class="tl-wrap">')
        out.append(render_timeline_svg(timeline, standalone=False))
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def _baselines_section(plan: Plan) -> str:
    rows = baseline_rows(plan)
    out = ['<section id="baselines"><h2>Baselines</h2>']
    if not rows:
        out.append('<p class="note">The plan carries no baselines.</p></section>')
        return "\n".join(out)
    out.append(
        '<p class="note">Predicted iteration time of what users do today, under the same cost model; '
        "speed-up = baseline time / this plan's time.</p>"
    )
    own = plan.predictions.iteration_time_s
    longest = max([own] + [r.iteration_time_s for r in rows if r.iteration_time_s is not None]) or 1.0
    out.append(
        '<table class="baselines"><thead><tr><th>plan</th><th>iteration time</th><th>speed-up</th></tr></thead><tbody>'
    )
    out.append(
        f'<tr class="own"><td>this plan (distplan)</td><td>{_bar(own / longest, STAGE_COLOURS[0], label=format_seconds(own))}'
        "</td><td>1.00×</td></tr>"
    )
    for r in rows:
        if r.iteration_time_s is None:
            out.append(
                f'<tr data-baseline="{_e(r.name)}"><td>{_e(r.name)}</td><td class="unfit">does not fit in memory</td>'
                "<td>-</td></tr>"
            )
            continue
        sp = f"{r.speedup:.2f}×" if r.speedup is not None else "-"
        out.append(
            f'<tr data-baseline="{_e(r.name)}"><td>{_e(r.name)}</td>'
            f"<td>{_bar(r.iteration_time_s / longest, '#64748b', label=format_seconds(r.iteration_time_s))}</td>"
            f"<td>{sp}</td></tr>"
        )
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _solver_section(plan: Plan) -> str:
    s = plan.solver
    req = plan.request
    items: list[tuple[str, str]] = [
        ("solver", s.solver),
        ("status", s.status),
        ("objective", format_seconds(s.objective_s)),
        ("best bound", format_seconds(s.bound_s)),
        ("gap", f"{s.gap * 100:.2f}%"),
        ("solve time", format_seconds(s.seconds)),
        ("layout", plan.layout),
        (
            "request",
            f"global batch {req.global_batch}, {req.dtype}, {req.optimizer}, time limit {req.time_limit_s:g} s",
        ),
        ("plan id", plan.id),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in items)
    notes = "".join(f"<li>{_e(n)}</li>" for n in s.notes)
    notes_html = f"<ul class='notes'>{notes}</ul>" if notes else ""
    return f'<section id="solver"><h2>Solver</h2><table class="kv">{rows}</table>{notes_html}</section>'


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #0f172a;
  background: #f8fafc; font-size: 14px; }
header { background: #0f172a; color: #f8fafc; padding: 18px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 20px; font-weight: 600; }
header .sub { color: #cbd5e1; font-size: 13px; }
header code { color: #e2e8f0; }
main { padding: 16px 28px 40px; max-width: 1240px; }
section { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 14px 18px; margin: 14px 0; }
h2 { font-size: 16px; margin: 0 0 6px 0; }
.note { color: #475569; margin: 2px 0 10px; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; background: transparent; border: none; padding: 0; }
.card { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 10px 14px; min-width: 170px; flex: 1; }
.card .k { color: #64748b; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.card .v { font-size: 22px; font-weight: 650; margin: 2px 0; }
.card .s { color: #64748b; font-size: 12px; }
.hosts { display: flex; flex-wrap: wrap; gap: 12px; }
.host { border: 1px solid #cbd5e1; border-radius: 8px; padding: 8px; background: #f8fafc; }
.host-name { font-weight: 600; margin-bottom: 6px; }
.host-name .link { font-weight: 400; color: #64748b; font-size: 12px; }
.devices { display: grid; grid-template-columns: repeat(4, 112px); gap: 6px; }
.device { border: 2px solid; border-radius: 6px; padding: 4px 6px; font-size: 11px; }
.device.unused { border-color: #cbd5e1; background: #f1f5f9; color: #94a3b8; }
.device .dname { font-weight: 700; font-size: 12px; }
.device .dkind { color: #475569; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.device.unused .dkind { color: #94a3b8; }
.device .dstage { font-weight: 600; }
.mini { height: 4px; background: #e2e8f0; border-radius: 2px; margin-top: 3px; overflow: hidden; }
.mini > div { height: 100%; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #f1f5f9; vertical-align: middle;
  white-space: nowrap; }
th { color: #475569; font-weight: 600; font-size: 12px; }
td.mods { max-width: 240px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-family: ui-monospace, monospace; font-size: 12px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
.bar { position: relative; height: 18px; min-width: 240px; background: #f1f5f9; border-radius: 4px; overflow: hidden; }
.bar .fill { height: 100%; opacity: .85; }
.bar span { position: absolute; left: 6px; top: 1px; font-size: 12px; color: #0f172a; white-space: nowrap; }
.bar.over { outline: 2px solid #dc2626; }
.strip { display: flex; height: 46px; border-radius: 6px; overflow: hidden; border: 1px solid #e2e8f0; }
.tile { min-width: 2px; border-right: 1px solid rgba(255,255,255,.6); color: #fff; font-size: 10px; overflow: hidden;
  display: flex; align-items: center; justify-content: center; }
.tile span { white-space: nowrap; padding: 0 2px; }
.legend { margin-top: 8px; display: flex; flex-wrap: wrap; gap: 14px; font-size: 12px; color: #334155; }
.tl-wrap { overflow-x: auto; }
td.unfit { color: #94a3b8; font-style: italic; }
tr.own td { font-weight: 600; }
table.kv th { width: 130px; }
ul.notes { color: #475569; font-size: 13px; }
.dim { opacity: .25; transition: opacity .1s; }
footer { color: #94a3b8; font-size: 12px; padding: 0 28px 24px; }
"""

# Hovering anything that belongs to a stage dims everything that belongs to another stage.
_JS = """
(function () {
  var items = document.querySelectorAll('[data-stage]');
  function mark(stage) {
    for (var i = 0; i < items.length; i++) {
      var s = items[i].getAttribute('data-stage');
      if (stage !== null && s !== stage) { items[i].classList.add('dim'); } else { items[i].classList.remove('dim'); }
    }
  }
  for (var i = 0; i < items.length; i++) {
    items[i].addEventListener('mouseenter', function (ev) { mark(ev.currentTarget.getAttribute('data-stage')); });
    items[i].addEventListener('mouseleave', function () { mark(null); });
  }
})();
"""


def render_report(plan: Plan, graph: OpGraph | None = None, timeline: Timeline | None = None) -> str:
    """The plan's report as one self-contained HTML page (see the module docstring).

    ``graph`` (the traced model the plan is for) sizes the model view by compute; ``timeline`` (from
    ``distplan.planner.simulate``) draws the iteration. Both are optional: without them those parts say
    what is missing.
    """
    req = plan.request
    title = f"distplan: {req.graph_name} on {req.cluster.name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # The page is self-contained: forbid every network fetch, so a viewer offline sees the same page.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; img-src data:\">",
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(req.graph_name)} on {_e(req.cluster.name)}</h1>"
        f'<div class="sub">{plan.num_stages} pipeline stages × data-parallel {plan.dp}, {_e(plan.schedule)}, '
        f"{plan.num_microbatches} microbatches of {plan.microbatch_size} — layout <code>{_e(plan.layout)}</code></div>"
        "</header><main>",
        _summary(plan),
        _cluster_section(plan),
        _stages_section(plan),
        _model_section(plan, graph),
        _timeline_section(plan, timeline),
        _baselines_section(plan),
        _solver_section(plan),
        "</main>",
        f"<footer>distplan report · plan {_e(plan.id[:16])} · predictions from the cost model; "
        "validate the plan with <code>distplan validate</code></footer>",
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)
