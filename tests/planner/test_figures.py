"""Absurd or extreme cluster figures: a clear PlanError naming the figure, never an overflow or a hang."""

from __future__ import annotations

import pytest

from distplan.errors import InfeasiblePlanError, PlanError
from distplan.planner import plan
from distplan.planner.synthetic import synthetic_transformer
from distplan.units import format_bytes

GRAPH = synthetic_transformer(layers=2, hidden=256, heads=4, seq=64, vocab=500)
KIND = {"name": "x", "memory_gib": 80, "memory_bandwidth_gbyte_s": 2000, "peak_tflops": {"fp32": 100}}


def _cluster(*, kind: dict | None = None, link: dict | None = None, network: dict | None = None) -> dict:
    link = link or {"bandwidth_gbyte_s": 300, "latency_us": 5}
    return {
        "name": "odd",
        "kinds": [kind or KIND],
        "hosts": [{"name": f"h{i}", "devices": [{"kind": "x", "count": 2}], "link": link} for i in range(2)],
        "network": network or {"bandwidth_gbit_s": 100, "latency_us": 20},
    }


def _kind(**fig: object) -> dict:
    """KIND with some figures replaced (given in whichever unit ``fig`` names)."""
    unit_of = {
        "memory_bytes": "memory_gib",
        "memory_bandwidth_bytes_s": "memory_bandwidth_gbyte_s",
        "peak_flops": "peak_tflops",
    }
    base = {k: v for k, v in KIND.items() if k not in {unit_of[f] for f in fig}}
    return {**base, **fig}


@pytest.mark.parametrize(
    ("cluster", "words"),
    [
        (
            _cluster(link={"bandwidth_bytes_s": 1e-300, "latency_us": 5}),
            "host 'h0' link: link bandwidth 1e-300",
        ),
        (
            _cluster(network={"bandwidth_bytes_s": 1e-300, "latency_us": 5}),
            "network link: link bandwidth 1e-300",
        ),
        (_cluster(kind=_kind(peak_flops={"fp32": 1e300})), "peak FLOP/s (fp32) 1e+300"),
        (_cluster(kind=_kind(peak_flops={"fp32": 1e-300})), "peak FLOP/s (fp32) 1e-300"),
        (_cluster(kind=_kind(memory_bandwidth_bytes_s=1e-300)), "memory bandwidth 1e-300"),
        (_cluster(kind=_kind(memory_bytes=1e30)), "memory 1e+30"),
        (_cluster(link={"bandwidth_gbyte_s": 300, "latency_s": 1e6}), "link: link latency 1e+06"),
        (_cluster(network={"bandwidth_gbit_s": 100, "latency_s": 1e6}), "network link: link latency 1e+06"),
    ],
)
def test_absurd_figures_are_named(cluster: dict, words: str) -> None:
    with pytest.raises(PlanError, match="outside the accepted range") as e:
        plan(GRAPH, cluster=cluster, global_batch=4, time_limit_s=2)
    assert words in str(e.value)


def test_one_byte_of_memory_is_refused_by_name() -> None:
    with pytest.raises(PlanError, match=r"device kind 'x': memory 1 is outside the accepted range 1024 \.\."):
        plan(GRAPH, cluster=_cluster(kind=_kind(memory_bytes=1)), global_batch=4, time_limit_s=2)


def test_kibibytes_of_memory_are_infeasible_with_the_shortfall() -> None:
    # Sizes in the unit that shows them (not "0.0 GiB"): 16 bytes per fp32 Adam parameter, 4 devices x 2 KiB.
    need = format_bytes(4 * GRAPH.param_bytes)
    with pytest.raises(InfeasiblePlanError) as e:
        plan(GRAPH, cluster=_cluster(kind=_kind(memory_bytes=2048)), global_batch=4, time_limit_s=2)
    assert f"needs at least {need} across devices" in str(e.value)
    assert f"has 8 KiB usable ({format_bytes(4 * GRAPH.param_bytes - 8192)} short)" in str(e.value)
    assert need.endswith(" MiB")


@pytest.mark.parametrize(
    "cluster",
    [
        # Communication 10^8 times the compute: the integer program's unit grows instead of overflowing.
        _cluster(
            link={"bandwidth_bytes_s": 1e3, "latency_s": 60},
            network={"bandwidth_bytes_s": 1e3, "latency_s": 60},
        ),
        _cluster(kind=_kind(peak_flops={"fp32": 1e19}, memory_bandwidth_bytes_s=1e16)),
    ],
)
def test_extreme_but_supported_figures_still_plan(cluster: dict) -> None:
    p = plan(GRAPH, cluster=cluster, global_batch=4, time_limit_s=2)
    p.check(GRAPH)
    assert p.predictions.iteration_time_s > 0
    assert 0.0 <= p.solver.gap <= 1.0
