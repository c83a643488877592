"""Mixture-of-experts FLOPs: grouped expert matmuls, data-dependent routing and the formulas torch lacks.

Reference throughout: torch's ``FlopCounterMode`` over a real CPU run of the same model with its experts
run one by one (transformers' ``experts_implementation="eager"``, or a hand-written per-expert loop), where
every expert is a plain ``linear`` the counter knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distplan.tracer import resolve_model, trace
from distplan.tracer.flops import flop_counter

# A two-layer Mixtral: 4 experts, top-2, hidden 64, expert width 128 (the size of the case).
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "router_aux_loss_coef": 0.0,
    "output_router_logits": False,
    "tie_word_embeddings": False,
}
# A second family: Qwen3-MoE, 6 experts, top-2, its own expert width.
QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 6,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
# OLMoE: top-3 of 8.
OLMOE = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 3,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "eos_token_id": 2,
}


def _eager_counts(module: nn.Module, args: tuple[Any, ...]) -> tuple[int, int]:
    """FLOPs of one real forward and backward (SDPA's math backend, which the counter sees)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        out = module(*args)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as bwd:
        out.backward(torch.ones_like(out))
    return fwd.get_total_flops(), bwd.get_total_flops()


def _expert_flops(cfg: dict[str, Any], tokens: int) -> int:
    """Forward FLOPs of all routed experts by hand: every token goes to k experts, each a gated MLP
    (gate and up projection ``hidden -> 2 x width``, down projection ``width -> hidden``)."""
    hidden = cfg["hidden_size"]
    width = cfg.get("moe_intermediate_size", cfg["intermediate_size"])
    per_token = 2 * hidden * 2 * width + 2 * width * hidden
    return cfg["num_hidden_layers"] * tokens * cfg["num_experts_per_tok"] * per_token


@pytest.mark.parametrize(("cfg", "batch"), [(MIXTRAL, 1), (MIXTRAL, 2), (QWEN3_MOE, 2), (OLMOE, 1)])
def test_moe_flops_match_the_eager_expert_loop(cfg: dict[str, Any], batch: int, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    seq = 16
    g = trace(str(path), batch=batch, seq=seq)  # meta device, as `distplan trace` does
    assert "uncounted_flops" not in g.meta
    experts = sum(n.fwd_flops for n in g.nodes if n.module.endswith(".experts"))
    assert experts == _expert_flops(cfg, batch * seq)
    eager = resolve_model(
        str(path), batch=batch, seq=seq, device="cpu", config_overrides={"experts_implementation": "eager"}
    )
    fwd, bwd = _eager_counts(eager.module, eager.example_args)
    assert g.fwd_flops == pytest.approx(fwd, rel=0.01)
    assert g.bwd_flops == pytest.approx(bwd, rel=0.01)


def test_mixtral_case_counts_its_experts(tmp_path: Path) -> None:
    # The figures, derived: seq 16, batch 1 -> 1,196,032 FLOPs outside the routed experts, plus
    # 2 layers x 16 tokens x top-2 x (2*64*256 + 2*128*64) inside them.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MIXTRAL))
    g = trace(str(path), seq=16)
    outside = sum(n.fwd_flops for n in g.nodes if not n.module.endswith(".experts"))
    assert outside == 1_196_032
    assert g.fwd_flops == outside + 2 * 16 * 2 * (2 * 64 * 256 + 2 * 128 * 64) == 4_341_760


class LoopMoE(nn.Module):
    """The textbook top-k MoE: route, then loop over experts gathering each one's tokens (data-dependent
    sizes: ``torch.where`` on the routing)."""

    def __init__(self, d: int = 32, h: int = 64, e: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)) for _ in range(e)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = x.reshape(-1, d)
        weights, idx = torch.topk(F.softmax(self.router(x), dim=-1), self.k, dim=-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == i)
            out = out.index_add(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out.reshape(b, t, d)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_loop_moe_with_real_weights_counts_the_real_routing(method: str) -> None:
    from distplan.tracer import capture, graph_from_capture

    torch.manual_seed(0)
    model, x = LoopMoE(), torch.randn(2, 8, 32)
    fwd, bwd = _eager_counts(model, (x,))
    cap = capture(model, (x,), method=method)  # type: ignore[arg-type]
    g = graph_from_capture(cap, model, (x,), name="loop")
    assert (g.fwd_flops, g.bwd_flops) == (fwd, bwd)
    assert g.meta["sampled_nodes"] == 4  # one torch.where per expert
    # real weights: each expert gets the tokens the real router sends it
    with torch.no_grad():
        idx = torch.topk(model.router(x.reshape(-1, 32)), 2, dim=-1).indices
    first = [n for n in g.nodes if n.outputs and n.outputs[0].shape[-1] == 64 and n.fwd_flops]
    assert [n.outputs[0].shape[0] for n in first] == [int((idx == i).sum()) for i in range(4)]


def test_loop_moe_on_meta_is_exact_in_total_and_deterministic() -> None:
    with torch.device("meta"):
        model = LoopMoE()
    x = torch.randn(2, 8, 32)
    a, b = trace(model, (x,)), trace(model, (x,))
    with torch.device("cpu"):
        real = LoopMoE()
    fwd, bwd = _eager_counts(real, (x,))
    # any top-2 routing sends 16 tokens x 2 to the experts: the total is exact, the split a sample
    assert (a.fwd_flops, a.bwd_flops) == (fwd, bwd)
    assert a.meta["sampled_nodes"] == 4
    assert [n.outputs for n in a.nodes] == [n.outputs for n in b.nodes]


class GroupedMoE(nn.Module):
    """torchtitan-style experts: tokens sorted by expert, one ``torch._grouped_mm`` per projection (bf16,
    the dtype its meta kernel takes)."""

    def __init__(self, d: int = 32, h: int = 64, e: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k, self.e = k, e
        self.router = nn.Linear(d, e, bias=False, dtype=torch.bfloat16)
        self.w1 = nn.Parameter(torch.randn(e, d, h, dtype=torch.bfloat16))
        self.w2 = nn.Parameter(torch.randn(e, h, d, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = x.reshape(-1, d)
        w, idx = torch.topk(F.softmax(self.router(x).float(), -1), self.k, dim=-1)
        order = torch.argsort(idx.reshape(-1))
        counts = torch.histc(idx.reshape(-1).float(), bins=self.e, min=0, max=self.e - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        hidden = F.gelu(torch._grouped_mm(x[order // self.k], self.w1, offs=offs))
        y = torch._grouped_mm(hidden, self.w2, offs=offs) * w.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add(0, order // self.k, y).reshape(b, t, d)


def test_grouped_mm_moe_counts_every_routed_token() -> None:
    with torch.device("meta"):
        model = GroupedMoE()
    g = trace(model, (torch.randn(2, 8, 32, dtype=torch.bfloat16),))
    tokens = 2 * 8
    router = 2 * tokens * 32 * 4
    grouped = [n for n in g.nodes if n.target == "aten._grouped_mm.default"]
    assert [n.fwd_flops for n in grouped] == [2 * tokens * 2 * 32 * 64, 2 * tokens * 2 * 64 * 32]
    assert g.fwd_flops == router + sum(n.fwd_flops for n in grouped)
    # backward: the first grouped matmul's input is the (non-trainable) model input: weight gradient only
    assert [n.bwd_flops for n in grouped] == [grouped[0].fwd_flops, 2 * grouped[1].fwd_flops]


def _m(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


# Each op the counter has no formula for, beside the same product written with mm/bmm, which it counts.
_EQUIVALENT = {
    "mv": (lambda: torch.mv(_m(4, 5), _m(5)), lambda: torch.mm(_m(4, 5), _m(5, 1))),
    "dot": (lambda: torch.dot(_m(5), _m(5)), lambda: torch.mm(_m(1, 5), _m(5, 1))),
    "addmv": (lambda: torch.addmv(_m(4), _m(4, 5), _m(5)), lambda: torch.mm(_m(4, 5), _m(5, 1))),
    "addbmm": (
        lambda: torch.addbmm(_m(4, 6), _m(3, 4, 5), _m(3, 5, 6)),
        lambda: torch.bmm(_m(3, 4, 5), _m(3, 5, 6)),
    ),
    "bilinear": (  # x1^T W x2 for 7 outputs: (4, 5) @ (5, 7*6), then 7*6 products per row
        lambda: F.bilinear(_m(4, 5), _m(4, 6), _m(7, 5, 6)),
        lambda: torch.mm(_m(4, 5), _m(5, 7 * 6)),
    ),
    "grouped_mm_2d_3d": (
        lambda: torch._grouped_mm(
            _m(12, 8, dtype=torch.bfloat16),
            _m(3, 16, 8, dtype=torch.bfloat16).transpose(-2, -1),
            offs=_m(3, dtype=torch.int32),
        ),
        lambda: torch.mm(_m(12, 8), _m(8, 16)),
    ),
    "grouped_mm_2d_2d": (  # a weight gradient: (m, K) x (K, n) split along K into 3 groups
        lambda: torch._grouped_mm(
            _m(16, 24, dtype=torch.bfloat16),
            _m(8, 24, dtype=torch.bfloat16).transpose(-2, -1),
            offs=_m(3, dtype=torch.int32),
        ),
        lambda: torch.mm(_m(16, 24), _m(24, 8)),
    ),
    "grouped_mm_3d_3d": (
        lambda: torch._grouped_mm(
            _m(3, 4, 8, dtype=torch.bfloat16), _m(3, 16, 8, dtype=torch.bfloat16).transpose(-2, -1)
        ),
        lambda: torch.bmm(_m(3, 4, 8), _m(3, 8, 16)),
    ),
}


@pytest.mark.parametrize("name", sorted(_EQUIVALENT))
def test_formula_equals_the_same_product_through_mm(name: str) -> None:
    op, same = _EQUIVALENT[name]
    with FlopCounterMode(display=False) as plain:
        op()
    assert plain.get_total_flops() == 0  # what torch alone counts (the fault)
    with flop_counter() as ours:
        op()
    with FlopCounterMode(display=False) as ref:
        same()
    expected = ref.get_total_flops()
    if name == "bilinear":
        expected = 2 * 4 * 7 * 5 * 6  # the mm above already is 2*4*5*42: one multiply-add per term
    assert ours.get_total_flops() == expected > 0
