"""The tensor-parallel annotation as data: checks, pricing, JSON, and its place in OpGraph (no torch)."""

from __future__ import annotations

import json

import pytest

from distplan.errors import GraphError
from distplan.graph import OpGraph, OpNode, TensorMeta, make_graph
from distplan.tensor_parallel import (
    Collective,
    ParamSplit,
    TensorParallelAnnotation,
    TensorParallelRegion,
    divisors,
)

_T = TensorMeta((2, 8, 64), "float32", 2 * 8 * 64 * 4)


def _graph(annotation: TensorParallelAnnotation | None = None) -> OpGraph:
    """x -> norm -> up (column) -> gelu -> down (row) -> add: a hand-built MLP block."""
    nodes = [
        OpNode("x", "placeholder", "x", outputs=(_T,)),
        OpNode("norm", "call_function", "aten.layer_norm.default", inputs=("x",), outputs=(_T,), params=("ln.weight",), param_bytes=256),
        OpNode("up", "call_function", "aten.linear.default", inputs=("norm",), outputs=(_T,), fwd_flops=1000, bwd_flops=2000, params=("up.weight",), param_bytes=4096, activation_bytes=4096),
        OpNode("act", "call_function", "aten.gelu.default", inputs=("up",), outputs=(_T,), activation_bytes=4096),
        OpNode("down", "call_function", "aten.linear.default", inputs=("act",), outputs=(_T,), fwd_flops=1000, bwd_flops=2000, params=("down.weight", "down.bias"), param_bytes=4096 + 256, activation_bytes=4096),
        OpNode("add", "call_function", "aten.add.Tensor", inputs=("x", "down"), outputs=(_T,)),
    ]  # fmt: skip
    sizes = {"ln.weight": 256, "up.weight": 4096, "down.weight": 4096, "down.bias": 256}
    g = make_graph("block", nodes, outputs=("add",), param_sizes=sizes)
    if annotation is None:
        return g
    return OpGraph.from_dict({**g.to_dict(), "tensor_parallel": annotation.to_dict()})


def _region(**kw: object) -> TensorParallelRegion:
    fields: dict[str, object] = {
        "kind": "mlp",
        "nodes": ("up", "act", "down"),
        "params": (
            ParamSplit("up.weight", (16, 64), 4096, "column", 0),
            ParamSplit("down.weight", (64, 16), 4096, "row", 1),
            ParamSplit("down.bias", (64,), 256, "replicated"),
        ),
        "split_sizes": (16,),
        "degrees": (1, 2, 4, 8, 16),
        "collectives": (
            Collective("all-reduce", "backward", "input-gradient", "norm", 2048),
            Collective("all-reduce", "forward", "partial-output", "down", 2048),
        ),
        "fwd_flops": 2000,
        "bwd_flops": 4000,
        "split_activation_bytes": 8192,
        "whole_activation_bytes": 4096,
    }
    fields.update(kw)
    return TensorParallelRegion(**fields)  # type: ignore[arg-type]


def test_divisors() -> None:
    assert divisors(1) == (1,)
    assert divisors(12) == (1, 2, 3, 4, 6, 12)
    assert divisors(25) == (1, 5, 25)
    with pytest.raises(ValueError, match="positive"):
        divisors(0)


def test_a_graph_carries_its_annotation_through_json_and_old_graphs_still_load() -> None:
    ann = TensorParallelAnnotation(regions=(_region(),), batch=2)
    g = _graph(ann)
    again = OpGraph.from_json(g.to_json())
    assert again.tensor_parallel == ann
    assert again.content_hash == g.content_hash
    # A graph written before the annotation existed: no key, loads with None.
    old = _graph().to_dict()
    assert "tensor_parallel" not in old
    assert OpGraph.from_dict(json.loads(json.dumps(old))).tensor_parallel is None
    # A schema 1 document (no param_sizes either) loads too.
    v1 = {k: v for k, v in old.items() if k != "param_sizes"} | {"schema_version": 1}
    assert OpGraph.from_dict(v1).tensor_parallel is None


def test_cost_divides_what_the_split_divides() -> None:
    r = _region()
    one, four = r.cost(1, microbatch=3), r.cost(4, microbatch=3)
    assert (one.fwd_flops, one.bwd_flops, one.collective_bytes) == (2000, 4000, 0)
    assert (four.fwd_flops, four.bwd_flops) == (500, 1000)
    assert four.param_bytes == 8192 / 4 + 256  # the row bias stays whole
    assert four.activation_bytes == 8192 / 4 + 4096
    # Two all-reduces of 3 x 2048 bytes, ring: 2 (t - 1) / t of the payload each.
    assert four.collective_bytes == pytest.approx(2 * 2 * 3 / 4 * 3 * 2048)
    sp = r.cost(4, microbatch=3, sequence_parallel=True)
    assert sp.collective_bytes == pytest.approx(four.collective_bytes)  # same bytes, other collectives
    ops = sorted((c.op, c.phase) for c in r.sequence_parallel_collectives())
    assert ops == [
        ("all-gather", "backward"),
        ("all-gather", "forward"),
        ("reduce-scatter", "backward"),
        ("reduce-scatter", "forward"),
    ]
    with pytest.raises(ValueError, match=r"degree 3 is not valid .* allow \(1, 2, 4, 8, 16\)"):
        r.cost(3)


