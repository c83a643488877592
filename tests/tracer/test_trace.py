"""Tracing the zoo: node conventions, JSON round-trip, parameter bytes, FLOPs and activation memory
against torch's own counts, structure stability across batch size and width."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distplan.graph import OpGraph
from distplan.tracer import capture, graph_from_capture, resolve_model, trace

TINY = ("mlp-tiny", "gpt-tiny", "gpt2-tiny", "llama-tiny", "bert-tiny")


@pytest.mark.parametrize("name", TINY)
def test_trace_tiny_models_follow_node_conventions(name: str, traced: Callable[..., OpGraph]) -> None:
    g = traced(name)
    g.lint()
    assert g.meta["method"] == "export"
    assert g.meta["batch"] == 1 and g.meta["seq"] == 32 and g.meta["spec"] == name
    assert g.meta["trace_seconds"] > 0
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 and g.nodes[0].op == "placeholder"
    assert g.outputs and all(o in g.index() for o in g.outputs)
    names = g.index()
    module = resolve_model(name).module
    tensors = {
        *dict(module.named_parameters(remove_duplicate=False)),
        *dict(module.named_buffers(remove_duplicate=False)),
    }
    for n in g.nodes:
        # inputs are graph nodes only; parameters and buffers are listed by FQN in `params`
        assert all(i in names for i in n.inputs)
        assert set(n.params) <= tensors, n.name
        if n.op != "placeholder" and "assert" not in n.target:
            assert n.outputs, f"{n.name} has no tensor output"
    # every parameter is read by some node, under one of its names (tied weights have several)
    by_name = dict(module.named_parameters(remove_duplicate=False))
    read = {id(by_name[p]) for n in g.nodes for p in n.params if p in by_name}
    assert read == {id(p) for p in module.parameters()}
    # the logits / hidden state of the last node have the model's output shape
    out = g.nodes[names[g.outputs[0]]].outputs[0]
    assert out.shape[0] == 1
    assert g.fwd_flops > 0 and g.bwd_flops > g.fwd_flops
    assert g.activation_bytes > 0


def test_module_names_are_the_original_models(traced: Callable[..., OpGraph]) -> None:
    g = traced("llama-tiny")
    modules = {n.module for n in g.nodes}
    assert "model.layers.1.self_attn.q_proj" in modules
    assert "model.layers.0.mlp.down_proj" in modules
    assert "lm_head" in modules
    q = next(n for n in g.nodes if n.module == "model.layers.0.self_attn.q_proj")
    assert q.params == ("model.layers.0.self_attn.q_proj.weight",)
    # a parameter's bytes sit on the first node that reads it: hidden 64 x 64 floats
    assert q.param_bytes == 64 * 64 * 4


@pytest.mark.parametrize("name", TINY)
def test_param_bytes_match_torch_with_tied_weights_once(name: str, traced: Callable[..., OpGraph]) -> None:
    g = traced(name)
    module = resolve_model(name, seq=32).module
    unique = list(module.parameters())  # torch deduplicates tied parameters
    assert g.num_params == sum(p.numel() for p in unique)
    assert g.param_bytes == sum(p.numel() * p.element_size() for p in unique)
    assert sum(n.param_bytes for n in g.nodes) == g.param_bytes


def test_tied_embedding_is_counted_once(traced: Callable[..., OpGraph]) -> None:
    g = traced("gpt-tiny")
    module = resolve_model("gpt-tiny").module
    with_ties = sum(p.numel() for _, p in module.named_parameters(remove_duplicate=False))
    vocab, width = 128, 32
    assert with_ties - g.num_params == vocab * width
    readers = [n for n in g.nodes if any(p.endswith("wte.weight") or p == "lm_head.weight" for p in n.params)]
    assert len(readers) == 2  # the embedding lookup and the LM head read the same tensor
    assert sum(1 for n in readers if n.param_bytes >= vocab * width * 4) == 1


@pytest.mark.parametrize("name", TINY)
def test_flops_match_flop_counter_of_a_real_forward_and_backward(name: str) -> None:
    # Reference: torch's FlopCounterMode over one real CPU training step of the whole model. The math SDPA
    # backend makes attention visible to the counter (the CPU flash kernel counts 0).
    bundle = resolve_model(name, batch=2, seq=24, device="cpu", seed=1)
    g = trace(bundle)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            out = bundle.module(*bundle.example_args)
        with FlopCounterMode(display=False) as bwd:
            out.backward(torch.ones_like(out))
    assert g.fwd_flops == pytest.approx(fwd.get_total_flops(), rel=0.01)
    assert g.bwd_flops == pytest.approx(bwd.get_total_flops(), rel=0.01)
    assert g.fwd_flops + g.bwd_flops == pytest.approx(fwd.get_total_flops() + bwd.get_total_flops(), rel=0.01)


def test_first_linear_on_an_input_has_backward_equal_forward() -> None:
    # No gradient flows to the input, so the backward computes only the weight gradient: one matmul.
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    g = trace(model, (torch.randn(5, 8),))
    mm = [n for n in g.nodes if n.fwd_flops]
    assert [n.fwd_flops for n in mm] == [2 * 5 * 8 * 16, 2 * 5 * 16 * 4]
    assert [n.bwd_flops for n in mm] == [2 * 5 * 8 * 16, 2 * 2 * 5 * 16 * 4]


def _saved_bytes_of_real_forward(bundle) -> int:  # type: ignore[no-untyped-def]
    held = {t.untyped_storage()._cdata for t in [*bundle.module.parameters(), *bundle.module.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in held:
            seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bundle.module(*bundle.example_args)
    return sum(seen.values())


@pytest.mark.parametrize(("name", "tolerance"), [("mlp-tiny", 0.0), ("gpt-tiny", 0.15), ("llama-tiny", 0.15)])
def test_activation_bytes_match_what_autograd_saves(name: str, tolerance: float) -> None:
    # Reference: unique storages autograd saves in a real CPU forward (parameters excluded). Attention and
    # the layouts kernels choose differ a little between the meta and CPU devices, hence the tolerance.
    bundle = resolve_model(name, batch=2, seq=24, device="cpu")
    g = trace(bundle)
    real = _saved_bytes_of_real_forward(bundle)
    assert g.activation_bytes == pytest.approx(real, rel=tolerance, abs=0)


def test_activation_bytes_by_hand() -> None:
    # linear(x): saves x (for the weight gradient); relu saves its output; the second linear saves that
    # same output again, which is charged once; x is (5, 8) float32 = 160 B, the relu output 5x16x4 = 320 B.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    g = trace(model, (torch.randn(5, 8),))
    ops = [(n.target, n.activation_bytes) for n in g.nodes if n.op != "placeholder"]
    assert ops == [("aten.linear.default", 160), ("aten.relu.default", 320), ("aten.linear.default", 0)]
    assert g.activation_bytes == 480


@pytest.mark.parametrize("name", TINY)
def test_json_round_trip(name: str, traced: Callable[..., OpGraph], tmp_path) -> None:  # type: ignore[no-untyped-def]
    g = traced(name)
    again = OpGraph.from_json(g.to_json())
    assert again == g
    assert again.content_hash == g.content_hash
    path = tmp_path / "g.json"
    g.save(path)
    assert OpGraph.load(path).cut_costs() == g.cut_costs()


@pytest.mark.parametrize("name", TINY)
def test_structure_is_stable_across_batch_device_and_width(name: str, traced: Callable[..., OpGraph]) -> None:
    # The lowering re-captures a CPU copy (another batch, maybe width-reduced) and finds cuts by node name.
    meta = traced(name, batch=1, seq=32)
    cpu_bundle = resolve_model(name, batch=3, seq=32, device="cpu")
    cpu = trace(cpu_bundle)
    assert cpu.structure_hash == meta.structure_hash
    small = cpu_bundle.width_reduced(max_hidden=16)
    assert small is not None
    reduced = trace(small)
    assert reduced.structure_hash == meta.structure_hash
    assert reduced.param_bytes < meta.param_bytes or name == "mlp-tiny"


def test_width_reduced_llama_keeps_grouped_query_structure() -> None:
    # llama-70b has 8 query heads per KV head; the reduced copy must keep that ratio or the graph changes.
    cfg = {"num_hidden_layers": 2}
    full = trace(resolve_model("llama-70b", seq=16, config_overrides=cfg))
    small_bundle = resolve_model(
        "llama-70b", seq=16, batch=2, device="meta", config_overrides=cfg
    ).width_reduced()
    assert small_bundle is not None
    assert small_bundle.config["num_attention_heads"] // small_bundle.config["num_key_value_heads"] == 8
    assert small_bundle.config["hidden_size"] <= 64
    small = trace(small_bundle)
    assert small.structure_hash == full.structure_hash
    assert full.num_params > 1000 * small.num_params


def test_capture_names_match_between_graph_and_graph_module() -> None:
    bundle = resolve_model("gpt2-tiny", batch=2, seq=16, device="cpu")
    cap = capture(bundle.module, bundle.example_args)
    g = graph_from_capture(cap, bundle.module, bundle.example_args, name="x")
    fx_names = [n.name for n in cap.gm.graph.nodes if n.op not in ("get_attr", "output")]
    assert [n.name for n in g.nodes] == fx_names
    # the captured module computes what the model computes
    torch.testing.assert_close(cap.gm(*bundle.example_args), bundle.module(*bundle.example_args))


def test_fx_capture_gives_the_same_numbers_as_export() -> None:
    bundle = resolve_model("mlp-tiny", batch=4, device="cpu")
    ex = graph_from_capture(
        capture(bundle.module, bundle.example_args), bundle.module, bundle.example_args, name="m"
    )
    cap = capture(bundle.module, bundle.example_args, method="fx")
    assert cap.method == "fx"
    fx = graph_from_capture(cap, bundle.module, bundle.example_args, name="m")
    assert any(n.op == "call_module" for n in fx.nodes)
    assert (fx.fwd_flops, fx.bwd_flops, fx.param_bytes) == (ex.fwd_flops, ex.bwd_flops, ex.param_bytes)
    assert fx.activation_bytes == ex.activation_bytes
    fc1 = next(n for n in fx.nodes if n.module == "blocks.0.fc1")
    assert fc1.params == ("blocks.0.fc1.weight", "blocks.0.fc1.bias")


class _ClipsWeights(nn.Module):
    """Clips its weights in place in forward (WGAN-style): torch.export rejects the ``.data`` write."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc.weight.data.clamp_(-1.0, 1.0)
        return self.fc(x).relu()


