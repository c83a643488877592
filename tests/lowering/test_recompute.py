"""Recomputation on a captured stage graph (one process): the attention cores are found from the graph's ops
(never from names), and ``full`` / ``selective`` recomputation keep loss and every gradient exactly while
saving fewer bytes for the backward (counted with autograd's saved-tensor hooks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distplan.errors import LoweringError
from distplan.lowering._model import capture_model, resolve_source
from distplan.lowering.recompute import apply_recompute, attention_core_regions


class OddlyNamedAttention(nn.Module):
    """Attention written out, with names that say nothing (so only the ops can identify it)."""

    def __init__(self, width: int = 32, heads: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.alpha = nn.Linear(width, 3 * width)
        self.omega = nn.Linear(width, width)
        self.zeta = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.heads, self.p = heads, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        a, c, d = self.alpha(x).split(w, dim=-1)
        a, c, d = (t.view(b, s, self.heads, w // self.heads).transpose(1, 2) for t in (a, c, d))
        mask = torch.full((s, s), float("-inf")).triu(1)
        scores = a @ c.transpose(-2, -1) / math.sqrt(w // self.heads) + mask
        weights = nn.functional.dropout(scores.softmax(dim=-1), p=self.p, training=self.training)
        y = (weights @ d).transpose(1, 2).reshape(b, s, w)
        x = x + self.omega(y)
        return x + self.zeta(x)


def _run(
    module: nn.Module, params: dict[str, nn.Parameter], *inputs: torch.Tensor
) -> tuple[float, dict, int]:
    for p in params.values():
        p.grad = None
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs)
        loss = (out if isinstance(out, torch.Tensor) else out[0]).float().pow(2).mean()
    loss.backward()
    return float(loss), {k: p.grad.clone() for k, p in params.items()}, sum(saved)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_written_out_attention_is_found_by_its_ops_and_recomputed_exactly(dropout: float) -> None:
    torch.manual_seed(0)
    model = OddlyNamedAttention(p=dropout)
    x = torch.randn(2, 64, 32)
    gm = torch.export.export(model, (x,), strict=False).module()
    regions = attention_core_regions(gm)
    assert len(regions) == 1
    ops = regions[0]
    # From the product of the two activations through scale, mask, softmax (and dropout) to the product
    # with the values; the projections (parameters) stay outside.
    assert "softmax" in " ".join(ops) and len(ops) >= 4
    assert not any(n.startswith(("linear", "alpha", "omega")) for n in ops)
    params = dict(gm.named_parameters())
    base = _run(gm, params, x)
    for mode in ("selective", "full"):
        module, n = apply_recompute(gm, mode)
        assert n == 1
        got = _run(module, params, x)
        assert got[0] == base[0]
        for k in params:
            torch.testing.assert_close(got[1][k], base[1][k], rtol=0, atol=0)
        assert got[2] < base[2], (mode, got[2], base[2])
    # The scores (2 x 4 x 64 x 64 floats, saved by softmax and the product) are what selective drops.
    _, _, sel = _run(apply_recompute(gm, "selective")[0], params, x)
    assert base[2] - sel >= 2 * 4 * 64 * 64 * 4
    # Parameters keep their objects under the recomputed submodule.
    module, _ = apply_recompute(gm, "selective")
    assert {id(p) for p in module.parameters()} == {id(p) for p in gm.parameters()}


@pytest.mark.parametrize("spec", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_hugging_face_attention_cores_eager_and_fused(spec: str) -> None:
    for impl, fused in (("eager", False), ("sdpa", True)):
        src = resolve_source(spec, batch=2, seq=16, config_overrides={"attn_implementation": impl})
        ex = src.sample(2, seed=0)
        cap = capture_model(src, ex.args, ex.kwargs)
        regions = attention_core_regions(cap.gm)
        assert len(regions) == 2, (spec, impl, regions)  # one per layer
        if fused:
            assert all(len(r) == 1 and "scaled_dot_product" in r[0] for r in regions)
        else:
            assert all(len(r) >= 4 and any("softmax" in n for n in r) for r in regions)
        flat = cap.flatten(ex.args, ex.kwargs)
        params = dict(cap.gm.named_parameters())
        base = _run(cap.gm, params, *flat)
        for mode in ("selective", "full"):
            module, _ = apply_recompute(cap.gm, mode)
            got = _run(module, params, *flat)
            assert got[0] == base[0]
            for k in params:
                torch.testing.assert_close(got[1][k], base[1][k], rtol=0, atol=0)
            assert got[2] < base[2]


def test_no_attention_no_regions_and_bad_mode() -> None:
    src = resolve_source("mlp-tiny", batch=2, seq=None)
    ex = src.sample(2, seed=0)
    cap = capture_model(src, ex.args, ex.kwargs)
    assert attention_core_regions(cap.gm) == []
    module, n = apply_recompute(cap.gm, "selective")
    assert n == 0 and module is cap.gm
    with pytest.raises(LoweringError, match="unknown recompute mode 'most'"):
        apply_recompute(cap.gm, "most")
