"""Calibration data (``distplan.calibration``): round trips, interpolation, errors that name file and field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from calibration_data import calibration, curve, link_calibration

from distplan.calibration import Calibration, Curve, LinkCalibration, op_class
from distplan.errors import CalibrationError, ProfileError


def test_calibration_file_round_trips(tmp_path: Path) -> None:
    cal = calibration()
    f = tmp_path / "cal.json"
    cal.save(f)
    back = Calibration.load(f)
    assert back == cal
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    assert back.to_json() == cal.to_json()
    link_only = Calibration(kind="x", link=link_calibration("network"))
    assert Calibration.from_json(link_only.to_json()) == link_only


def test_curve_interpolates_in_log_log_and_extrapolates_at_the_last_throughput() -> None:
    c = Curve((10.0, 1000.0), (1e-5, 1e-3))  # time proportional to size between the points
    assert c.time(1.0) == 1e-5  # below: the smallest measured time (the fixed cost)
    assert c.time(100.0) == pytest.approx(1e-4)  # a power law between neighbours
    assert c.time(1e5) == pytest.approx(0.1)  # above: the last throughput
    bent = Curve((1.0, 100.0), (1e-6, 1e-4 * 4))
    assert bent.time(10.0) == pytest.approx(math.sqrt(1e-6 * 4e-4))
    assert curve(1e9, 1e-6).rate(1e9) < 1e9


def test_collective_of_an_unmeasured_world_size_scales_by_the_ring() -> None:
    link = link_calibration()
    two = link.collective_time("all_reduce", 4e6, 2)
    assert two == link.collectives["all_reduce"][2].time(4e6)
    four = link.collective_time("all_reduce", 4e6, 4)
    assert four is not None and two is not None
    lat = link.collectives["all_reduce"][2].seconds[0]
    assert four == pytest.approx(lat * 3 + (two - lat) * (3 / 4) / (1 / 2))
    assert link.collective_time("all_reduce", 4e6, 1) == 0.0
    assert (
        LinkCalibration(backend="gloo", scope="intra-host", p2p=link.p2p).collective_time("all_reduce", 8, 2)
        is None
    )


@pytest.mark.parametrize(
    ("target", "flops", "nbytes", "cls"),
    [
        ("aten.linear.default", 100, 10, "matmul"),
        ("aten.addmm.default", 100, 10, "matmul"),
        ("aten.bmm.default", 100, 10, "matmul"),
        ("aten.scaled_dot_product_attention.default", 100, 10, "attention"),
        ("aten.layer_norm.default", 0, 10, "norm"),
        ("aten._softmax.default", 0, 10, "norm"),
        ("aten.embedding.default", 0, 10, "embedding"),
        ("aten.gelu.default", 0, 10, "elementwise"),
        ("aten.add.Tensor", 0, 10, "elementwise"),
        ("aten.view.default", 0, 0, "view"),
        ("aten.transpose.int", 0, 0, "view"),
        ("aten.mm.default", 0, 10, "elementwise"),  # an empty matmul moves bytes, does no arithmetic
    ],
)
def test_op_class(target: str, flops: int, nbytes: int, cls: str) -> None:
    assert op_class(target, fwd_flops=flops, bytes_moved=nbytes) == cls


def _write(tmp_path: Path, data: object) -> Path:
    f = tmp_path / "bad-cal.json"
    f.write_text(json.dumps(data))
    return f


def test_malformed_calibration_names_file_and_field(tmp_path: Path) -> None:
    good = calibration().to_dict()

    def broken(edit: object) -> Path:
        d = json.loads(json.dumps(good))
        edit(d)  # type: ignore[operator]
        return _write(tmp_path, d)

    cases = [
        (
            lambda d: d["device"]["matmul"]["fp32"]["fwd"]["sizes"].__setitem__(1, 1.0),
            r"bad-cal.json: calibration.device.matmul.fp32.fwd.sizes\[1\]: sizes must increase strictly",
        ),
        (
            lambda d: d["device"]["ops"]["norm"]["bwd"]["seconds"].__setitem__(0, -1),
            r"bad-cal.json: calibration.device.ops.norm.bwd.seconds\[0\]: expected a positive number, got -1",
        ),
        (
            lambda d: d["device"]["ops"].__setitem__("conv3d", d["device"]["ops"]["norm"]),
            r"bad-cal.json: calibration.device.ops: unknown op class 'conv3d'",
        ),
        (
            lambda d: d["device"]["matmul"].__setitem__("int4", d["device"]["matmul"]["fp32"]),
            r"bad-cal.json: calibration.device.matmul: unknown precision 'int4'",
        ),
        (
            lambda d: d["device"].__setitem__("attention_kernel", "magic"),
            r"bad-cal.json: calibration.device.attention_kernel: expected one of flash, efficient, cudnn, math",
        ),
        (
            lambda d: d["link"]["collectives"].__setitem__("broadcast", {}),
            r"bad-cal.json: calibration.link.collectives.broadcast: unknown collective 'broadcast'",
        ),
        (
            lambda d: d["link"]["collectives"]["all_reduce"].__setitem__("one", d["link"]["p2p"]),
            r"bad-cal.json: calibration.link.collectives.all_reduce: world size 'one' is not an integer",
        ),
        (
            lambda d: d["link"].__setitem__("scope", "rack"),
            r"calibration.link.scope: expected one of intra-host",
        ),
        (lambda d: d["link"].pop("p2p"), r"bad-cal.json: calibration.link.p2p: missing required field"),
        (lambda d: d.__setitem__("schema_version", 7), r"calibration.schema_version: 7 is not supported"),
        (lambda d: d.pop("kind"), r"bad-cal.json: calibration.kind: missing required field"),
        (
            lambda d: d["device"]["targets"].__setitem__("tanh", d["device"]["ops"]["norm"]),
            r"bad-cal.json: calibration.device.targets: 'tanh' is not an ATen operator name",
        ),
        (
            lambda d: d.update(device=None, link=None),
            r"bad-cal.json: calibration.device: missing, and so is link",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(CalibrationError, match=message):
            Calibration.load(broken(edit))
    f = tmp_path / "not-json.json"
    f.write_text("{ nope")
    with pytest.raises(CalibrationError, match=r"not-json.json: calibration JSON is not valid JSON"):
        Calibration.load(f)
    with pytest.raises(CalibrationError, match=r"cannot read calibration file '.*missing.json'"):
        Calibration.load(tmp_path / "missing.json")
    # A calibration error is a profile error: the CLI and the service treat it as the user's.
    assert issubclass(CalibrationError, ProfileError)
