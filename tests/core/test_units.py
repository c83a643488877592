"""The one byte formatter of distplan's messages: every size readable, whatever its magnitude."""

from __future__ import annotations

import pytest

from distplan.units import format_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (21_474, "21 KiB"),  # the 0.00002 GiB budget of a test cluster, once printed as "0.0 GiB"
        (3.5 * 2**20, "3.5 MiB"),
        (16.3 * 2**30, "16.3 GiB"),
        (1023.9 * 2**30, "1024 GiB"),
        (2.5 * 2**40, "2.5 TiB"),
        (-1536, "-1.5 KiB"),
    ],
)
def test_format_bytes_picks_the_unit_that_shows_the_number(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_more_digits_on_request() -> None:
    assert format_bytes(15.0312 * 2**30, digits=5) == "15.031 GiB"
