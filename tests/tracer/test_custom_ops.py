"""Custom ops and custom autograd Functions under capture: FLOPs that no formula covers are reported, a
Function whose backward the graph would lose is refused at trace time, and the remedy the error gives (a
``torch.library.custom_op`` with ``register_autograd``) traces and keeps its backward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from distplan.errors import TraceError
from distplan.tracer import capture, graph_from_capture, resolve_model, trace


# ---------------------------------------------------------------------------------------------- FLOP gaps
@torch.library.custom_op("distplan_test::opaque_mm", mutates_args=())
def opaque_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


@opaque_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("distplan_test::counted_mm", mutates_args=())
def counted_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


@counted_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


@register_flop_formula(torch.ops.distplan_test.counted_mm)
def _counted_mm_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    return 2 * x_shape[0] * x_shape[1] * w_shape[1]


@torch.library.custom_op("distplan_test::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 16))
        self.w2 = nn.Parameter(torch.randn(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return counted_mm(scale(opaque_mm(x, self.w1)), self.w2)


def test_custom_op_without_a_flop_formula_is_reported() -> None:
    g = trace(_CustomOps(), (torch.randn(3, 8),))
    gaps = g.meta["uncounted_flops"]
    # the opaque matmul is named with its reason; the formula registered with torch counts; the elementwise
    # op (one matrix operand) counts 0 by the counter's convention and is not flagged
    assert list(gaps) == ["distplan_test.opaque_mm.default"]
    assert gaps["distplan_test.opaque_mm.default"]["nodes"] == 1
    assert "register_flop_formula" in gaps["distplan_test.opaque_mm.default"]["reason"]
    counted = next(n for n in g.nodes if n.target == "distplan_test.counted_mm.default")
    assert counted.fwd_flops == 2 * 3 * 16 * 4 == g.fwd_flops


def test_matmul_class_node_at_zero_flops_needs_a_reason() -> None:
    from distplan.tracer.flops import uncounted_reason

    mm = torch.ops.aten.mm.default
    a, b = torch.empty(4, 5, device="meta"), torch.empty(5, 6, device="meta")
    assert "matmul-class" in (uncounted_reason("aten.mm.default", mm, 0, [a, b]) or "")
    assert uncounted_reason("aten.mm.default", mm, 240, [a, b]) is None  # counted
    empty = torch.empty(0, 5, device="meta")
    assert uncounted_reason("aten.mm.default", mm, 0, [empty, b]) is None  # nothing to compute
    add = torch.ops.aten.add.Tensor
    assert uncounted_reason("aten.add.Tensor", add, 0, [a, a]) is None  # elementwise: 0 by convention


def test_models_with_only_known_ops_report_no_gap(traced) -> None:  # type: ignore[no-untyped-def]
    for name in ("mlp-tiny", "gpt-tiny", "gpt2-tiny", "llama-tiny", "bert-tiny"):
        assert "uncounted_flops" not in traced(name).meta, name


# ---------------------------------------------------------------------------------------------- Functions
class RoundSTE(torch.autograd.Function):
    """Quantise to quarters, pass a halved gradient straight through: not the derivative of the forward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return g * 0.5


class ExactGelu(torch.autograd.Function):
    """A memory-saving tanh-GELU: saves only its input; its backward is the exact derivative."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3)))

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        inner = 0.7978845608 * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        d_inner = 0.7978845608 * (1 + 3 * 0.044715 * x**2)
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner)


class _Net(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = self.fn.apply(torch.tanh(blk(x)))
        return self.out(x)


@pytest.mark.parametrize("method", ["auto", "fx"])
def test_function_with_its_own_backward_is_refused_by_name(method: str) -> None:
    from torch.autograd import Function

    apply_before = Function.__dict__["apply"]
    with pytest.raises(TraceError) as e:
        capture(_Net(RoundSTE), (torch.randn(2, 16),), method=method)  # type: ignore[arg-type]
    msg = str(e.value)
    assert "RoundSTE" in msg and "custom torch.autograd.Function" in msg
    assert "x = self.fn.apply(torch.tanh(blk(x)))" in msg  # where it is applied
    assert "torch.library.custom_op" in msg and "register_autograd" in msg  # what to do
    if method == "auto":  # export: the probe measured the difference
        assert "differs from the derivative of its forward" in msg
    assert Function.__dict__["apply"] is apply_before  # the watch is undone, also on error


def test_trace_refuses_it_too_and_names_it_for_the_cli() -> None:
    with pytest.raises(TraceError, match="RoundSTE"):
        trace(_Net(RoundSTE), (torch.randn(2, 16),))


def test_function_whose_backward_is_the_derivative_traces() -> None:
    model, x = _Net(ExactGelu), torch.randn(2, 16)
    cap = capture(model, (x,))
    assert cap.inlined_functions == (f"{__name__}.ExactGelu",)
    torch.testing.assert_close(cap.gm(x), model(x))


def test_functions_applied_without_gradients_are_not_watched() -> None:
    model = _Net(RoundSTE).requires_grad_(False)
    cap = capture(model, (torch.randn(2, 16),))  # inference only: no backward to lose
    assert cap.inlined_functions == ()


# The remedy the error gives, verified: a custom op with its backward registered.
@torch.library.custom_op("distplan_test::round_ste", mutates_args=())
def round_ste(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 4) / 4


@round_ste.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


round_ste.register_autograd(lambda ctx, g: g * 0.5)


class _OpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = round_ste(torch.tanh(blk(x)))
        return self.out(x)


def test_the_custom_op_remedy_traces_and_keeps_its_backward() -> None:
    torch.manual_seed(0)
    model, x = _OpNet(), torch.randn(6, 16)
    cap = capture(model, (x,))
    assert cap.method == "export"
    assert sum(1 for n in cap.gm.graph.nodes if "round_ste" in str(n.target)) == 3
    g = graph_from_capture(cap, model, (x,), name="op")  # annotates on meta
    assert g.fwd_flops == 2 * 6 * 16 * (16 * 3 + 4)
    # the captured graph trains with the custom backward: its gradients are the eager module's
    cap.gm(x).square().sum().backward()
    model(x).square().sum().backward()
    captured = dict(cap.gm.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(captured[name].grad, p.grad)


def test_hf_model_with_an_exact_function_still_traces(tmp_path: Path) -> None:
    # BLOOM's GELU is an autograd.Function whose backward is its derivative.
    cfg = {
        "model_type": "bloom",
        "architectures": ["BloomForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "n_layer": 1,
        "n_head": 4,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bundle = resolve_model(str(tmp_path / "config.json"), seq=8)
    cap = capture(bundle.module, bundle.example_args)
    assert [f.rsplit(".", 1)[-1] for f in cap.inlined_functions] == ["GeLUFunction"]
