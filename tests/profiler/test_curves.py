"""How measured points become curves, and how several ranks' measurements become one calibration."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest

from distplan.calibration import Curve, DeviceCalibration, OpTimes
from distplan.profiler.budget import MODES
from distplan.profiler.compute import Peers, _curve, _Sweep, merge_devices


def test_a_curve_never_falls_and_a_spike_is_averaged_not_carried() -> None:
    # One slow measurement at a small size: a running maximum would lift every larger size to it.
    c = _curve([(1.0, 1.0), (2.0, 9.0), (4.0, 1.0), (8.0, 1.0), (16.0, 20.0)])
    assert all(b >= a for a, b in zip(c.seconds, c.seconds[1:], strict=False))
    pooled = 9.0 ** (1 / 3)  # sizes 2, 4 and 8 pooled geometrically
    assert c.seconds[0] == pytest.approx(1.0)
    assert c.seconds[1:4] == pytest.approx((pooled,) * 3)
    assert c.seconds[-1] == pytest.approx(20.0)
    # Two measurements of one size: their geometric mean, not the larger.
    assert _curve([(1.0, 1.0), (1.0, 4.0)]).seconds == pytest.approx((2.0,))


def test_a_sweep_stops_before_a_size_that_would_take_too_long_and_after_one_that_did() -> None:
    budget = MODES["quick"]  # longest op 10 ms
    limit = budget.max_op_s
    sizes = [10.0**k for k in range(8)]

    def swept(seconds_of: dict[float, float], power: float = 1.0) -> list[float]:
        sweep, seen = _Sweep(sizes, budget, power=power), []
        for v in sweep:
            seen.append(v)
            sweep.took(seconds_of.get(v, 0.0))
        return seen

    # Linear in size: 1e3 takes 0.2 of the limit, so 1e4 (2x the limit, extrapolated) is never run.
    linear = {v: 0.2 * limit * v / 1e3 for v in sizes}
    assert swept(linear) == sizes[:4]
    # Squared (attention's length): 1e2 at 0.05 extrapolates 1e3 to 5x the limit.
    assert swept({v: 0.05 * limit * (v / 1e2) ** 2 for v in sizes}, power=2.0) == sizes[:3]
    # An op slower than extrapolated (out of the cache) ends the sweep right after it.
    jump = {v: (0.05 * limit if v < 1e3 else 3 * limit) for v in sizes}
    assert swept(jump) == sizes[:4]


def test_ranks_sweeping_together_take_every_size_together() -> None:
    """Two ranks whose ops take different times: the slower one's limit stops both at the same size, and
    neither starts a size before the other has finished the one before (their agreement is a barrier)."""
    budget = MODES["quick"]
    limit = budget.max_op_s
    sizes = [10.0**k for k in range(8)]
    gate = threading.Barrier(2)
    flags: list[bool] = [False, False]
    lock = threading.Lock()
    log: list[tuple[int, str, float]] = []

    def any_(rank: int, flag: bool) -> bool:
        flags[rank] = flag
        gate.wait()
        out = any(flags)
        gate.wait()  # both have read before either writes again
        return out

    def run(rank: int, slowdown: float, seen: list[float]) -> None:
        peers = Peers(barrier=gate.wait, any=lambda f: any_(rank, f), min=lambda x: x)
        sweep = _Sweep(sizes, budget, peers=peers)
        for v in sweep:
            with lock:
                log.append((rank, "start", v))
            seen.append(v)
            sweep.took(slowdown * 0.2 * limit * v / 1e3)  # rank 1: 1e3 alone over the limit
            with lock:
                log.append((rank, "end", v))

    seen: list[list[float]] = [[], []]
    threads = [threading.Thread(target=run, args=(r, 1.0 + 9.0 * r, seen[r])) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    # Rank 1's op at 1e2 took 0.2 of the limit, so 1e3 extrapolates to twice it: both ranks stop there,
    # though rank 0 alone would have timed 1e3 too (0.2 of the limit).
    assert seen[0] == seen[1] == sizes[:3]
    alone = _Sweep(sizes, budget)
    assert [alone.took(0.2 * limit * v / 1e3) or v for v in alone] == sizes[:4]
    for v in seen[0]:
        starts = [i for i, (_, what, size) in enumerate(log) if what == "start" and size == v]
        ends_before = [i for i, (_, what, size) in enumerate(log) if what == "end" and size < v]
        assert all(e < min(starts) for e in ends_before)


def _dev(scale: float, sizes: tuple[float, ...] = (1.0, 10.0, 100.0)) -> DeviceCalibration:
    def times(rate: float) -> OpTimes:
        c = Curve(sizes, tuple(scale * x / rate for x in sizes))
        return OpTimes(c, c)

    return DeviceCalibration(
        ops={"elementwise": times(1.0)},
        matmul={"fp32": times(10.0)},
        stream=times(2.0),
        row_matmul={4: times(3.0)},
        optimizer={"adam": Curve(sizes, tuple(scale * x for x in sizes))},
        source="rank",
    )


def test_ranks_measuring_at_once_are_pooled_into_one_curve_per_op() -> None:
    a, b = _dev(1.0), _dev(4.0)
    m = merge_devices([a, b])
    for got, x, y in [
        (m.ops["elementwise"].fwd, a.ops["elementwise"].fwd, b.ops["elementwise"].fwd),
        (m.matmul["fp32"].bwd, a.matmul["fp32"].bwd, b.matmul["fp32"].bwd),
        (m.row_matmul[4].fwd, a.row_matmul[4].fwd, b.row_matmul[4].fwd),
        (m.optimizer["adam"], a.optimizer["adam"], b.optimizer["adam"]),
    ]:
        assert got.sizes == x.sizes
        assert got.seconds == pytest.approx(
            [math.sqrt(p * q) for p, q in zip(x.seconds, y.seconds, strict=True)]
        )
    assert m.stream is not None and m.stream.fwd.seconds[0] == pytest.approx(1.0)  # sqrt(0.5 * 2.0)
    assert m.source == "rank" and merge_devices([a]) is a
    # A size only one rank reached stays; a table entry one rank lacks is dropped.
    longer = _dev(1.0, (1.0, 10.0, 100.0, 1000.0))
    short = dataclasses.replace(_dev(1.0), row_matmul={})
    m = merge_devices([longer, short])
    assert m.ops["elementwise"].fwd.sizes == (1.0, 10.0, 100.0, 1000.0)
    assert m.row_matmul == {}
