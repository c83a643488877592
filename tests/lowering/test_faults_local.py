"""The lowering's fault kinds checked on one process (no rank processes): output selection, keyword inputs
with and without a batch dimension, random ops found in the graph and pinned, in-place ops at the start of a
stage, batch-statistics layers and module state left untouched by the set-up.

The multi-process validations of the same models are in ``test_faults.py``."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import typing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_split import _pipeline_run
from torch import nn

from distplan.errors import LoweringError
from distplan.lowering._model import capture_model, resolve_source
from distplan.lowering.batching import classify_inputs, sample_kwargs
from distplan.lowering.effects import PinnedRandom, scan_forward
from distplan.lowering.outputs import graph_output_node, select_output
from distplan.lowering.split import split_graph
from distplan.lowering.validation import Tolerance, _compare
from distplan.planner import evaluate
from distplan.tracer import capture, resolve_model, trace

HERE = Path(__file__).resolve().parent
GPT2_DROPOUT = HERE / "gpt2_dropout_config.json"


def _names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op not in ("get_attr", "output")]


def _cuts(names: list[str], positions: list[int]) -> list[list[str]]:
    bounds = [0, *positions, len(names)]
    return [names[a:b] for a, b in itertools.pairwise(bounds)]


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


# ---------------------------------------------------------------------------------------------- outputs
class _NT(typing.NamedTuple):
    aux: torch.Tensor
    logits: torch.Tensor


@dataclasses.dataclass
class _DC:
    hidden: torch.Tensor
    scores: torch.Tensor | None = None


def test_output_selector_on_eager_structures() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    # Default: `logits` at the top level, else the first tensor in traversal order.
    assert select_output({"hidden": a, "logits": b}, None) is b
    assert select_output(_NT(a, b), None) is b
    assert select_output((a, (b, c)), None) is a
    assert select_output({"x": None, "y": [c, a]}, None) is c
    assert select_output(_DC(hidden=a, scores=b), None) is a
    assert select_output(a, None) is a
    # Paths: keys, indices, field names, positions in mappings and dataclasses.
    assert select_output((a, (b, c)), "1.1") is c
    assert select_output({"x": None, "y": [c, a]}, "y.1") is a
    assert select_output(_DC(hidden=a, scores=b), "scores") is b
    assert select_output(_DC(hidden=a, scores=b), "1") is b
    assert select_output(_NT(a, b), "aux") is a
    from transformers.modeling_outputs import CausalLMOutput

    out = CausalLMOutput(logits=c)
    assert (
        select_output(out, None) is c and select_output(out, "logits") is c and select_output(out, "0") is c
    )
    with pytest.raises(
        LoweringError,
        match=r"output selector 'logitz': the output is a dict with entries \['hidden', 'logits'\]",
    ):
        select_output({"hidden": a, "logits": b}, "logitz")
    with pytest.raises(
        LoweringError, match=r"selects a tuple of 2 entries, not one tensor; extend the path \(e.g. 1.0\)"
    ):
        select_output((a, (b, c)), "1")
    with pytest.raises(LoweringError, match="returns a tensor of shape \\(1,\\), not a structure of outputs"):
        select_output(a, "logits")
    with pytest.raises(LoweringError, match="holds no tensor"):
        select_output({"n": 3}, None)


@pytest.mark.parametrize(
    ("spec", "path", "method"),
    [
        ("fault_models:dict_head", None, "export"),  # default: logits
        ("fault_models:tuple_head", "1.0", "export"),
        ("fault_models:dataclass_head", None, "fx"),  # torch.export refuses the dataclass; fx captures
    ],
)
def test_graph_output_is_the_eager_selection_and_the_split_returns_it(
    spec: str, path: str | None, method: str
) -> None:
    b = resolve_model(spec, batch=2, seq=8, device="cpu", seed=0)
    src = resolve_source(b, batch=2, seq=8, output=path)
    batch = src.sample(4, seed=1)
    cap = capture(b.module, batch.args, batch.kwargs)
    assert cap.method == method
    node = graph_output_node(cap.gm, path)
    want = src.select(b.module(*batch.args))
    names = _names(cap.gm)
    stages = split_graph(cap.gm, stage_nodes=_cuts(names, [len(names) // 2]), output=path)
    assert stages[-1].nodes[-1] == names[-1]
    ref = src.loss(want, batch.target)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in b.module.named_parameters()}
    b.module.zero_grad(set_to_none=True)
    loss, got = _pipeline_run(stages, batch.args, src.loss, batch.target, b.module)
    assert node.name in {n for st in stages for n in st.nodes}
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)
    assert got.keys() == grads.keys()
    for n, g in grads.items():
        assert torch.allclose(got[n], g, rtol=1e-5, atol=1e-7), n
    # The target follows the selected output's shape (4 classes), not the first output's.
    assert tuple(batch.target.shape) == (4, 4)


def test_bad_output_selector_is_a_clear_error_naming_the_entries() -> None:
    b = resolve_model("fault_models:dict_head", batch=2, seq=8, device="cpu")
    with pytest.raises(LoweringError, match=r"output selector 'score'.*entries \['hidden', 'logits'\]"):
        resolve_source(b, batch=2, seq=8, output="score")
    gm = capture(b.module, b.example_args).gm
    with pytest.raises(LoweringError, match=r"entries \['hidden', 'logits'\], which has no entry 'score'"):
        graph_output_node(gm, "score")


# ---------------------------------------------------------------------------------------------- keyword inputs
def test_keyword_inputs_with_a_batch_dimension_are_told_apart() -> None:
    for spec, batched, whole in [
        ("fault_models:masked_stack", ("mask",), ()),
        ("fault_models:segment_net", ("segments",), ("pos_table",)),
    ]:
        b = resolve_model(spec, batch=2, seq=8, device="cpu")
        layout = classify_inputs(b.example_args, b.example_kwargs)
        assert (layout.batched, layout.whole) == (batched, whole), spec
    # Non-tensor keywords and None pass through as they are.
    layout = classify_inputs((torch.zeros(3, 2),), {"flag": True, "m": None, "w": torch.zeros(3)})
    assert (
        layout.batched == ("w",) and layout.kwarg_flags["flag"] is False and layout.kwarg_flags["m"] is False
    )


def test_keyword_rows_are_drawn_together_and_whole_values_kept() -> None:
    b = resolve_model("fault_models:segment_net", batch=2, seq=8, device="cpu")
    layout = classify_inputs(b.example_args, b.example_kwargs)
    kw = sample_kwargs(b.example_kwargs, layout, 7, seed=5)
    ex = b.example_kwargs
    assert kw["segments"].shape == (7, 5) and kw["pos_table"] is ex["pos_table"]
    for row in kw["segments"]:  # every drawn row is one of the example's rows
        assert any(torch.equal(row, r) for r in ex["segments"])
    assert torch.equal(sample_kwargs(ex, layout, 7, seed=5)["segments"], kw["segments"])  # seeded


def test_ambiguous_keyword_inputs_are_refused_naming_the_input() -> None:
    b = resolve_model("fault_models:one_sample_mask", batch=1, seq=8, device="cpu")
    with pytest.raises(
        LoweringError,
        match=r"keyword input 'mask' .* leading dimension 1, the same as the example batch size 1",
    ):
        resolve_source(b, batch=1, seq=8)
    with pytest.raises(
        LoweringError, match=r"only as keyword inputs \(x\); .* pass the main input positionally"
    ):
        classify_inputs((), {"x": torch.zeros(2, 3)})


# ---------------------------------------------------------------------------------------------- random ops
def _scan(spec: str, batch: int = 2, overrides: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
    b = resolve_model(spec, batch=batch, seq=8, device="cpu", config_overrides=overrides)
    src = resolve_source(b, batch=batch, seq=8)
    ex = src.sample(batch, seed=0)
    cap = capture_model(src, ex.args, ex.kwargs)
    g = cap.graph()
    assert cap.flat_inputs is not None
    before = _buffers(b.module)
    eff = scan_forward(
        cap.gm,
        cap.flat_inputs(ex.args, ex.kwargs),
        module=b.module,
        batch=batch,
        module_of={n.name: n.module for n in g.nodes},
    )
    after = _buffers(b.module)
    assert all(torch.equal(before[k], after[k]) for k in before), "the recorded forward changed the module"
    return eff


def test_random_ops_are_found_in_the_graph_not_by_module_name() -> None:
    eff = _scan(str(GPT2_DROPOUT))
    mods = eff.random_modules()
    # embedding dropout, attention dropout inside SDPA, residual and MLP dropout of both layers
    assert (
        "transformer.drop" in mods
        and "transformer.h.0.attn" in mods
        and "transformer.h.1.mlp.dropout" in mods
    )
    assert len(mods) == 1 + 4 * 3 and not eff.unpinnable
    # The same architecture with dropout 0 draws nothing.
    zero = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    assert _scan(str(GPT2_DROPOUT), overrides=zero).random == ()
    # Hand-made random ops: rand, rand_like, bernoulli, randn_like, F.dropout (all 4 blocks).
    ops = {e.op.split(".")[1] for e in _scan("fault_models:noisy_net").random}
    assert {"rand", "rand_like", "bernoulli", "randn_like"} <= {o.removesuffix("_") for o in ops} | ops, ops
    assert _scan("fault_models:relu_inplace_stack").random == ()


def test_pinned_random_values_do_not_depend_on_the_batch() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    with PinnedRandom():
        y = F.dropout(x, p=0.25, training=True)
        assert torch.allclose(y, x / 0.75)  # every element kept
        y.sum().backward()
        assert torch.allclose(x.grad, torch.full_like(x, 1 / 0.75))
        assert torch.equal(torch.rand(3), torch.full((3,), 0.5))
        assert torch.equal(torch.randn(2, 2), torch.zeros(2, 2))
        assert torch.equal(torch.bernoulli(torch.full((3,), 0.7)), torch.ones(3))
        assert torch.equal(torch.randint(2, 5, (3,)), torch.full((3,), 2))
        assert torch.equal(torch.randperm(4), torch.arange(4))
        assert torch.equal(torch.multinomial(torch.tensor([[0.1, 0.7, 0.2]]), 2), torch.tensor([[1, 2]]))
        assert torch.equal(torch.empty(3).uniform_(2.0, 4.0), torch.full((3,), 3.0))
        assert torch.equal(torch.empty(2).normal_(1.5, 3.0), torch.full((2,), 1.5))
        # What a microbatch sees is the corresponding part of what the whole batch sees.
        big = F.dropout(torch.ones(6, 2), 0.5, training=True)
        assert torch.equal(big[:3], F.dropout(torch.ones(3, 2), 0.5, training=True))
    assert not torch.equal(torch.rand(1000), torch.full((1000,), 0.5))  # only inside the mode


# ---------------------------------------------------------------------------------------------- in-place ops
@pytest.mark.parametrize(
    ("spec", "first_ops"),
    [
        ("fault_models:relu_inplace_stack", ["relu_", "relu__2"]),  # ReLU(inplace=True) first in a stage
        ("fault_models:inplace_residual", ["mul__1", "slice_3"]),  # mul_, then add_ on a slice (view)
    ],
)
def test_stage_may_modify_received_values_in_place(spec: str, first_ops: list[str]) -> None:
    b = resolve_model(spec, batch=4, seq=8, device="cpu", seed=0)
    inputs, target = b.make_batch(4, seed=1)
    gm = capture(b.module, inputs).gm
    names = _names(gm)
    stages = split_graph(gm, stage_nodes=_cuts(names, [names.index(n) for n in first_ops]))
    for st, op in zip(stages[1:], first_ops, strict=True):
        assert st.nodes[0] == op
    ref = b.loss(b.module(*(t.clone() for t in inputs)), target)
    ref.backward()
    want = {n: p.grad.clone() for n, p in b.module.named_parameters()}
    b.module.zero_grad(set_to_none=True)
    loss, grads = _pipeline_run(stages, tuple(inputs), b.loss, target, b.module)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)
    for n, g in want.items():
        assert torch.allclose(grads[n], g, rtol=1e-5, atol=1e-7), n


# ---------------------------------------------------------------------------------------------- state
def test_batch_statistics_and_written_buffers_are_found() -> None:
    eff = _scan("fault_models:bn_stack")
    assert eff.batch_stat_modules() == ["1", "4", "7"]
    assert set(eff.written_buffers) == {
        f"{i}.{b}" for i in (1, 4, 7) for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    eff = _scan("fault_models:conv_bn")
    assert eff.batch_stat_modules() == ["bn1", "bn2"] and "samples_seen" in eff.written_buffers
    # Layer norm normalises per sample: no batch statistics, no state.
    eff = _scan("mlp-tiny")
    assert eff.batch_stats == () and eff.written_buffers == ()


def test_set_up_leaves_the_module_state_alone() -> None:
    """Drawing batches, capturing, annotating and recording a forward leave every buffer as it was (the
    tracer's batch maker alone used to advance BatchNorm's num_batches_tracked)."""
    b = resolve_model("fault_models:bn_stack", batch=2, seq=8, device="cpu")
    before = _buffers(b.module)
    src = resolve_source(b, batch=2, seq=8)
    ex = src.sample(8, seed=1)
    cap = capture_model(src, ex.args, ex.kwargs)
    cap.graph()
    cap.values()
    after = _buffers(b.module)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_lower_leaves_the_module_state_alone_and_steps_count_microbatches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One rank, one stage, 2 microbatches: lower() changes no buffer; one step advances every BatchNorm's
    num_batches_tracked once per microbatch (as gradient accumulation on one device does); keyword inputs
    are taken per step."""
    from distplan.lowering import lower

    spec = "fault_models:bn_stack"
    g = trace(spec, batch=2, seq=8)
    plan = evaluate(g, cluster="cpu-local", layout=f"gpipe m2x2 | 0:{len(g)}@0", global_batch=4)
    model = resolve_model(spec, batch=2, seq=8, device="cpu")
    before = _buffers(model.module)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        runner = lower(plan, model, optimizer="sgd", lr=0.1, timeout_s=60, device="cpu")
        for k, v in before.items():
            assert torch.equal(model.module.get_buffer(k), v), f"lower() changed {k}"
        batch = runner.source.sample(4, seed=1)
        loss = runner.train_step(batch.args, batch.target, batch.kwargs)
        assert loss is not None and loss > 0
        assert {
            k: int(v) for k, v in runner.stage_buffers().items() if k.endswith("num_batches_tracked")
        } == {f"{i}.num_batches_tracked": 2 for i in (1, 4, 7)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_lower_takes_keyword_inputs_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from distplan.lowering import lower

    spec = "fault_models:segment_net"
    g = trace(spec, batch=2, seq=8)
    plan = evaluate(g, cluster="cpu-local", layout=f"gpipe m2x2 | 0:{len(g)}@0", global_batch=4)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        runner = lower(plan, spec, optimizer="sgd", lr=0.1, timeout_s=60, device="cpu")
        batch = runner.source.sample(4, seed=1)
        with pytest.raises(LoweringError, match=r"keyword input\(s\) \['segments'\] with a batch dimension"):
            runner.step(batch.args, batch.target)
        with pytest.raises(LoweringError, match=r"missing \['pos_table'\]; unknown \['pos'\]"):
            runner.step(batch.args, batch.target, {"segments": batch.kwargs["segments"], "pos": 1})
        with pytest.raises(LoweringError, match="input 'segments' has 3 samples"):
            runner.step(batch.args, batch.target, {**batch.kwargs, "segments": batch.kwargs["segments"][:3]})
        loss = runner.step(batch.args, batch.target, batch.kwargs)
        model = runner.source.module
        with torch.no_grad():
            want = runner.source.loss(model(*batch.args, **batch.kwargs), batch.target)
        assert loss == pytest.approx(float(want), rel=1e-5)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_compare_fails_a_buffer_that_differs() -> None:
    ref = {
        "losses": [1.0],
        "grads": [{"w": torch.ones(2)}],
        "params": [{"w": torch.ones(2)}],
        "buffers": [
            [{"n": torch.tensor(2), "m": torch.ones(3)}, {"n": torch.tensor(2), "m": torch.zeros(3)}]
        ],
    }
    rank = {"losses": [1.0], "grads": [{"w": torch.ones(2)}], "params": [{"w": torch.ones(2)}]}
    results = [
        {**rank, "replica": 0, "buffers": [{"n": torch.tensor(2), "m": torch.ones(3)}]},
        {
            **rank,
            "replica": 1,
            "buffers": [{"n": torch.tensor(3), "m": torch.zeros(3)}],
        },  # counter off by one
    ]
    checks, _ = _compare(results, ref, Tolerance(), num_stages=1)
    by = {(c.kind, c.name): c for c in checks}
    assert by[("buffer", "m")].passed and by[("buffer", "m")].copies == 2  # each replica vs its own reference
    assert not by[("buffer", "n")].passed and by[("buffer", "n")].max_abs == 1.0
