"""One live progress line on stderr for long CLI work (solving, validating), shared by every command.

    >>> from distplan.presentation.progress import ProgressLine
    >>> with ProgressLine("solving", json_out=False) as show:          # doctest: +SKIP
    ...     plan = distplan.plan(graph, cluster="a100x8-v100x8", global_batch=64, progress=show)

A :class:`ProgressLine` is a ``progress=`` callback: the planner and the validation call it with whatever
event they emit (a dataclass such as the planner's ``SolverProgress``, a mapping, or a plain string) and
:func:`describe` turns it into one short line — ``best 212 ms · bound 198 ms · gap 6.6% · 3.2 s``. The line
is drawn with rich on stderr, and only when it helps a person: never with ``--json``, never when stderr is
not a terminal (pipes, CI, tests), never with ``DISTPLAN_PROGRESS=0``. Then the callback does nothing, so
the commands' output stays exactly the same either way.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

from distplan.presentation.formatting import format_elapsed, format_seconds

__all__ = ["ProgressLine", "describe", "progress_wanted"]

# Event fields that mean the same thing under different names, in display order.
_TIME_FIELDS = (
    ("best", ("best_objective_s", "objective_s", "best_s", "objective", "best_objective")),
    ("bound", ("best_bound_s", "bound_s", "bound", "best_bound")),
)
_GAP_FIELDS = ("gap",)
_ELAPSED_FIELDS = ("elapsed_s", "wall_s", "seconds", "elapsed")
_COUNT_FIELDS = (("step", "total"), ("done", "total"), ("rank", "ranks"), ("solutions", None))
_TEXT_FIELDS = ("phase", "label", "stage", "message", "status", "what")


def progress_wanted(*, json_out: bool = False, stream: IO[str] | None = None) -> bool:
    """Whether to show live progress: not for ``--json``, only on a terminal, and not with
    ``DISTPLAN_PROGRESS=0`` in the environment."""
    if json_out or os.environ.get("DISTPLAN_PROGRESS", "").strip() == "0":
        return False
    s = stream if stream is not None else sys.stderr
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _fields(event: Any) -> dict[str, Any]:
    if isinstance(event, Mapping):
        return dict(event)
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    if hasattr(event, "_asdict"):  # NamedTuple
        return dict(event._asdict())
    return {}


def describe(event: Any, *, elapsed: bool = True) -> str:
    """One short line for a progress event (see the module docstring); unknown fields show as
    ``name=value``. ``elapsed=False`` leaves out the event's own elapsed time (a display that shows its
    own clock)."""
    if event is None:
        return ""
    if isinstance(event, str):
        return event
    f = _fields(event)
    if not f:
        return str(event)
    parts: list[str] = []
    used: set[str] = set()
    for key in _TEXT_FIELDS:
        v = f.get(key)
        if isinstance(v, str) and v:
            parts.append(v)
            used.add(key)
    for a, b in _COUNT_FIELDS:
        if a in f and isinstance(f[a], int) and not isinstance(f[a], bool):
            if b is not None and isinstance(f.get(b), int):
                parts.append(f"{a} {f[a]}/{f[b]}")
                used.update((a, b))
            elif b is None:
                parts.append(f"{f[a]} {a}")
                used.add(a)
    for label, names in _TIME_FIELDS:
        for n in names:
            v = f.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{label} {format_seconds(float(v))}" if n.endswith("_s") else f"{label} {v:g}")
                used.update(names)
                break
    for n in _GAP_FIELDS:
        v = f.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"gap {v * 100:.1f}%")
            used.add(n)
    took = None
    for n in _ELAPSED_FIELDS:
        v = f.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            took = format_elapsed(float(v))
            used.update(_ELAPSED_FIELDS)
            break
    for k, v in f.items():
        if k in used or v is None or isinstance(v, (list, tuple, dict)):
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    if took is not None and elapsed:
        parts.append(took)
    return " · ".join(parts)


class ProgressLine:
    """A live one-line status on stderr (rich spinner), usable as a ``progress=`` callback.

    Args:
        title: what is being done (``solving``, ``validating on 4 CPU ranks``).
        json_out: the command prints JSON: stay quiet.
        enabled: force on or off; by default :func:`progress_wanted` decides.

    Outside a ``with`` block, or when disabled, calling it does nothing. :meth:`set_title` starts the next
    phase; the elapsed time shown is per phase.
    """

    def __init__(self, title: str, *, json_out: bool = False, enabled: bool | None = None) -> None:
        self.title = title
        self.enabled = progress_wanted(json_out=json_out) if enabled is None else enabled
        self._status: Any = None
        self._started = time.monotonic()
        self.last = ""

    def __enter__(self) -> ProgressLine:
        self._started = time.monotonic()
        if self.enabled:
            from rich.console import Console

            console = Console(stderr=True)
            # A renderable that rebuilds its text at every refresh, so the elapsed time ticks between events.
            self._status = console.status(_LiveText(self), spinner="dots")
            self._status.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def text(self) -> str:
        """The line as rich markup: title, last event, elapsed seconds of this phase."""
        from rich.markup import escape

        elapsed = time.monotonic() - self._started
        tail = f" — {escape(self.last)}" if self.last else ""
        return f"[bold]{escape(self.title)}[/bold]{tail} [dim]({elapsed:.0f} s)[/dim]"

    def set_title(self, title: str) -> None:
        """Start the next phase (resets the elapsed time)."""
        self.title = title
        self._started = time.monotonic()
        self.last = ""

    def __call__(self, event: Any = None) -> None:
        self.last = describe(event, elapsed=False)


class _LiveText:
    """Rich renderable of a :class:`ProgressLine`'s current text (``__rich__`` is called at each refresh)."""

    def __init__(self, line: ProgressLine) -> None:
        self._line = line

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text.from_markup(self._line.text())
