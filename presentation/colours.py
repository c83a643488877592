"""The colours of every picture of a plan (report page, timeline SVG/PNG).

[Note: report colours]
A stage's colour is ``STAGE_COLOURS[index % len(STAGE_COLOURS)]`` everywhere (cluster, stages, model,
timeline); forward is drawn as a light tint of it and backward in full, so both read as "this stage".
Communication is drawn as a band in the lower part of a row (amber for sends, near-black for the
gradient all-reduce), the optimizer step slate grey, idle light grey: none of them is a stage colour.
"""

from __future__ import annotations

__all__ = [
    "ALLREDUCE",
    "COMM",
    "IDLE",
    "OPTIMIZER",
    "STAGE_COLOURS",
    "UNUSED",
    "stage_colour",
    "tint",
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
#: A device no stage uses.
UNUSED = "#cbd5e1"
#: A timeline row's background: time the device waits.
IDLE = "#eef1f5"
#: Sends and receives between stages.
COMM = "#f59e0b"
#: The data-parallel gradient all-reduce.
ALLREDUCE = "#0f172a"
#: The optimizer step.
OPTIMIZER = "#64748b"


def stage_colour(index: int) -> str:
    """The ``#rrggbb`` colour of stage ``index`` (see [Note: report colours])."""
    return STAGE_COLOURS[index % len(STAGE_COLOURS)]


def tint(colour: str, amount: float) -> str:
    """Mix a ``#rrggbb`` colour with white: ``amount`` 0 keeps it, 1 gives white."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)
