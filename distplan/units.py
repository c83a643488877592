"""Sizes as text for messages: the one byte formatter of distplan's core.

Every message that states memory (the planner's infeasibility errors, ``Plan.check``, the CLI tables) uses
:func:`format_bytes`, so a budget of a few KiB reads ``20.5 KiB`` rather than ``0.0 GiB``: each number gets
the binary unit that shows its leading digits.

    >>> format_bytes(21_474), format_bytes(3.5 * 2**20), format_bytes(16.3 * 2**30), format_bytes(512)
    ('21 KiB', '3.5 MiB', '16.3 GiB', '512 B')
    >>> format_bytes(-1536)
    '-1.5 KiB'
"""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n: float, digits: int = 3) -> str:
    """``n`` bytes in the largest binary unit (KiB = 1024 B ... PiB) it reaches, with ``digits`` significant
    digits (trailing zeros dropped); whole bytes below 1 KiB. Negative sizes keep their sign."""
    if n != n:  # NaN: say so rather than print a misleading number
        return "nan B"
    for unit, scale in _UNITS:
        if abs(n) >= scale:
            v = n / scale
            text = f"{v:.{digits}g}"
            # 1000-1023 of a unit: whole units, not an exponent.
            return f"{text if 'e' not in text else f'{v:.0f}'} {unit}"
    return f"{n:.0f} B"
