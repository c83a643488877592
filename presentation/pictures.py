"""The simulated timeline as a picture: SVG (``templates/timeline.svg``) and PNG (the SVG through headless
chromium, so no Python imaging library is needed).

    >>> from distplan.presentation.pictures import render_timeline_svg       # doctest: +SKIP
    >>> open("timeline.svg", "w").write(render_timeline_svg(timeline))       # doctest: +SKIP

One row per device, time left to right. Compute (forward / backward, the optimizer step) fills the row;
sends and the gradient all-reduce are drawn as a band in the row's lower part, since they may overlap
compute; what is left of the grey row is idle time. Colours: [Note: report colours] in
:mod:`distplan.presentation.colours`. The report page draws the same picture inline.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from distplan.errors import DistplanError
from distplan.presentation._jinja import environment
from distplan.presentation.colours import (
    ALLREDUCE,
    COMM,
    IDLE,
    OPTIMIZER,
    STAGE_COLOURS,
    UNUSED,
    stage_colour,
    tint,
)
from distplan.timeline import Timeline, TimelineEvent

__all__ = [
    "ReportError",
    "TimelineDrawing",
    "find_chromium",
    "render_timeline_svg",
    "timeline_drawing",
    "timeline_svg_height",
    "write_timeline_png",
]


class ReportError(DistplanError):
    """A report or picture could not be written (names the file or the missing tool)."""


_KIND_LABEL = {
    "fwd": "forward",
    "bwd": "backward",
    "send": "send",
    "allreduce": "all-reduce",
    "optimizer": "optimizer",
}
# Pixels: row height, gap between rows, the axis and legend below the rows.
_ROW_H, _ROW_GAP, _AXIS_AND_LEGEND_H = 22, 5, 58


# Geometry of the drawing, in pixels, already formatted as the SVG writes it: the template only places it.
@dataclass(frozen=True, slots=True)
class _Row:
    device: int
    stage: int | None
    y: int
    colour: str
    label: str
    label_y: str


@dataclass(frozen=True, slots=True)
class _Tick:
    x: str
    label: str


@dataclass(frozen=True, slots=True)
class _Event:
    kind: str
    stage: int
    x: str
    y: str
    width: str
    height: str
    fill: str
    tip: str
    # The microbatch number written on a wide enough compute block ("" for none), its centre and colour.
    text: str
    text_x: str
    text_y: str
    text_fill: str


@dataclass(frozen=True, slots=True)
class _LegendItem:
    x: str
    text_x: str
    text: str
    colour: str


@dataclass(frozen=True, slots=True)
class TimelineDrawing:
    """Everything ``templates/timeline.svg`` draws, laid out (pixels; ``standalone`` adds the XML namespace
    and a white background so the SVG stands as a file). Built by :func:`timeline_drawing`."""

    width: int
    height: int
    standalone: bool
    title: str | None
    top: int
    label_w: int
    plot_w: int
    row_h: int
    axis_y: int
    idle: str
    rows: tuple[_Row, ...]
    ticks: tuple[_Tick, ...]
    unit: str
    events: tuple[_Event, ...]
    legend_y: int
    legend: tuple[_LegendItem, ...]


def _nice_step(span: float, target_ticks: int = 8) -> float:
    """A tick spacing of 1, 2, 2.5 or 5 times a power of ten giving about ``target_ticks`` ticks."""
    raw = span / max(target_ticks, 1)
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _event_fill(e: TimelineEvent) -> str:
    if e.kind == "fwd":
        return tint(stage_colour(e.stage), 0.45)
    if e.kind == "bwd":
        return stage_colour(e.stage)
    if e.kind == "send":
        return COMM
    if e.kind == "allreduce":
        return ALLREDUCE
    return OPTIMIZER


def _top(title: str | None) -> int:
    return 30 if title else 8


def timeline_svg_height(timeline: Timeline, *, title: str | None = None) -> int:
    """Pixel height of :func:`render_timeline_svg`'s drawing: rows of 22 px with 5 px gaps, plus the title
    and the axis and legend."""
    return _top(title) + len(timeline.devices) * (_ROW_H + _ROW_GAP) + _AXIS_AND_LEGEND_H


def timeline_drawing(
    timeline: Timeline, *, width: int = 1100, standalone: bool = True, title: str | None = None
) -> TimelineDrawing:
    """Lay out ``timeline`` in a drawing ``width`` pixels wide (see the module docstring)."""
    # The label column fits the longest row label (about 6.2 px per character at 11 px), within bounds.
    longest = max((len(x) for x in timeline.labels), default=10)
    label_w = int(min(360, max(120, 6.2 * longest + 28)))
    row_h, gap, top = _ROW_H, _ROW_GAP, _top(title)
    plot_w = max(200, width - label_w - 20)
    devices = list(timeline.devices)
    row_of = {d: i for i, d in enumerate(devices)}
    span = timeline.iteration_time_s or max((e.end_s for e in timeline.events), default=1.0) or 1.0
    axis_y = top + len(devices) * (row_h + gap)

    def x(t: float) -> float:
        return label_w + plot_w * (t / span)

    # Rows: a device's stage is the stage of its first event (none: the device idles all iteration).
    stage_of_device: dict[int, int] = {}
    for e in timeline.events:
        stage_of_device.setdefault(e.device, e.stage)
    labels = list(timeline.labels) + [""] * (len(devices) - len(timeline.labels))
    rows = []
    for i, d in enumerate(devices):
        y = top + i * (row_h + gap)
        st = stage_of_device.get(d)
        rows.append(
            _Row(
                device=d,
                stage=st,
                y=y,
                colour=stage_colour(st) if st is not None else UNUSED,
                label=labels[i] or f"device {d}",
                label_y=f"{y + row_h / 2 + 4:.1f}",
            )
        )
    # Axis ticks in ms below 10 s, else in s.
    step = _nice_step(span)
    unit, scale = ("ms", 1e3) if span < 10 else ("s", 1.0)
    ticks = []
    t = 0.0
    while t <= span * 1.0001:
        ticks.append(_Tick(f"{x(t):.1f}", f"{t * scale:g}"))
        t += step
    # Events: compute first, then communication on top in the lower band.
    compute = [e for e in timeline.events if e.kind in ("fwd", "bwd", "optimizer")]
    comm = [e for e in timeline.events if e.kind in ("send", "allreduce")]
    events = []
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
            labelled = not band and e.microbatch >= 0 and w >= 14
            events.append(
                _Event(
                    kind=e.kind,
                    stage=e.stage,
                    x=f"{x0:.2f}",
                    y=f"{ey:.1f}",
                    width=f"{w:.2f}",
                    height=f"{eh:.1f}",
                    fill=_event_fill(e),
                    tip=(
                        f"stage {e.stage} {_KIND_LABEL.get(e.kind, e.kind)}{mb}: "
                        f"{e.start_s * scale:.4g}–{e.end_s * scale:.4g} {unit}"
                    ),
                    text=str(e.microbatch) if labelled else "",
                    text_x=f"{x0 + w / 2:.1f}",
                    text_y=f"{ey + eh / 2 + 4:.1f}",
                    text_fill="#1f2937" if e.kind == "fwd" else "#ffffff",
                )
            )
    legend = []
    lx = 8.0  # from the left edge: the legend (about 800 px) fits whatever the label column's width
    for text, colour in (
        ("forward (stage colour, light)", tint(STAGE_COLOURS[0], 0.45)),
        ("backward (stage colour)", STAGE_COLOURS[0]),
        ("send / receive", COMM),
        ("gradient all-reduce", ALLREDUCE),
        ("optimizer", OPTIMIZER),
        ("idle", IDLE),
    ):
        legend.append(_LegendItem(f"{lx:.0f}", f"{lx + 16:.0f}", text, colour))
        lx += 16 + 6.2 * len(text) + 18
    return TimelineDrawing(
        width=width,
        height=timeline_svg_height(timeline, title=title),
        standalone=standalone,
        title=title,
        top=top,
        label_w=label_w,
        plot_w=plot_w,
        row_h=row_h,
        axis_y=axis_y,
        idle=IDLE,
        rows=tuple(rows),
        ticks=tuple(ticks),
        unit=unit,
        events=tuple(events),
        legend_y=axis_y + 30,
        legend=tuple(legend),
    )


def render_timeline_svg(
    timeline: Timeline, *, width: int = 1100, standalone: bool = True, title: str | None = None
) -> str:
    """The simulated iteration as SVG markup ``width`` pixels wide (see the module docstring).

    ``standalone`` adds the XML namespace and a white background, so the result can be saved as an
    ``.svg`` file; without it the markup is for inlining in an HTML page. ``title`` is drawn above the rows.
    """
    drawing = timeline_drawing(timeline, width=width, standalone=standalone, title=title)
    return environment().get_template("timeline.svg").render(drawing=drawing).strip()


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
    """Render :func:`render_timeline_svg` to a PNG ``width`` pixels wide with headless chromium.

    Raises :class:`ReportError` when chromium is missing, fails, or takes longer than ``timeout_s``
    seconds.
    """
    exe = find_chromium()
    if exe is None:
        raise ReportError(
            "writing a PNG needs chromium (apt-get install chromium, or set DISTPLAN_CHROMIUM); "
            "the SVG (--timeline-svg) needs nothing"
        )
    page_html = (
        environment()
        .get_template("picture.html")
        .render(drawing=timeline_drawing(timeline, width=width, title=title))
    )
    height = timeline_svg_height(timeline, title=title)
    out = os.path.abspath(os.fspath(path))
    with tempfile.TemporaryDirectory(prefix="distplan-png-") as tmp:
        page = os.path.join(tmp, "timeline.html")
        with open(page, "w", encoding="utf-8") as f:
            f.write(page_html)
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
