"""Short human text for numbers and names: the one place the report page, the demo, the progress line and
the CLI tables format durations, sizes, FLOPs, counts, parallel degrees, layer lists and device lists.

    >>> format_seconds(0.0123), format_bytes(3.5 * 2**20), format_count(124_439_808)
    ('12.3 ms', '3.5 MiB', '124M')
    >>> layer_summary(["transformer.wte", "transformer.h.0.attn", "transformer.h.1.mlp"])
    'wte, h.0–h.1'

Pure functions of their arguments (no torch, no I/O), so any layer that shows text may use them; the
planner keeps to its own messages and does not import presentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from distplan.units import format_bytes as _core_bytes

if TYPE_CHECKING:
    from distplan.plan import Plan

__all__ = [
    "device_ranges",
    "format_bytes",
    "format_count",
    "format_degrees",
    "format_elapsed",
    "format_flops",
    "format_seconds",
    "layer_summary",
    "plural",
    "short_module",
]


def format_seconds(s: float | None) -> str:
    """A duration in seconds as ``812 µs``, ``12.3 ms``, ``528 ms``, ``1.25 s``: three significant digits
    (whole microseconds below 1 ms, whole milliseconds from 100 ms to 1 s), ``0 s`` for zero, ``-`` for
    ``None``."""
    if s is None:
        return "-"
    if s == 0:
        return "0 s"
    if abs(s) < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if abs(s) < 1:
        return f"{s * 1e3:.3g} ms" if abs(s) < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.3g} s"


def format_elapsed(s: float) -> str:
    """Wall time a person waited, in seconds with one decimal: ``3.2 s`` (a clock, so fixed precision,
    unlike :func:`format_seconds`)."""
    return f"{s:.1f} s"


def format_bytes(n: float | None) -> str:
    """A size in bytes in binary units, three significant digits: ``512 B``, ``3.5 MiB``, ``71.4 GiB``;
    ``-`` for ``None`` (core's :func:`distplan.units.format_bytes`, which the planner's messages use too)."""
    return "-" if n is None else _core_bytes(n)


def format_degrees(plan: Plan) -> str:
    """The parallel degrees of a plan in a few words: ``dp 4`` where every stage shares one data-parallel
    degree and has no tensor parallelism, else each stage's ``dp x tp`` (``dp/tp 2x1, 1x2``)."""
    if plan.uniform_dp:
        return f"dp {plan.stages[0].dp}"
    return "dp/tp " + ", ".join(f"{s.dp}x{s.tp}" for s in plan.stages)


def format_flops(n: float) -> str:
    """A floating-point operation count in decimal units: ``900 FLOP``, ``1.2 kFLOP``, ``3.26 TFLOP``."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def format_count(n: float) -> str:
    """A count such as a model's parameters, the way model cards write it: ``184K``, ``124M``, ``1.56B``
    (three significant digits, whole numbers from 100 up)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def plural(count: int, one: str, many: str | None = None) -> str:
    """``1 stage``, ``2 stages``; ``many`` for irregular plurals (``microbatches``)."""
    return f"{count} {one if count == 1 else (many or one + 's')}"


def short_module(fqn: str) -> str:
    """A tile label: the last name of a module path, with its parent when the last is a layer number
    (``transformer.h.3`` -> ``h.3``); ``(root)`` for the root module ``""``."""
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
    left out. A list longer than ``max_chars`` shows its first and last part and the count.
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
    """Device indices as runs: ``d0–d7, d9`` for devices 0..7 and 9 (in the order given)."""
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
