"""Hand-made calibrations for the tests (torch-free, deterministic): a slow 'device' whose every op class has
a curve, and a link with point-to-point and collective times."""

from __future__ import annotations

from distplan.calibration import Calibration, Curve, DeviceCalibration, LinkCalibration, OpTimes


def curve(rate: float, floor_s: float, sizes: tuple[float, ...] = (1e3, 1e5, 1e7, 1e9)) -> Curve:
    """A curve that reaches ``rate`` units/s at large sizes and never goes below ``floor_s``."""
    return Curve(sizes, tuple(floor_s + x / rate for x in sizes))


def op_times(rate: float, floor_s: float, bwd_factor: float = 2.0) -> OpTimes:
    return OpTimes(curve(rate, floor_s), curve(rate / bwd_factor, 2 * floor_s))


def device_calibration(scale: float = 1.0) -> DeviceCalibration:
    """A device ``scale`` times slower than the reference one."""
    return DeviceCalibration(
        ops={
            "elementwise": op_times(2e9 / scale, 5e-6 * scale),
            "norm": op_times(1.5e9 / scale, 6e-6 * scale),
            "embedding": op_times(3e9 / scale, 4e-6 * scale),
            "view": OpTimes(Curve((1.0,), (1.5e-6 * scale,)), Curve((1.0,), (3e-6 * scale,))),
        },
        matmul={"fp32": op_times(5e10 / scale, 8e-6 * scale)},
        targets={"aten.tanh.default": op_times(2e8 / scale, 9e-6 * scale)},
        attention={"fp32": op_times(3e10 / scale, 2e-5 * scale)},
        attention_kernel="flash",
        stream=op_times(1e10 / scale, 3e-6 * scale),
        cache_bytes=16 << 20,
        microbatch_fwd_s=1e-4 * scale,
        microbatch_bwd_s=5e-5 * scale,
        boundary_fwd_s=2e-4 * scale,
        boundary_bwd_s=1.5e-4 * scale,
        step_s=3e-4 * scale,
        in_graph=(8e-6 * scale, 1.5e-10 * scale, 0.0, 0.0),
        optimizer={"adam": curve(1e9 / scale, 2.5e-5 * scale), "sgd": curve(4e9 / scale, 4e-6 * scale)},
        threads=1,
        device_name="hand-made test device",
        source="tests/core/calibration_data.py",
    )


def link_calibration(scope: str = "intra-host") -> LinkCalibration:
    sizes = (4.0, 4e3, 4e6, 4e7)
    return LinkCalibration(
        backend="gloo",
        scope=scope,
        p2p=Curve(sizes, tuple(6e-5 + x / 2e9 for x in sizes)),
        collectives={
            "all_reduce": {2: Curve(sizes, tuple(2e-4 + x / 1e9 for x in sizes))},
            "all_gather": {2: Curve(sizes, tuple(1.5e-4 + x / 1.5e9 for x in sizes))},
            "reduce_scatter": {2: Curve(sizes, tuple(1.5e-4 + x / 1.5e9 for x in sizes))},
        },
        source="tests/core/calibration_data.py",
    )


def calibration(kind: str = "cpu-epyc-2core", *, link: bool = True, scale: float = 1.0) -> Calibration:
    return Calibration(
        kind=kind,
        device=device_calibration(scale),
        link=link_calibration() if link else None,
        meta={"host": "test", "mode": "quick"},
    )
