import pytest

from distplan.errors import GraphError
from distplan.graph import OpGraph, OpNode, TensorMeta, make_graph


def t(nbytes: int) -> tuple[TensorMeta, ...]:
    return (TensorMeta((nbytes // 4,), "float32", nbytes),)


def skip_graph() -> OpGraph:
    # x -> a -> b -> c(a, b) -> d ; a skips over b (a residual)
    nodes = [
        OpNode("x", "placeholder", "x", outputs=t(100)),
        OpNode(
            "a",
            "call_function",
            "aten.mm",
            "l1",
            ("x",),
            t(40),
            fwd_flops=10,
            param_bytes=16,
            params=("l1.w",),
        ),
        OpNode("b", "call_function", "aten.relu", "l1", ("a",), t(40)),
        OpNode("c", "call_function", "aten.add", "", ("a", "b"), t(40)),
        OpNode(
            "d", "call_function", "aten.mm", "l2", ("c",), t(8), fwd_flops=5, param_bytes=8, params=("l2.w",)
        ),
    ]
    return make_graph("skip", nodes, outputs=("d",), num_params=6)


def test_cut_costs_count_skip_connections_by_hand() -> None:
    g = skip_graph()
    # p=0: nothing defined; p=1: x (100) -> a; p=2: a (40) -> b,c; p=3: a + b (80) -> c;
    # p=4: c (40) -> d; p=5: d is the graph output (8)
    assert g.cut_costs() == (0, 100, 40, 80, 40, 8)
    assert g.crossing_values(3) == ["a", "b"]


def test_graph_json_round_trip_and_hashes() -> None:
    g = skip_graph()
    g2 = OpGraph.from_json(g.to_json())
    assert g2 == g
    assert g2.content_hash == g.content_hash
    assert g.fwd_flops == 15
    bigger = make_graph(
        "skip",
        [
            OpNode(
                n.name, n.op, n.target, n.module, n.inputs, t(999), n.fwd_flops, 0, 0, n.param_bytes, n.params
            )
            for n in g.nodes
        ],
        outputs=("d",),
    )
    assert bigger.structure_hash == g.structure_hash
    assert bigger.content_hash != g.content_hash


def test_lint_names_the_offending_node() -> None:
    d = skip_graph().to_dict()
    d["nodes"][1]["inputs"] = ["c"]  # a reads c, which comes later: a cycle
    with pytest.raises(GraphError, match=r"node 1 'a': input 'c' is defined later"):
        OpGraph.from_dict(d)
    d = skip_graph().to_dict()
    d["nodes"][2]["fwd_flops"] = -3
    with pytest.raises(GraphError, match=r"graph.nodes\[2\].fwd_flops: expected an integer >= 0, got -3"):
        OpGraph.from_dict(d)
    d = skip_graph().to_dict()
    d["schema_version"] = 99
    with pytest.raises(GraphError, match="schema_version: 99 is not supported"):
        OpGraph.from_dict(d)
    d = skip_graph().to_dict()
    d["param_bytes"] = 1
    with pytest.raises(GraphError, match="sum of node param_bytes is 24"):
        OpGraph.from_dict(d)


def tied_graph() -> OpGraph:
    # emb.w is read by the embedding (which carries its 40 bytes) and again by the head, like a tied
    # embedding and output projection; l2.w is private to one node.
    nodes = [
        OpNode("ids", "placeholder", "ids", outputs=t(16)),
        OpNode(
            "emb",
            "call_function",
            "aten.embedding",
            "emb",
            ("ids",),
            t(32),
            param_bytes=40,
            params=("emb.w",),
        ),
        OpNode("mid", "call_function", "aten.mm", "l2", ("emb",), t(32), param_bytes=8, params=("l2.w",)),
        OpNode("head", "call_function", "aten.mm", "head", ("mid",), t(40), params=("emb.w",)),
    ]
    return make_graph("tied", nodes, outputs=("head",), param_sizes={"emb.w": 40, "l2.w": 8})


def test_shared_parameters_are_found_and_round_trip() -> None:
    g = tied_graph()
    assert g.param_readers() == {"emb.w": (1, 3), "l2.w": (2,)}
    (sp,) = g.shared_params()
    assert (sp.names, sp.nbytes, sp.positions) == (("emb.w",), 40, (1, 3))
    assert g.unsized_shared_names() == ()
    g2 = OpGraph.from_json(g.to_json())
    assert g2 == g and g2.param_sizes == {"emb.w": 40, "l2.w": 8}
    assert g.to_dict()["schema_version"] == 2


def test_schema_1_documents_load_without_a_parameter_table() -> None:
    d = tied_graph().to_dict()
    d["schema_version"] = 1
    d.pop("param_sizes")
    g = OpGraph.from_dict(d)
    assert g.param_sizes is None and g.shared_params() == ()
    # Without sizes the planner cannot charge the second reader; it can name what it cannot price.
    assert g.unsized_shared_names() == ("emb.w",)
    # Written back, it is a schema 2 document that still says "no table" (no param_sizes key).
    assert "param_sizes" not in g.to_dict() and OpGraph.from_dict(g.to_dict()).param_sizes is None
    d["schema_version"] = 3
    with pytest.raises(GraphError, match=r"schema_version: 3 is not supported .*reads 1 and 2"):
        OpGraph.from_dict(d)


def test_lint_checks_the_parameter_table_against_the_nodes() -> None:
    d = tied_graph().to_dict()
    d["param_sizes"]["emb.w"] = 48  # more than its first reader carries
    with pytest.raises(
        GraphError, match=r"node 1 .emb. is the first reader of emb\.w \(48 bytes .* \(8 bytes missing\)"
    ):
        OpGraph.from_dict(d)
    d = tied_graph().to_dict()
    d["param_sizes"]["emb.w"] = -1
    with pytest.raises(GraphError, match=r"graph\.param_sizes\['emb\.w'\]: expected an integer >= 0, got -1"):
        OpGraph.from_dict(d)
    d = tied_graph().to_dict()
    d["param_sizes"]["unused.w"] = 100  # read by no node, but more than the model holds
    with pytest.raises(
        GraphError, match="param_sizes add up to 148 bytes, more than the graph's param_bytes=48"
    ):
        OpGraph.from_dict(d)
