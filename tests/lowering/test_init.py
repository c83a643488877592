"""The reproducible initialisation on one process: every tensor's value depends on the seed and its name
only, not on which other tensors a rank draws; the model's own init schemes are kept; tensors no init
writes keep their constructor values; what cannot be given a value is named."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from distplan.errors import LoweringError
from distplan.lowering.init import derive_seed, initialize, replay_constructor, tensor_slots
from distplan.tracer import resolve_model


def _meta(spec: str) -> nn.Module:
    return resolve_model(spec, batch=2, seq=8, device="meta").module  # type: ignore[no-any-return]


def _replay(spec: str):  # type: ignore[no-untyped-def]
    return lambda wanted: replay_constructor(lambda: _meta(spec), wanted)


@pytest.mark.parametrize(
    "spec",
    [
        "gpt2-tiny",
        "llama-tiny",
        "bert-tiny",
        "gpt-tiny",
        "mlp-tiny",
        "fault_models:conv_bn",
        "fault_models:causal_mixer",
    ],
)
def test_values_do_not_depend_on_which_tensors_are_drawn(spec: str) -> None:
    full = initialize(_meta(spec), seed=7, replay=_replay(spec))
    names = list(full)
    assert names == list(tensor_slots(_meta(spec)))
    rng = random.Random(0)
    # Contiguous runs of names (what pipeline stages hold) and random subsets (anything else).
    cut = len(names) // 3
    for subset in (names[:cut], names[cut:], rng.sample(names, max(1, len(names) // 4))):
        model = _meta(spec)
        part = initialize(model, subset, seed=7, replay=_replay(spec))
        assert list(part) == subset
        for n in subset:
            assert torch.equal(part[n], full[n]), n
        # Only the drawn tensors got memory.
        real = {k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"}
        assert real <= set(subset) | {
            a for s in tensor_slots(model).values() if s.name in subset for a in s.aliases
        }


def test_same_seed_same_values_other_seed_other_values_and_the_model_schemes_are_kept() -> None:
    a = initialize(_meta("gpt2-tiny"), seed=1)
    b = initialize(_meta("gpt2-tiny"), seed=1)
    c = initialize(_meta("gpt2-tiny"), seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.h.0.attn.c_attn.weight"], c["transformer.h.0.attn.c_attn.weight"])
    # Hugging Face GPT-2's own scheme: N(0, 0.02), LayerNorm (1, 0), zero biases, and the residual
    # projections scaled by 1/sqrt(2 * n_layer) (its _init_weights on GPT2Attention / GPT2MLP).
    big = initialize(
        resolve_model("gpt2-tiny", config_overrides={"n_embd": 256}, device="meta").module, seed=1
    )
    std = big["transformer.h.0.mlp.c_fc.weight"].std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    proj = big["transformer.h.1.mlp.c_proj.weight"].std().item()
    assert proj == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.05)
    assert torch.equal(big["transformer.h.0.ln_1.weight"], torch.ones(256))
    assert torch.equal(big["transformer.h.0.attn.c_attn.bias"], torch.zeros(3 * 256))
    # Llama's rotary table is a buffer the constructor computes; its _init_weights recomputes it.
    llama = initialize(_meta("llama-tiny"), seed=1)
    ref = resolve_model("llama-tiny", device="cpu").module
    assert torch.allclose(llama["model.rotary_emb.inv_freq"], ref.model.rotary_emb.inv_freq)
    # torch modules: reset_parameters (kaiming-uniform Linear, bound 1/sqrt(fan_in)).
    mlp = initialize(_meta("mlp-tiny"), seed=1)
    w = next(v for k, v in mlp.items() if k.endswith("weight") and v.dim() == 2)
    assert w.abs().max() <= 1 / math.sqrt(w.shape[1]) and w.std() > 0


def test_constructor_values_of_tensors_no_init_writes() -> None:
    spec = "fault_models:causal_mixer"
    eager = resolve_model(spec, device="cpu").module
    want = {"gain": eager.gain, "mask": eager.mask, "calls": eager.calls}
    # On meta: replayed from the constructor (the model built again, its small tensors on the CPU).
    got = initialize(_meta(spec), seed=3, replay=_replay(spec))
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # A module built with values: the same values (replayed first, so both ways agree).
    again = initialize(resolve_model(spec, device="cpu").module, seed=3, replay=_replay(spec))
    assert all(torch.equal(again[k], got[k]) for k in got)
    # And read from the module when it cannot be rebuilt.
    own = initialize(resolve_model(spec, device="cpu").module, seed=3)
    assert all(torch.equal(own[k], got[k]) for k in got)


def test_a_tensor_without_any_value_is_named() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4))

    with torch.device("meta"):
        m = Scaled()
    with pytest.raises(
        LoweringError, match=r"no initialisation writes 1 tensor\(s\).*'meta': scale \(in Scaled\)"
    ):
        initialize(m, seed=0)
    with pytest.raises(LoweringError, match="not in the model: nope"):
        initialize(m, ["lin.weight", "nope"], seed=0)


def test_derived_seeds_are_stable_and_distinct() -> None:
    # A fixed value: the scheme must not change silently (checkpoints of fresh runs depend on it).
    assert derive_seed(0, "tensor", "lin.weight", 0) == 6033796211469219988
    seeds = {derive_seed(s, "tensor", n, k) for s in (0, 1) for n in ("a", "b") for k in (0, 1)}
    assert len(seeds) == 8 and all(0 <= x < 2**63 for x in seeds)


# ---------------------------------------------------------------------------------------------- lower, one rank
def _one_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(port))


@pytest.mark.parametrize("spec", ["fault_models:forward_constants", "fault_models:causal_mixer", "gpt2-tiny"])
def test_lower_builds_on_meta_and_computes_what_the_initialised_model_computes(
    spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec is built on meta; the rank's tensors come from the reproducible initialisation (constructor
    values and constants made in forward included): its loss is the single-device model's."""
    import torch.distributed as dist

    from distplan.lowering import lower
    from distplan.lowering._model import resolve_source
    from distplan.planner import evaluate
    from distplan.tracer import trace

    g = trace(spec, batch=2, seq=6)
    plan = evaluate(g, cluster="cpu-local", layout=f"gpipe m2x2 | 0:{len(g)}@0", global_batch=4)
    _one_rank_env(monkeypatch)
    try:
        runner = lower(plan, spec, seq=6, optimizer="sgd", lr=0.1, timeout_s=60, device="cpu", seed=5)
        batch = runner.source.sample(4, seed=1)
        loss = runner.step(batch.args, batch.target, batch.kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ref = resolve_model(spec, batch=2, seq=6, device="meta", seed=5)
    initialize(ref.module, seed=5, replay=lambda w: replay_constructor(lambda: _meta(spec), w))
    src = resolve_source(ref, batch=2, seq=6)
    with torch.no_grad():
        want = src.loss(src.select(ref.module(*batch.args, **batch.kwargs)), batch.target)
    assert loss == pytest.approx(float(want), rel=1e-5)