def test_falls_back_to_fx_when_export_fails() -> None:
    g = trace(_ClipsWeights(), (torch.randn(3, 4),))
    assert g.meta["method"] == "fx"
    assert "export_error" in g.meta
    assert g.fwd_flops == 2 * 3 * 4 * 4
    assert g.param_bytes == (16 + 4) * 4 and sum(n.param_bytes for n in g.nodes) == g.param_bytes
    fc = next(n for n in g.nodes if n.op == "call_module")
    assert fc.module == "fc" and set(fc.params) == {"fc.weight", "fc.bias"}


def test_same_seed_same_weights_and_batches() -> None:
    a = resolve_model("gpt-tiny", device="cpu", seed=3)
    b = resolve_model("gpt-tiny", device="cpu", seed=3)
    c = resolve_model("gpt-tiny", device="cpu", seed=4)
    for (na, pa), (_, pb) in zip(a.module.named_parameters(), b.module.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.module.parameters(), c.module.parameters(), strict=True)
    )
    x1, y1 = a.make_batch(3, seed=7)
    x2, y2 = a.make_batch(3, seed=7)
    assert torch.equal(x1[0], x2[0]) and torch.equal(y1, y2)
    assert x1[0].shape == (3, 512) and y1.shape == (3, 512)
    # next-token targets: the target is the input shifted by one
    assert torch.equal(x1[0][:, 1:], y1[:, :-1])


def test_meta_module_with_cpu_example_inputs() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    g = trace(model, (torch.randn(3, 8),))
    assert g.meta["method"] == "export"
    assert g.fwd_flops == 2 * 3 * (8 * 16 + 16 * 4)
    assert all(p.device.type == "meta" for p in model.parameters())  # the model is left as it was


def test_batchnorm_traced_at_one_sample_says_to_trace_a_larger_batch() -> None:
    from distplan.errors import DistplanError

    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).train()
    with pytest.raises(DistplanError, match=r"batch-statistics layer.*batch of at least 2 \(--batch 2\)"):
        trace(model, torch.randn(1, 16), device="cpu")
    # Two samples per channel are enough.
    assert len(trace(model, torch.randn(2, 16), device="cpu").nodes) > 4
