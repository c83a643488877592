"""The model zoo and model specs: bundles, batches, losses, width reduction, factories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distplan.errors import ModelSpecError
from distplan.tracer import ModelBundle, list_models, resolve_model, trace


def test_list_models_names_and_sizes() -> None:
    infos = list_models()
    names = [m.name for m in infos]
    assert len(names) == len(set(names))
    assert all(n == n.lower() and " " not in n and "_" not in n for n in names)
    for required in ("mlp", "gpt", "gpt2", "gpt2-tiny", "gpt2-xl", "llama-tiny", "llama-7b", "llama-13b"):
        assert required in names
    assert {m.kind for m in infos} == {"causal-lm", "encoder", "regression"}


@pytest.mark.parametrize(
    "name",
    ["mlp-tiny", "gpt-tiny", "gpt2-tiny", "llama-tiny", "bert-tiny", "mlp", "gpt", "gpt2", "bert-base"],
)
def test_approx_params_are_close_to_the_real_count(name: str) -> None:
    info = next(m for m in list_models() if m.name == name)
    real = sum(p.numel() for p in resolve_model(name, seq=8).module.parameters())  # meta: no memory
    assert info.approx_params == pytest.approx(real, rel=0.01)


def test_meta_build_allocates_nothing_and_cpu_build_is_real() -> None:
    meta = resolve_model("llama-7b", seq=8, config_overrides={"num_hidden_layers": 1})
    assert all(p.device.type == "meta" for p in meta.module.parameters())
    cpu = resolve_model("llama-tiny", device="cpu", seq=8)
    assert all(p.device.type == "cpu" for p in cpu.module.parameters())
    assert cpu.module(*cpu.example_args).shape == (1, 8, 256)  # logits, one tensor


@pytest.mark.parametrize(
    ("name", "kind", "target_shape"),
    [
        ("gpt2-tiny", "causal-lm", (3, 12)),
        ("bert-tiny", "encoder", (3, 12, 64)),
        ("mlp-tiny", "regression", (3, 8)),
    ],
)
def test_make_batch_and_loss(name: str, kind: str, target_shape: tuple[int, ...]) -> None:
    b = resolve_model(name, batch=2, seq=12, device="cpu")
    assert b.kind == kind
    inputs, target = b.make_batch(3, seed=0)
    assert target.shape == target_shape
    out = b.module(*inputs)
    loss = b.loss(out, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in b.module.parameters())
    again, target2 = b.make_batch(3, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(inputs, again, strict=True)) and torch.equal(target, target2)
    other, _ = b.make_batch(3, seed=1)
    assert not torch.equal(inputs[0], other[0])


def test_causal_lm_loss_is_cross_entropy_over_the_vocabulary() -> None:
    b = resolve_model("gpt-tiny", device="cpu", seq=8)
    logits = torch.zeros(2, 8, 128)  # uniform prediction over 128 tokens
    target = torch.zeros(2, 8, dtype=torch.long)
    assert b.loss(logits, target).item() == pytest.approx(torch.log(torch.tensor(128.0)).item())


def test_width_reduced_keeps_layers_and_shrinks_width() -> None:
    b = resolve_model("gpt2", seq=64, batch=2, config_overrides={"n_layer": 3})
    small = b.width_reduced(max_hidden=32)
    assert small is not None
    assert small.config["n_layer"] == 3 and small.config["n_embd"] <= 32
    assert small.config["vocab_size"] <= 128
    assert all(p.device.type == "cpu" for p in small.module.parameters())
    assert small.example_args[0].shape == (2, 64)
    assert sum(p.numel() for p in small.module.parameters()) < 1_000_000
    assert trace(small).structure_hash == trace(b).structure_hash


def test_width_reduced_of_a_config_file(tmp_path: Path) -> None:
    cfg = {"model_type": "bert", "hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    b = resolve_model(str(tmp_path / "config.json"), seq=16)
    assert b.kind == "encoder"
    small = b.width_reduced(max_hidden=32)
    assert small is not None and small.config["hidden_size"] <= 32
    assert trace(small).structure_hash == trace(b).structure_hash


def test_factory_bundles_have_no_width_reduction(factories: str) -> None:
    b = resolve_model("tracer_test_factories:plain_mlp", batch=4, device="cpu")
    assert isinstance(b, ModelBundle) and b.kind == "regression"
    assert b.example_args[0].shape == (4, 6)
    inputs, target = b.make_batch(5, seed=0)
    assert inputs[0].shape == (5, 6) and target.shape == (5, 3)
    assert b.width_reduced() is None


@pytest.mark.parametrize(
    ("spec", "kwargs", "needle"),
    [
        ("", {}, "non-empty"),
        ("gpt-tiny", {"seq": 0}, "seq must be a positive integer, got 0"),
        ("gpt-tiny", {"device": "warp-drive"}, "is not a torch device"),
        ("gpt-tiny", {"config_overrides": {"n_embd": 30}}, "n_embd=30 is not divisible by n_head=4"),
        ("gpt-tiny", {"config_overrides": {"n_layers": 3}}, "unexpected keyword argument 'n_layers'"),
        ("/no/such/config.json", {}, "cannot read config file"),
    ],
)
def test_bad_specs(spec: str, kwargs: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ModelSpecError) as e:
        resolve_model(spec, **kwargs)
    assert needle in str(e.value)


def test_refuses_to_allocate_a_model_bigger_than_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import distplan.tracer.zoo as zoo

    monkeypatch.setattr(zoo, "_physical_memory", lambda: 16 * 10**9)  # the size of a 16 GB machine
    with pytest.raises(ModelSpecError) as e:
        resolve_model("llama-7b", device="cpu")
    assert "6.74B float32 parameters = 27.0 GB" in str(e.value) and "16.0 GB" in str(e.value)
    assert resolve_model("llama-7b", device="meta").module is not None  # meta needs no memory


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2, "d_kv": 16}, "encoder-decoder"),
        (
            {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
            "takes no input_ids",
        ),
    ],
)
def test_unsupported_hf_families_are_named(cfg: dict, needle: str, tmp_path: Path) -> None:  # type: ignore[type-arg]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(tmp_path / "config.json"))
    assert needle in str(e.value)
