"""How long ``distplan profile`` measures: the three modes (``--quick``, default, ``--thorough``).

A mode fixes how many sizes each curve gets, how long ``torch.utils.benchmark`` repeats each measurement
(it warms up, then repeats blocks of calls for at least ``min_run_time`` and reports the median), and the
largest single op and transfer it times (a curve stops before a size whose op would take longer). The
default takes about two minutes on a 2-core CPU (115-129 s here, with the runs of the runtime's own
costs), ``quick`` about 45 s.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODES", "Budget"]


@dataclass(frozen=True, slots=True)
class Budget:
    """Measurement effort of one mode.

    Attributes:
        name: ``quick``, ``default`` or ``thorough``.
        min_run_time_s: seconds ``blocked_autorange`` repeats each measurement for (the median of its blocks
            is kept).
        points_per_decade: sizes per factor of 10 on every curve (geometric).
        max_op_s: the longest op timed: a curve stops before a size whose forward, extrapolated from the
            size before it, would take longer, or after one that did (beyond it the curve extrapolates at
            the last throughput).
        max_transfer_bytes: the largest message timed on a link.
        link_repeats: repeats (median kept) of each link measurement, all ranks in lock step.
    """

    name: str
    min_run_time_s: float
    points_per_decade: float
    max_op_s: float
    max_transfer_bytes: int
    link_repeats: int


MODES: dict[str, Budget] = {
    "quick": Budget("quick", 0.02, 1.0, 0.01, 1 << 22, 3),
    "default": Budget("default", 0.06, 1.5, 0.05, 1 << 25, 5),
    "thorough": Budget("thorough", 0.4, 3.0, 0.5, 1 << 28, 9),
}
