"""Parameters read in several stages (tied input embedding and output projection): every stage that reads
one holds a copy (weights, gradient, optimizer state), all-reduces its gradient with the other holders,
and the plan shows both; a plan that cannot hold the copies is refused, naming them.

The shared input is a Llama with a 256000 x 3072 tied embedding, traced at sequence 128 (stored in
``data/``, traced by ``distplan trace`` so these tests need no torch), planned on two 16 GB T4s.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import pytest

from distplan.errors import InfeasiblePlanError, PlanError
from distplan.graph import OpGraph
from distplan.planner import baselines, evaluate, plan, simulate
from distplan.planner.synthetic import synthetic_transformer
from distplan.units import format_bytes

DATA = Path(__file__).parent / "data"
TIED = "lm_head.weight"
TIED_BYTES = 256_000 * 3072 * 4  # fp32
# fp32 Adam: weights, gradient and two moments, 4 bytes each (per parameter byte: 4x).
STATE = 4


def _t4_cluster(count: int) -> dict:
    return {
        "name": f"t4x{count}",
        "hosts": [
            {
                "name": "box",
                "devices": [{"kind": "t4-16g", "count": count}],
                "link": {"bandwidth_gbyte_s": 12, "latency_us": 10},
            }
        ],
    }


@pytest.fixture(scope="module")
def tied_llama() -> OpGraph:
    return OpGraph.from_json(gzip.decompress((DATA / "llama_tied_t4_seq128.json.gz").read_bytes()).decode())


def test_the_trace_names_the_tied_matrix_once_with_its_readers(tied_llama: OpGraph) -> None:
    g = tied_llama
    assert g.param_sizes is not None and g.param_sizes[TIED] == TIED_BYTES
    assert sum(g.param_sizes.values()) == g.param_bytes
    (sp,) = g.shared_params()
    assert sp.names == (TIED,) and sp.nbytes == TIED_BYTES
    assert [g.nodes[p].target for p in sp.positions] == ["aten.embedding.default", "aten.linear.default"]
    # The first reader (the embedding) carries its bytes; the head carries none.
    assert g.nodes[sp.positions[0]].param_bytes == TIED_BYTES
    assert g.nodes[sp.positions[1]].param_bytes == 0


def test_tied_llama_on_two_t4_is_refused_naming_the_copy(tied_llama: OpGraph) -> None:
    g = tied_llama
    # One stage holding the embedding and the head holds the whole model (19 GiB of state > 15 GiB), so
    # two stages hold a copy each: 4 x (all parameters + a second copy of the matrix) > 2 x 15 GiB.
    need = STATE * (g.param_bytes + TIED_BYTES)
    with pytest.raises(InfeasiblePlanError) as e:
        plan(g, cluster=_t4_cluster(2), global_batch=8, time_limit_s=10)
    msg = str(e.value)
    assert f"needs at least {format_bytes(need)} across devices" in msg
    assert f"{format_bytes(STATE * TIED_BYTES)} of it for second copies of shared parameters" in msg
    assert f"{TIED} ({format_bytes(TIED_BYTES)}" in msg
    assert "read by nodes 4 (embedding) and 297 (linear_28)" in msg
    assert "at least two stages hold a copy" in msg


def test_the_split_planned_before_needs_16_gib_on_the_head_stage(tied_llama: OpGraph) -> None:
    g = tied_llama
    # The layout distplan used to choose: stage 1 (with lm_head) was priced at 4.6 GiB without the copy.
    head = g.nodes[166:]
    need = STATE * (sum(n.param_bytes for n in head) + TIED_BYTES) + sum(n.activation_bytes for n in head)
    assert 16.2 * 2**30 < need < 16.4 * 2**30
    with pytest.raises(InfeasiblePlanError) as e:
        evaluate(g, cluster=_t4_cluster(2), layout="1f1b m8x1 | 0:166@0 | 166:298@1", global_batch=8)
    msg = str(e.value)
    assert f"stage 1 (nodes 166..297) needs {format_bytes(need)} per device" in msg
    assert (
        f"of which {format_bytes(STATE * TIED_BYTES)} for parameters it shares with other stages ({TIED})"
        in msg
    )


def test_four_t4_hold_the_copy_on_both_ends_and_sum_its_gradient(tied_llama: OpGraph) -> None:
    g = tied_llama
    p = plan(g, cluster=_t4_cluster(4), global_batch=8, time_limit_s=10)
    p.check(g)
    holders = [s for s in p.stages if s.start <= 4 < s.end or s.start <= 297 < s.end]
    assert len(holders) == 2, p.layout
    link_bw, latency = 12e9, 10e-6
    # Ring all-reduce of the fp32 gradient over every rank holding a copy (the lowering's group of tied
    # parameters: each holder's replicas and tensor-parallel ranks) on the host's PCIe link.
    world = sum(len(s.devices) for s in holders)
    ring = 2 * (world - 1) / world * TIED_BYTES / link_bw + 2 * (world - 1) * latency
    for s in p.stages:
        if s in holders:
            assert s.shared_param_bytes == TIED_BYTES
            assert s.tied_allreduce_time_s == pytest.approx(ring)
            assert s.param_bytes >= TIED_BYTES
            assert s.memory_bytes >= STATE * TIED_BYTES
        else:
            assert s.shared_param_bytes == 0 and s.tied_allreduce_time_s == 0
    # The all-reduce sits in the iteration's tail, and the simulator runs it too.
    tl = simulate(p, g)
    last = max(e.end_s for e in tl.events if e.kind == "allreduce")
    assert last >= ring
    assert tl.iteration_time_s <= p.predictions.iteration_time_s * (1 + 1e-9)


def test_plan_check_refuses_a_plan_that_ignores_the_copies() -> None:
    g = synthetic_transformer("gpt2-xl", seq=1024)
    p = evaluate(g, cluster="a100x4-t4x4", layout=f"gpipe m16x1 | 0:250@0 | 250:{len(g)}@1", global_batch=16)
    p.check(g)
    emb = g.param_sizes["model.embed_tokens.weight"]  # type: ignore[index]
    assert [s.shared_param_bytes for s in p.stages] == [emb, emb]
    stripped = dataclasses.replace(
        p, stages=tuple(dataclasses.replace(s, shared_param_bytes=0) for s in p.stages)
    )
    with pytest.raises(
        PlanError, match=r"stage 0 holds a copy of model\.embed_tokens\.weight .* also held by stages 1"
    ):
        stripped.check(g)


def test_copies_cost_memory_and_time_against_one_stage_holding_both_ends() -> None:
    shape = {"layers": 48, "hidden": 1600, "heads": 25, "ffn": 6400, "vocab": 50257, "seq": 1024}
    g = synthetic_transformer(**shape, tied_embeddings=True)  # type: ignore[arg-type]
    n = len(g)
    emb = g.param_sizes["model.embed_tokens.weight"]  # type: ignore[index]
    split = evaluate(g, cluster="h100x8", layout=f"gpipe m8x1 | 0:250@0 | 250:{n}@1", global_batch=8)
    # Same cut, but the same layout on a graph whose head has its own (untied) matrix of the same size:
    # the tied head stage holds exactly that much, and pays the gradient sum on top.
    untied = synthetic_transformer(**shape, tied_embeddings=False)  # type: ignore[arg-type]
    own = evaluate(untied, cluster="h100x8", layout=f"gpipe m8x1 | 0:250@0 | 250:{n}@1", global_batch=8)
    assert split.stages[1].param_bytes == own.stages[1].param_bytes
    assert split.stages[1].memory_bytes == own.stages[1].memory_bytes
    assert split.stages[1].shared_param_bytes == emb and own.stages[1].shared_param_bytes == 0
    assert split.predictions.iteration_time_s > own.predictions.iteration_time_s
    whole = evaluate(g, cluster="h100x8", layout=f"gpipe m8x1 | 0:{n}@0", global_batch=8)
    assert whole.stages[0].shared_param_bytes == 0 and whole.stages[0].param_bytes == g.param_bytes


def test_baselines_price_the_copies() -> None:
    g = synthetic_transformer("gpt2-xl", seq=1024)
    emb = g.param_sizes["model.embed_tokens.weight"]  # type: ignore[index]
    out = baselines(g, cluster="a100x8-v100x8", global_batch=32)
    split = [b for b in out.values() if b is not None and b.num_stages > 1]
    assert split, "some pipeline baseline should fit"
    for b in split:
        b.check(g)
        first, last = b.stages[0], b.stages[-1]
        assert first.shared_param_bytes == emb and last.shared_param_bytes == emb
        assert first.tied_allreduce_time_s > 0 and last.tied_allreduce_time_s == first.tied_allreduce_time_s


def test_schema_1_graphs_still_plan_and_say_what_they_cannot_price() -> None:
    g = synthetic_transformer(layers=2, hidden=64, heads=4, seq=16, vocab=100, tied_embeddings=True)
    d = g.to_dict()
    d["schema_version"] = 1
    del d["param_sizes"]
    old = OpGraph.from_dict(d)
    assert old.param_sizes is None and old.shared_params() == ()
    assert old.unsized_shared_names() == ("model.embed_tokens.weight",)
    p = plan(old, cluster="cpu-local", global_batch=4, time_limit_s=10)
    assert any("no parameter sizes" in n and "model.embed_tokens.weight" in n for n in p.solver.notes)
    assert not any(
        "no parameter sizes" in n for n in plan(g, cluster="cpu-local", global_batch=4).solver.notes
    )