def test_fixed_bytes_do_not_grow_with_the_microbatch() -> None:
    c = Collective("all-reduce", "forward", "partial-output", "down", bytes_per_sample=10, fixed_bytes=7)
    assert c.nbytes(1) == 17 and c.nbytes(4) == 47
    assert c.bytes_per_device(4, 1) == 0


def test_local_shapes_and_pieces() -> None:
    fused = ParamSplit("qkv.weight", (192, 64), 192 * 64 * 4, "column", 0, pieces=(64, 64, 64))
    assert fused.local_shape(4) == (48, 64)
    with pytest.raises(ValueError, match="does not divide"):
        fused.local_shape(5)
    with pytest.raises(GraphError, match="sum to shape"):
        ParamSplit("qkv.weight", (192, 64), 1, "column", 0, pieces=(64, 64))
    with pytest.raises(GraphError, match="only 'replicated' has no dim"):
        ParamSplit("b", (4,), 16, "row")
    with pytest.raises(GraphError, match="out of range"):
        ParamSplit("b", (4,), 16, "column", 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"degrees": (1, 2, 4)}, r"degrees \(1, 2, 4\) are not the divisors \(1, 2, 4, 8, 16\)"),
        ({"split_sizes": (0,)}, "split_sizes must be positive"),
        ({"nodes": ()}, "at least one node"),
        ({"whole_nodes": ("act",)}, "both split and whole: act"),
        ({"kind": "conv"}, "unknown kind 'conv'"),
        ({"fwd_flops": -1}, "fwd_flops must be >= 0"),
    ],
)
def test_a_region_checks_itself(change: dict[str, object], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        _region(**change)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ((_region(nodes=("up", "act", "down", "gone")),), "node 'gone' is not in the graph"),
        (
            (_region(), _region(nodes=("down",), fwd_flops=1000, bwd_flops=2000)),
            "node 'down' is also in region 0",
        ),
        ((_region(fwd_flops=7),), "fwd_flops is 7 but its nodes sum to 2000"),
        ((_region(params=_region().params[:2]),), "node 'down' reads parameter 'down.bias', not listed"),
        (
            (_region(collectives=(Collective("all-reduce", "forward", "partial-output", "nowhere", 1),)),),
            "collective node 'nowhere' is not in the graph",
        ),
        (
            (
                _region(
                    params=(
                        ParamSplit("up.weight", (16, 64), 999, "column", 0),
                        *_region().params[1:],
                    )
                ),
            ),
            "'up.weight' has 999 bytes here, 4096 in the graph",
        ),
        (
            (
                _region(nodes=("up", "act"), fwd_flops=1000, bwd_flops=2000),
                _region(
                    nodes=("down",),
                    params=(ParamSplit("up.weight", (16, 64), 4096, "row", 1), *_region().params[1:]),
                    fwd_flops=1000,
                    bwd_flops=2000,
                ),
            ),
            "'up.weight' is split along dim 1 .* region 0 splits it along dim 0",
        ),
    ],
)
def test_lint_names_what_is_wrong(regions: tuple[TensorParallelRegion, ...], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        _graph(TensorParallelAnnotation(regions=regions, batch=2))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"schema_version": 9}, "schema_version: 9 is not supported"),
        ({"batch": 0}, r"batch: expected an integer >= 1, got 0"),
        ({"regions": [{"kind": "mlp"}]}, r"regions\[0\].nodes: missing required field"),
        ({"regions": "x"}, "regions: expected a list"),
    ],
)
def test_from_dict_errors_name_the_field(patch: dict[str, object], message: str) -> None:
    d = TensorParallelAnnotation(regions=(_region(),), batch=2).to_dict() | patch
    with pytest.raises(GraphError, match=message):
        TensorParallelAnnotation.from_dict(d)


def test_bad_collective_and_param_fields_are_named() -> None:
    d = _region().to_dict()
    d["collectives"][0]["op"] = "broadcast"
    with pytest.raises(GraphError, match=r"collectives\[0\].op: expected one of all-reduce"):
        TensorParallelRegion.from_dict(d)
    d = _region().to_dict()
    d["params"][1]["dim"] = "1"
    with pytest.raises(GraphError, match=r"params\[1\].dim: expected an integer or null"):
        TensorParallelRegion.from_dict(d)
