"""The cost model with calibrations (``distplan profile`` files): what it prices, and what it leaves alone.

Calibrations here are made by hand (torch-free and deterministic): every curve is ``floor + size / rate``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distplan.calibration import Calibration, Curve, DeviceCalibration, LinkCalibration, OpTimes
from distplan.cluster import Cluster
from distplan.errors import CalibrationError, PlanError
from distplan.graph import OpNode, TensorMeta, make_graph
from distplan.plan import Plan, PlanRequest
from distplan.planner import CostModel, evaluate, plan
from distplan.planner.synthetic import synthetic_transformer
from distplan.profiles import load_cluster

SIZES = (1e2, 1e4, 1e6, 1e8, 1e10)


def _curve(rate: float, floor: float) -> Curve:
    return Curve(SIZES, tuple(floor + x / rate for x in SIZES))


def _times(rate: float, floor: float) -> OpTimes:
    return OpTimes(_curve(rate, floor), _curve(rate / 2, 2 * floor))


def _device(scale: float = 1.0, kernel: str = "flash") -> DeviceCalibration:
    return DeviceCalibration(
        ops={
            "elementwise": _times(4e9 / scale, 4e-6 * scale),
            "norm": _times(3e9 / scale, 5e-6 * scale),
            "embedding": _times(5e9 / scale, 3e-6 * scale),
            "view": OpTimes(Curve((1.0,), (1e-6 * scale,)), Curve((1.0,), (2e-6 * scale,))),
        },
        matmul={"fp32": _times(4e10 / scale, 6e-6 * scale)},
        attention={"fp32": _times(2e10 / scale, 1e-5 * scale)},
        stream=_times(1e10 / scale, 3e-6 * scale),
        attention_kernel=kernel,
        microbatch_fwd_s=8e-5,
        microbatch_bwd_s=6e-5,
        optimizer={"adam": _curve(2e9, 2e-5)},
        source="hand-made",
    )


def _link(scope: str = "intra-host") -> LinkCalibration:
    return LinkCalibration(
        backend="gloo",
        scope=scope,
        p2p=_curve(2e9, 5e-5),
        collectives={"all_reduce": {2: _curve(1e9, 2e-4)}},
        source="hand-made",
    )


CPU_YAML = """name: lab
hosts:
  - name: box
    devices: [{kind: cpu-epyc-2core, count: 2}]
    link: {bandwidth_gbyte_s: 5, latency_us: 50}
