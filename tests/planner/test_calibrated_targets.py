"""Operators with curves of their own (``DeviceCalibration.targets``) are priced by them, not by their class."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distplan.calibration import Calibration, Curve, DeviceCalibration, OpTimes
from distplan.graph import OpNode, TensorMeta, make_graph
from distplan.planner import CostModel
from distplan.profiles import load_cluster


def _times(rate: float, floor: float) -> OpTimes:
    sizes = (1e2, 1e5, 1e8)
    return OpTimes(
        Curve(sizes, tuple(floor + x / rate for x in sizes)),
        Curve(sizes, tuple(2 * floor + 2 * x / rate for x in sizes)),
    )


def test_an_operator_with_its_own_curve_is_priced_by_it() -> None:
    shape = (4, 256)
    nbytes = 4 * 4 * 256

    def node(name: str, target: str, inputs: tuple[str, ...], moved: int, **kw: object) -> OpNode:
        op = "placeholder" if target == "input" else "call_function"
        return OpNode(
            name, op, target, "m", inputs, (TensorMeta(shape, "float32", nbytes),), bytes_moved=moved, **kw
        )  # type: ignore[arg-type]

    nodes = [
        node("x", "input", (), 0),
        node("s", "aten.mul.Tensor", ("x",), 3 * nbytes, params=("scale",), param_bytes=4),
        node("t", "aten.tanh.default", ("s",), 2 * nbytes),
        node("a", "aten.add.Tensor", ("t", "s"), 3 * nbytes),
    ]
    g = make_graph("g", nodes, outputs=("a",), param_sizes={"scale": 4})
    elem, tanh = _times(4e9, 4e-6), _times(2e8, 9e-6)  # tanh: 20x slower per byte than an add
    dev = DeviceCalibration(
        ops={"elementwise": elem, "norm": elem, "view": _times(1e12, 1e-6)},
        matmul={"fp32": _times(1e10, 5e-6)},
        targets={"aten.tanh.default": tanh},
    )
    base = load_cluster("cpu-local")
    cost = CostModel(g, base.calibrated(Calibration(kind="cpu-epyc-2core", device=dev)))
    f, b = cost.time_prefix("cpu-epyc-2core", 1)
    fwd, bwd = np.diff(f), np.diff(b)
    assert fwd[2] == pytest.approx(tanh.fwd.time(2 * nbytes)) and bwd[2] == pytest.approx(
        tanh.bwd.time(2 * nbytes)
    )
    assert fwd[1] == pytest.approx(elem.fwd.time(3 * nbytes))  # the class curve
    assert fwd[2] > 5 * elem.fwd.time(2 * nbytes)
    # What ops cost inside a whole model: a fixed cost per node and per byte of output, on every op node.
    per_node, per_byte = 7e-6, 2e-10
    inside = dataclasses.replace(dev, in_graph=(per_node, per_byte, 3e-6, 0.0))
    cost2 = CostModel(g, base.calibrated(Calibration(kind="cpu-epyc-2core", device=inside)))
    f2, b2 = cost2.time_prefix("cpu-epyc-2core", 1)
    extra_f, extra_b = np.diff(f2) - fwd, np.diff(b2) - bwd
    assert extra_f[0] == 0 and extra_b[0] == 0  # the input runs nothing
    assert extra_f[1:] == pytest.approx([per_node + per_byte * nbytes] * 3)
    assert extra_b[1:] == pytest.approx([3e-6] * 3)
    assert cost2.in_graph_counts() == (3.0, 3.0 * nbytes, 3.0, 3.0 * nbytes)
