"""Stage construction on one process: the split program computes what the model computes, forward and
backward, for cuts anywhere (inside blocks, across skip connections, between a multi-output node and its
getitems, across non-tensor values)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import fx, nn

from distplan.errors import LoweringError
from distplan.lowering.split import StageModule, split_graph
from distplan.tracer import capture, resolve_model


def _names(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op not in ("get_attr", "output")]


def _cuts(names: list[str], positions: list[int]) -> list[list[str]]:
    bounds = [0, *positions, len(names)]
    return [names[a:b] for a, b in itertools.pairwise(bounds)]


def _pipeline_run(
    stages: list[StageModule], inputs: tuple[torch.Tensor, ...], loss_fn, target, model: nn.Module
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the stages as pipelining does: each stage on detached received tensors, backward stage by stage
    with the gradients the next stage sends back. Returns the loss and the gradients by the model's
    parameter names (stages share the model's Parameter objects here, so tied copies are one tensor)."""
    acts: list[tuple[tuple[torch.Tensor, ...], object]] = []
    x: tuple[torch.Tensor, ...] = inputs
    for i, st in enumerate(stages):
        # A copy, as pipelining receives into its own buffers (a stage may modify them in place).
        received = tuple(t.detach().clone().requires_grad_(i > 0 and t.is_floating_point()) for t in x)
        out = st.module(*received)
        acts.append((received, out))
        if isinstance(out, tuple):
            for t in out:
                assert t.is_contiguous(), f"stage {i} sends a non-contiguous tensor"
            x = out
        else:
            x = (out,)
    loss = loss_fn(acts[-1][1], target)
    grads_out: tuple[torch.Tensor | None, ...] | None = None
    for i in range(len(stages) - 1, -1, -1):
        received, out = acts[i]
        if i == len(stages) - 1:
            outs, gouts = [loss], [None]
        else:
            pairs = [(o, g) for o, g in zip(out, grads_out, strict=True) if o.requires_grad]  # type: ignore[arg-type]
            outs, gouts = [p[0] for p in pairs], [p[1] for p in pairs]
        torch.autograd.backward(outs, gouts)
        grads_out = tuple(t.grad if t.requires_grad else None for t in received)
        for g in grads_out:
            assert g is None or g.is_contiguous(), f"stage {i} sends back a non-contiguous gradient"
    canonical = {id(p): n for n, p in model.named_parameters()}
    grads = {canonical[id(p)]: p.grad for st in stages for p in st.module.parameters()}
    return loss, grads


@pytest.mark.parametrize(
    ("spec", "fractions"),
    [
        ("gpt-tiny", [0.5]),
        ("gpt-tiny", [0.13, 0.41, 0.77]),  # arbitrary node positions: inside attention, mid-MLP
        ("llama-tiny", [0.3, 0.6]),  # rotary cos/sin made in stage 0 and read by every stage: relayed
        ("gpt2-tiny", [0.25, 0.5, 0.75]),
        ("bert-tiny", [0.5]),
        ("mlp-tiny", [0.2, 0.9]),
    ],
)
def test_split_matches_model_forward_and_backward(spec: str, fractions: list[float]) -> None:
    b = resolve_model(spec, batch=2, seq=8, device="cpu", seed=0)
    inputs, target = b.make_batch(2, seed=1)
    gm = capture(b.module, inputs, b.example_kwargs).gm
    names = _names(gm)
    stages = split_graph(gm, stage_nodes=_cuts(names, [int(f * len(names)) for f in fractions]))
    assert len(stages) == len(fractions) + 1

    ref_loss = b.loss(b.module(*inputs), target)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in b.module.named_parameters()}
    b.module.zero_grad(set_to_none=True)

    loss, grads = _pipeline_run(stages, tuple(inputs), b.loss, target, b.module)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert set(grads) == set(ref)
    for n, g in ref.items():
        assert torch.allclose(grads[n], g, rtol=1e-5, atol=1e-7), n


def test_skip_connection_is_relayed_through_middle_stages() -> None:
    b = resolve_model("llama-tiny", batch=1, seq=8, device="cpu", seed=0)
    gm = capture(b.module, b.example_args, b.example_kwargs).gm
    names = _names(gm)
    stages = split_graph(
        gm, stage_nodes=_cuts(names, [len(names) // 4, len(names) // 2, 3 * len(names) // 4])
    )
    # Something made in stage 0 is read in stage 2 or 3: stage 1 receives it and sends it on.
    relayed = set(stages[1].inputs) & set(stages[1].outputs)
    assert relayed, "expected a value relayed through stage 1"
    for v in relayed:
        assert v in stages[2].inputs
    # Every stage only receives what its predecessor sends.
    for a, c in itertools.pairwise(stages):
        assert a.outputs == c.inputs


class _MultiOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, c = torch.split(self.lin(x), 3, dim=-1)  # a multi-output node
        h = a.transpose(0, 1)  # non-contiguous
        return self.out(h.transpose(0, 1) * c + x.size(1))  # x.size(1): a Python int under fx


def test_multi_output_node_noncontiguous_and_int_crossing_cuts() -> None:
    m = _MultiOut()
    x = torch.randn(4, 6)
    gm = fx.symbolic_trace(m)
    names = _names(gm)
    split_at = names.index("split") + 1  # between the multi-output node and its getitems
    tr = names.index("transpose") + 1  # right after the non-contiguous view
    size = names.index("size") + 1
    values = {}
    interp = fx.Interpreter(gm)
    orig = interp.run_node

    def record(n: fx.Node):  # type: ignore[no-untyped-def]
        values[n.name] = v = orig(n)
        return v

    interp.run_node = record  # type: ignore[method-assign]
    interp.run(x)
    cuts = sorted({split_at, tr, size})
    stages = split_graph(gm, stage_nodes=_cuts(names, cuts), example_values=values)
    crossing = {str(v) for st in stages for v in st.inputs}
    assert any(v.startswith("split[") for v in crossing), crossing
    assert not any(v.startswith("size") for v in crossing), "the int must be baked, not sent"
    target = torch.randn(4, 2)
    loss_fn = nn.functional.mse_loss
    ref = loss_fn(m(x), target)
    ref.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    loss, grads = _pipeline_run(stages, (x,), loss_fn, target, m)
    assert torch.allclose(loss, ref)
    for n, g in want.items():
        assert torch.allclose(grads[n], g, atol=1e-7), n


def test_bad_stage_lists_are_clear_errors() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(LoweringError, match="not in the captured graph"):
        split_graph(gm, stage_nodes=[["input_1", "_0"], ["nope"]])
    with pytest.raises(LoweringError, match="in no stage"):
        split_graph(gm, stage_nodes=[["input_1"], ["_0"]])
    with pytest.raises(LoweringError, match="reads '_0' from a later stage"):
        split_graph(gm, stage_nodes=[["input_1", "_1"], ["_0"]])