"""


def _write(tmp: Path, cal: Calibration, extra: str = "") -> Path:
    (tmp / "cpu.json").write_text(cal.to_json())
    y = tmp / "lab.yaml"
    y.write_text(CPU_YAML + "calibrations: [cpu.json]\n" + extra)
    return y


def test_cluster_yaml_attaches_a_calibration_file_and_round_trips(tmp_path: Path) -> None:
    cal = Calibration(kind="cpu-epyc-2core", device=_device(), link=_link())
    c = load_cluster(_write(tmp_path, cal))
    assert c.kinds["cpu-epyc-2core"].calibration == cal.device
    assert c.hosts[0].link.calibration == cal.link and c.network.calibration == cal.link
    assert Cluster.from_dict(json.loads(c.to_json())) == c
    report = c.calibration_report()
    assert report["kind cpu-epyc-2core"].startswith("calibrated") and report["host box link"].startswith(
        "calibrated"
    )
    plain = load_cluster({"name": "lab", **_yaml_dict()})
    assert plain.calibration_report() == {"kind cpu-epyc-2core": "datasheet", "host box link": "datasheet"}
    # An uncalibrated cluster's dictionary has no calibration keys (plan ids stay as they were).
    assert "calibration" not in json.dumps(plain.to_dict())


def _yaml_dict() -> dict[str, Any]:
    import yaml

    d = yaml.safe_load(CPU_YAML)
    d.pop("name")
    return dict(d)


def test_unknown_kind_or_malformed_calibration_names_file_and_field(tmp_path: Path) -> None:
    other = Calibration(kind="h100-sxm-80g", device=_device())
    with pytest.raises(
        CalibrationError,
        match=r"lab.yaml: cluster.calibrations\[0\] \(cpu.json\).kind: device kind 'h100-sxm-80g' is not used by "
        r"cluster 'lab'",
    ):
        load_cluster(_write(tmp_path, other))
    bad = Calibration(kind="cpu-epyc-2core", device=_device()).to_dict()
    bad["device"]["ops"]["norm"]["fwd"]["seconds"][2] = "slow"
    (tmp_path / "cpu.json").write_text(json.dumps(bad))
    with pytest.raises(
        CalibrationError,
        match=r"lab.yaml: \S*cpu.json: calibration.device.ops.norm.fwd.seconds\[2\]: expected a positive number",
    ):
        load_cluster(tmp_path / "lab.yaml")
    bad = Calibration(kind="cpu-epyc-2core", device=_device()).to_dict()
    bad["device"]["boundary_bwd_s"] = -2e-4
    (tmp_path / "cpu.json").write_text(json.dumps(bad))
    with pytest.raises(
        CalibrationError,
        match=r"cpu.json: .*calibration.device.boundary_bwd_s: expected a number >= 0(\.0)?, got -0.0002",
    ):
        load_cluster(tmp_path / "lab.yaml")
    (tmp_path / "lab.yaml").write_text(CPU_YAML + "calibrations: [missing.json]\n")
    with pytest.raises(CalibrationError, match=r"lab.yaml: cannot read calibration file '.*missing.json'"):
        load_cluster(tmp_path / "lab.yaml")
    # Inline (the REST door): contents only, never a path.
    with pytest.raises(CalibrationError, match=r"cluster.calibrations\[0\]: 'cpu.json' is a file name"):
        load_cluster({"name": "lab", **_yaml_dict(), "calibrations": ["cpu.json"]})
    # Two calibrations of one kind, and a link part that fits no host.
    two = [Calibration(kind="cpu-epyc-2core", device=_device()).to_dict()] * 2
    with pytest.raises(CalibrationError, match=r"calibrations\[1\].kind: a second calibration"):
        load_cluster({"name": "lab", **_yaml_dict(), "calibrations": two})
    mixed = load_cluster(
        {
            "name": "one-box",
            "hosts": [
                {
                    "name": "h",
                    "devices": [{"kind": "a100-sxm-80g", "count": 2}, {"kind": "t4-16g", "count": 2}],
                    "link": {"bandwidth_gbyte_s": 16},
                }
            ],
        }
    )
    with pytest.raises(CalibrationError, match=r"calibrations\[0\].link: .* no host of cluster 'one-box'"):
        mixed.calibrated(Calibration(kind="t4-16g", link=_link()))
    # The old per-class factors are refused with what to do instead.
    kinds = [{"name": "x", "memory_gib": 8, "memory_bandwidth_gbyte_s": 100, "peak_tflops": {"fp32": 1}}]
    with pytest.raises(
        CalibrationError, match=r"calibration: per-class correction factors .*distplan profile"
    ):
        load_cluster(
            {"name": "y", "kinds": [{**kinds[0], "calibration": {"matmul": 1.2}}], "hosts": [_host("x")]}
        )


def _host(kind: str) -> dict[str, Any]:
    return {"name": "h", "devices": [{"kind": kind, "count": 2}], "link": {"bandwidth_gbyte_s": 10}}


def test_a_calibrated_plan_differs_only_in_its_priced_times() -> None:
    g = synthetic_transformer(layers=4, hidden=256, heads=4, seq=64, vocab=1000)
    plain = load_cluster({"name": "lab", **_yaml_dict()})
    cal = Calibration(kind="cpu-epyc-2core", device=_device(), link=_link())
    calibrated = plain.calibrated(cal)
    layout = f"1f1b m4x1 | 0:{len(g) // 2}@0 | {len(g) // 2}:{len(g)}@1"
    a = evaluate(g, cluster=plain, layout=layout, global_batch=4)
    b = evaluate(g, cluster=calibrated, layout=layout, global_batch=4)
    timed = {
        "fwd_time_s",
        "bwd_time_s",
        "send_time_s",
        "grad_send_time_s",
        "allreduce_time_s",
        "optimizer_time_s",
        "tied_allreduce_time_s",
    }
    for sa, sb in zip(a.stages, b.stages, strict=True):
        da, db = sa.to_dict(), sb.to_dict()
        assert {k: v for k, v in da.items() if k not in timed} == {
            k: v for k, v in db.items() if k not in timed
        }
        assert sa.fwd_time_s != sb.fwd_time_s and sa.bwd_time_s != sb.bwd_time_s
    assert a.rank_map == b.rank_map and a.layout == b.layout
    assert a.predictions.device_memory_bytes == b.predictions.device_memory_bytes
    assert a.predictions.iteration_time_s != b.predictions.iteration_time_s
    assert not a.predictions.calibrated and b.predictions.calibrated
    # Same graph and the same cluster but for the measured figures attached to it.
    ra, rb = a.request.to_dict(), b.request.to_dict()
    assert _strip(rb) == _strip(ra) and rb != ra
    back = Plan.from_json(b.to_json())
    assert back == b and back.request.cluster.kinds["cpu-epyc-2core"].calibration == cal.device
    # The solver plans with the measured figures too, and says so.
    p = plan(g, cluster=calibrated, global_batch=4, time_limit_s=5, baselines=False)
    p.check(g)
    assert p.predictions.figures["kind cpu-epyc-2core"].startswith("calibrated")


def _strip(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k != "calibration"}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _node(name: str, target: str, inputs: tuple[str, ...], shape: tuple[int, ...], **kw: Any) -> OpNode:
    n = 1
    for s in shape:
        n *= s
    op = "placeholder" if target == "input" else "call_function"
    return OpNode(name, op, target, "m", inputs, (TensorMeta(shape, "float32", 4 * n),), **kw)


def test_calibrated_node_times_read_the_curves() -> None:
    # x -> view -> linear (weights) -> gelu; and a mask built from the input alone (no gradient).
    nodes = [
        _node("x", "input", (), (2, 8, 16)),
        _node("mask", "aten.ones_like.default", ("x",), (2, 8, 16), bytes_moved=2048),
        _node("v", "aten.view.default", ("x",), (16, 16)),
        _node(
            "lin",
            "aten.linear.default",
            ("v",),
            (16, 32),
            fwd_flops=2 * 16 * 16 * 32,
            bwd_flops=4 * 16 * 16 * 32,
            bytes_moved=4 * (16 * 32 + 16 * 16 + 16 * 32),
            param_bytes=4 * 16 * 32,
            params=("lin.weight",),
        ),
        _node("act", "aten.gelu.default", ("lin",), (16, 32), bytes_moved=2 * 4 * 16 * 32),
    ]
    g = make_graph(
        "tiny", nodes, outputs=("act",), param_sizes={"lin.weight": 4 * 16 * 32}, meta={"batch": 2}
    )
    dev = _device()
    c = load_cluster({"name": "lab", **_yaml_dict()}).calibrated(
        Calibration(kind="cpu-epyc-2core", device=dev)
    )
    cost = CostModel(g, c)
    f, b = cost.time_prefix("cpu-epyc-2core", 2)
    fwd, bwd = f[1:] - f[:-1], b[1:] - b[:-1]
    assert fwd[0] == 0 and bwd[0] == 0  # an input runs nothing
    assert fwd[1] == pytest.approx(dev.ops["elementwise"].fwd.time(2048)) and bwd[1] == 0  # no gradient path
    assert bwd[2] == 0  # a view of the input: no gradient path either
    lin_bytes = 4 * 16 * 32 + (nodes[3].bytes_moved - 4 * 16 * 32)
    mm = dev.matmul["fp32"]
    assert dev.stream is not None
    assert fwd[3] == pytest.approx(max(mm.fwd.time(2 * 16 * 16 * 32), dev.stream.fwd.time(lin_bytes)))
    assert bwd[3] == pytest.approx(max(mm.bwd.time(2 * 16 * 16 * 32), dev.stream.bwd.time(lin_bytes)))
    # The last node also carries the loss (MSE: three elementwise passes over the outputs).
    out = 4 * 16 * 32  # the output tensor, fp32
    assert fwd[4] == pytest.approx(
        dev.ops["elementwise"].fwd.time(2 * 4 * 16 * 32) + 3 * dev.ops["elementwise"].fwd.time(2 * out)
    )
    # A stage pays the runtime's per-microbatch costs, and for each of its pipeline boundaries (one at
    # either end, two inside) their cost per microbatch; the whole model as one stage has none.
    n = len(g)
    for start, end, sides in ((0, n, 0), (0, 3, 1), (3, n, 1), (1, 3, 2)):
        st = cost.stage_cost(
            start,
            end,
            kind="cpu-epyc-2core",
            microbatch=2,
            inflight=1,
            dp=1,
            allreduce_link=c.hosts[0].link,
            send_link=None,
        )
        assert st.fwd_s == pytest.approx(
            float(f[end] - f[start]) + dev.microbatch_fwd_s + sides * dev.boundary_fwd_s
        ), (start, end)
        assert st.bwd_s == pytest.approx(
            float(b[end] - b[start]) + dev.microbatch_bwd_s + sides * dev.boundary_bwd_s
        ), (start, end)
        if (start, end) == (0, n):
            # It steps its one tensor, and once per iteration the runtime's own step, in the same tail.
            assert st.optimizer_s == pytest.approx(dev.optimizer["adam"].time(4 * 16 * 32) + dev.step_s)


def test_a_kind_without_fused_attention_stores_the_scores() -> None:
    heads, seq, dim = 4, 32, 8
    q = (1, heads, seq, dim)
    nodes = [
        _node("x", "input", (), q),
        _node(
            "k",
            "aten.mul.Tensor",
            ("x",),
            q,
            bytes_moved=3 * 4 * heads * seq * dim,
            params=("s",),
            param_bytes=4,
        ),
        _node(
            "sdpa",
            "aten.scaled_dot_product_attention.default",
            ("x", "k", "k"),
            q,
            fwd_flops=4 * heads * seq * seq * dim,
            bytes_moved=4 * 4 * heads * seq * dim,
            activation_bytes=4 * 4 * heads * seq * dim,
        ),
    ]
    g = make_graph("att", nodes, outputs=("sdpa",), param_sizes={"s": 4})
    base = load_cluster({"name": "lab", **_yaml_dict()})
    fused = CostModel(g, base)
    mathk = CostModel(g, base.calibrated(Calibration(kind="cpu-epyc-2core", device=_device(kernel="math"))))
    kind = "cpu-epyc-2core"
    extra = mathk.stage_memory(0, 3, microbatch=2, inflight=3, kind=kind) - fused.stage_memory(
        0, 3, microbatch=2, inflight=3, kind=kind
    )
    assert extra == 3 * 2 * heads * seq * seq * 4  # in-flight microbatches x samples x heads x seq^2 x fp32
    assert not mathk.cluster.kinds[kind].fused_attention and fused.cluster.kinds[kind].fused_attention


def test_matmul_precision_is_named_in_the_plan_and_priced() -> None:
    g = synthetic_transformer(layers=2, hidden=512, heads=8, seq=128, vocab=1000)
    layout = f"gpipe m2x1 | 0:{len(g)}@0"
    fp32 = evaluate(g, cluster="a100x4-t4x4", layout=layout, global_batch=2)
    tf32 = evaluate(g, cluster="a100x4-t4x4", layout=layout, global_batch=2, matmul_precision="tf32")
    assert fp32.predictions.matmul_precision == "fp32" and tf32.predictions.matmul_precision == "tf32"
    assert tf32.request.precision == "tf32" and fp32.request.to_dict()["matmul_precision"] is None
    # An A100's TF32 tensor cores are 8x its fp32 peak: the matmul-bound stage gets much faster.
    assert tf32.stages[0].fwd_time_s < 0.5 * fp32.stages[0].fwd_time_s
    assert Plan.from_json(tf32.to_json()).request.matmul_precision == "tf32"
    with pytest.raises(PlanError, match="matmul_precision 'tf32' does not go with dtype 'bf16'"):
        evaluate(
            g, cluster="a100x4-t4x4", layout=layout, global_batch=2, dtype="bf16", matmul_precision="tf32"
        )
    with pytest.raises(PlanError, match="matmul_precision must be one of"):
        PlanRequest(fp32.request.cluster, global_batch=2, matmul_precision="int8")


def test_a_cut_crossed_by_several_tensors_is_one_measured_transfer() -> None:
    # Two tensors cross the cut after "b" (its output and "a"'s, read again by "c"): they are sent together,
    # so a calibrated link charges one transfer of all their bytes, not one latency per tensor.
    nodes = [
        _node("x", "input", (), (2, 8, 16)),
        _node("a", "aten.gelu.default", ("x",), (2, 8, 16), bytes_moved=2048),
        _node("b", "aten.gelu.default", ("a",), (2, 8, 16), bytes_moved=2048),
        _node("c", "aten.add.Tensor", ("a", "b"), (2, 8, 16), bytes_moved=3072),
    ]
    g = make_graph("two-cross", nodes, outputs=("c",), meta={"batch": 2})
    link = _link()
    c = load_cluster({"name": "lab", **_yaml_dict()}).calibrated(
        Calibration(kind="cpu-epyc-2core", link=link)
    )
    cost = CostModel(g, c)
    cut = 3  # after "b": both "a" and "b" go to the next stage
    nbytes = cost.cut_bytes(cut, 2)
    assert nbytes == pytest.approx(2 * (2 * 8 * 16 * 4))
    lk = c.hosts[0].link
    assert lk.calibration is not None
    assert cost.send_time(cut, 2, link=lk) == pytest.approx(link.send_time(nbytes))
    assert cost.send_time(cut, 2, link=lk, streams=2) == pytest.approx(link.send_time(2 * nbytes))


def _few_row_graph() -> Any:
    """x -> linear 16 -> 32 (8 rows per sample, 2 samples traced)."""
    nodes = [
        _node("x", "input", (), (2, 8, 16)),
        _node(
            "lin",
            "aten.linear.default",
            ("x",),
            (2, 8, 32),
            fwd_flops=2 * 16 * 16 * 32,
            bwd_flops=4 * 16 * 16 * 32,
            bytes_moved=4 * (16 * 32 + 16 * 16 + 16 * 32),
            param_bytes=4 * 16 * 32,
            params=("lin.weight",),
        ),
    ]
    return make_graph(
        "lin", nodes, outputs=("lin",), param_sizes={"lin.weight": 4 * 16 * 32}, meta={"batch": 2}
    )


def test_few_row_linears_read_the_row_curves() -> None:
    import dataclasses

    g = _few_row_graph()
    rows4, rows16 = _times(1e9, 3e-5), _times(4e9, 5e-5)
    dev = dataclasses.replace(_device(), row_matmul={4: rows4, 16: rows16})
    assert DeviceCalibration.from_dict(dev.to_dict()) == dev
    c = load_cluster({"name": "lab", **_yaml_dict()}).calibrated(
        Calibration(kind="cpu-epyc-2core", device=dev)
    )
    plain = load_cluster({"name": "lab", **_yaml_dict()}).calibrated(
        Calibration(kind="cpu-epyc-2core", device=_device())
    )
    weights = 4 * 16 * 32
    loss = CostModel(g, c)._loss_times(dev, 1.0)  # the last node carries the loss

    def lin(cluster: Cluster, microbatch: float) -> tuple[float, float]:
        f, b = CostModel(g, cluster).time_prefix("cpu-epyc-2core", microbatch)
        lf, lb = CostModel(g, cluster)._loss_times(dev, microbatch)
        return float(f[-1]) - lf, float(b[-1]) - lb

    assert loss[0] > 0
    # 8 rows: halfway (in log rows) between the 4-row and 16-row curves, read at the weight bytes.
    f, b = lin(c, 1)
    assert f == pytest.approx((rows4.fwd.time(weights) * rows16.fwd.time(weights)) ** 0.5)
    assert b == pytest.approx((rows4.bwd.time(weights) * rows16.bwd.time(weights)) ** 0.5)
    # 2 rows: between the one-row stream curve and the 4-row one.
    f, _ = lin(c, 0.25)
    stream = dev.stream
    assert stream is not None
    assert f == pytest.approx((stream.fwd.time(weights) * rows4.fwd.time(weights)) ** 0.5)
    # From the largest count on, a linear is priced by its FLOPs as without the row curves.
    assert lin(c, 2) == pytest.approx(lin(plain, 2))
    assert lin(c, 1) != pytest.approx(lin(plain, 1))


def test_malformed_row_curves_name_the_field() -> None:
    import dataclasses

    bad = dataclasses.replace(_device(), row_matmul={4: _times(1e9, 3e-5)}).to_dict()
    bad["row_matmul"]["four"] = bad["row_matmul"].pop("4")
    with pytest.raises(
        CalibrationError, match=r"device.row_matmul.four: a row count must be a positive integer"
    ):
        DeviceCalibration.from_dict(bad)
    with pytest.raises(CalibrationError, match=r"row_matmul: row counts must be integers >= 2"):
        dataclasses.replace(_device(), row_matmul={1: _times(1e9, 3e-5)})
