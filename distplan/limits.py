"""The one table of what distplan accepts: every request field and cluster figure with its range.

Every door (Python API, CLI, REST) checks a plan request through :class:`~distplan.request.PlanRequest`,
which checks its fields against :data:`REQUEST_RANGES` and its cluster against :data:`FIGURE_RANGES`; the
REST models take their pydantic bounds from the same table (``distplan.service.models``), so a value is
accepted or refused the same way whichever door it comes through, with a message that names the field, the
value and the range.

Why these bounds: the planner prices in integer time units for CP-SAT, and the products of the figures
below stay inside int64 over this range (see ``distplan.planner.problem``); outside it times become
infinite or degenerate. The figure ranges are about 1000x beyond any accelerator or interconnect made so
far, either way; the small end of memory admits the tiny budgets tests use to force pipeline stages on
small models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distplan.errors import PlanError

if TYPE_CHECKING:
    from distplan.cluster import Cluster

__all__ = ["FIGURE_RANGES", "REQUEST_RANGES", "Range", "check_cluster_figures"]


@dataclass(frozen=True, slots=True)
class Range:
    """An accepted range ``[low, high]`` (``(low, high]`` when ``low_open``) of one field, in ``unit``.

    ``integer``: the value must be a whole number (``bool`` is refused: ``True`` is not a batch size).
    """

    low: float
    high: float
    unit: str = ""
    integer: bool = False
    low_open: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"empty range [{self.low}, {self.high}]")

    def text(self) -> str:
        """The range as a message shows it, e.g. ``1 .. 16777216`` or ``> 0 .. 3600 s``."""
        unit = f" {self.unit}" if self.unit else ""

        def num(v: float) -> str:
            return str(int(v)) if self.integer or (float(v).is_integer() and abs(v) < 1e6) else f"{v:g}"

        low = f"> {num(self.low)}" if self.low_open else num(self.low)
        return f"{low} .. {num(self.high)}{unit}"

    def contains(self, value: float) -> bool:
        """Whether ``value`` (a finite number; an integer where ``integer``) lies in the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def check(self, field: str, value: object, *, where: str = "") -> None:
        """Raise :class:`PlanError` naming ``field`` (and ``where``), the value and the range, unless the
        value lies in it."""
        if self.contains(value):  # type: ignore[arg-type]
            return
        kind = "a whole number" if self.integer else "a number"
        at = f"{where}: " if where else ""
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.integer and not isinstance(value, int))
        ):
            raise PlanError(f"{at}{field} must be {kind} in {self.text()}, got {value!r}", field=field)
        shown = str(value) if isinstance(value, int) and abs(value) < 10**15 else f"{value:g}"
        raise PlanError(f"{at}{field} {shown} is outside the accepted range {self.text()}", field=field)


#: Fields of a plan request (``PlanRequest``) and of the model input size the doors trace at.
REQUEST_RANGES: Mapping[str, Range] = {
    "global_batch": Range(1, 2**24, "samples", integer=True),
    "microbatches": Range(1, 2**20, "", integer=True),
    "time_limit_s": Range(0.0, 3600.0, "s", low_open=True),
    "workers": Range(1, 64, "threads", integer=True),
    "batch": Range(1, 65_536, "samples", integer=True),
    "seq": Range(1, 2**20, "tokens", integer=True),
}

#: Figures of a cluster the planner can price (per device kind and per link).
FIGURE_RANGES: Mapping[str, Range] = {
    "peak FLOP/s": Range(1e6, 1e19, "FLOP/s"),
    "memory bandwidth": Range(1e6, 1e16, "B/s"),
    "memory": Range(2**10, 2**50, "bytes"),
    "link bandwidth": Range(1e3, 1e16, "B/s"),
    "link latency": Range(0.0, 60.0, "s"),
    # A time measured by ``distplan profile`` (a calibration curve's point).
    "measured time": Range(1e-9, 1e4, "s"),
}


def check_cluster_figures(cluster: Cluster, *, dtype: str = "fp32") -> None:
    """Raise :class:`PlanError` naming the first figure of ``cluster`` outside :data:`FIGURE_RANGES`
    (device kind or link, the figure, its value and the range)."""
    for name, k in sorted(cluster.kinds.items()):
        where = f"cluster {cluster.name!r}, device kind {name!r}"
        FIGURE_RANGES["peak FLOP/s"].check(f"peak FLOP/s ({dtype})", k.flops(dtype), where=where)
        FIGURE_RANGES["memory bandwidth"].check("memory bandwidth", k.memory_bandwidth_bytes_s, where=where)
        FIGURE_RANGES["memory"].check("memory", k.memory_bytes, where=where)
    links = [(f"host {h.name!r}", h.link) for h in cluster.hosts] + [("network", cluster.network)]
    for name, link in links:
        where = f"cluster {cluster.name!r}, {name} link"
        FIGURE_RANGES["link bandwidth"].check("link bandwidth", link.bandwidth_bytes_s, where=where)
        FIGURE_RANGES["link latency"].check("link latency", link.latency_s, where=where)
