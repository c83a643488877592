"""Models to trace: the built-in zoo, Hugging Face ``config.json`` files and importable factories.

:func:`resolve_model` turns a model *spec* into a :class:`ModelBundle`: the module (returning ONE tensor),
example inputs at the requested batch and sequence sizes, the config as plain JSON data, and what a training
step needs (seeded batches, the loss, a width-reduced copy for CPU validation).

A spec is one of

* a built-in name (:func:`list_models`), e.g. ``gpt2-tiny`` or ``llama-7b``;
* a path to a Hugging Face ``config.json`` (or a folder holding one): causal LMs (an ``architectures``
  entry ending in ``ForCausalLM``/``LMHeadModel``, or a decoder-only ``model_type``) are built with
  ``AutoModelForCausalLM.from_config``, others with ``AutoModel.from_config``; never ``trust_remote_code``;
* an importable factory ``package.module:function``.

[Note: factory contract]
The factory is called as ``function(**config_overrides)`` after ``torch.manual_seed(seed)`` and inside
``with torch.device(device)`` (so ``device="meta"`` allocates no weights). It returns one of

* a :class:`ModelBundle` (used as it is; ``batch``/``seq`` are then the factory's business);
* ``(module, example_args)`` or ``(module, example_args, example_kwargs)``;
* an ``nn.Module``: the example inputs then come from ``function.example_inputs(batch, seq)`` if the
  factory has that attribute, else from ``module.example_inputs(batch, seq)`` if the module has that
  method, else they are inferred from the first leaf module: an ``nn.Embedding`` gets token ids of shape
  ``(batch, seq)``, an ``nn.Linear`` gets ``torch.randn(batch, in_features)``.

Factory models are ``kind="regression"`` (MSE against random targets of the output's shape) unless the
factory returns a bundle, and have no width-reduced copy.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distplan.errors import ModelSpecError
from distplan.tracer.capture import TorchFailure
from distplan.tracer.models import GPT, MLP, GPTConfig, MLPConfig

__all__ = ["ModelBundle", "ModelInfo", "ModelKind", "list_models", "resolve_model"]

ModelKind = Literal["causal-lm", "encoder", "regression"]


# ---------------------------------------------------------------------------------------------- bundle
@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A model ready to trace or train.

    Attributes:
        name: short model name (the zoo name, the config's ``model_type`` or the factory's name).
        spec: what was asked for (zoo name, config path or ``package.module:function``).
        module: the model; ``module(*example_args, **example_kwargs)`` returns ONE tensor (logits for causal
            LMs, the last hidden state for encoders).
        example_args / example_kwargs: example inputs on the model's device at the requested batch/seq.
        config: the model's config as plain JSON data.
        kind: ``causal-lm`` (next-token cross-entropy), ``encoder`` or ``regression`` (MSE).
        batch / seq / device / seed: how it was built.
    """

    name: str
    spec: str
    module: nn.Module
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    config: dict[str, Any]
    kind: ModelKind
    batch: int = 1
    seq: int = 0
    device: str = "cpu"
    seed: int = 0
    _reduce: Callable[[int], ModelBundle] | None = field(default=None, repr=False)
    _target_shape: tuple[int, ...] | None = field(default=None, repr=False)

    def make_batch(self, batch: int, *, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Seeded CPU inputs and targets for one training step of ``batch`` samples.

        Causal LMs get random token ids and their next-token targets; other kinds get inputs shaped like the
        example inputs (batch dimension replaced) and standard-normal targets shaped like the output.
        """
        _check_positive("batch", batch)
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "causal-lm":
            vocab = int(self.config["vocab_size"])
            seq = int(self.example_args[0].shape[1])
            ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
            return (ids[:, :-1].contiguous(),), ids[:, 1:].contiguous()
        inputs = tuple(self._sample_like(a, batch, gen) for a in self.example_args)
        shape = self._target_shape
        if shape is None:
            # Factory models: learn the per-sample output shape from one forward on the meta device.
            shape = _output_shape(self.module, self.example_args, self.example_kwargs)[1:]
        target = torch.randn((batch, *shape), generator=gen)
        return inputs, target

    def _sample_like(self, a: Any, batch: int, gen: torch.Generator) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        shape = (batch, *a.shape[1:]) if a.dim() else ()
        if a.dtype.is_floating_point:
            return torch.randn(shape, generator=gen, dtype=a.dtype)
        high = int(self.config.get("vocab_size", 2))
        return torch.randint(0, high, shape, generator=gen, dtype=a.dtype)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean training loss: cross-entropy over the vocabulary for causal LMs, MSE otherwise."""
        if self.kind == "causal-lm":
            return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))
        return F.mse_loss(output.float(), target.float())

    def width_reduced(self, *, max_hidden: int = 64) -> ModelBundle | None:
        """The same architecture (same layers, graph structure and node names) with hidden, intermediate,
        head and vocabulary sizes shrunk to about ``max_hidden``, built on the CPU with seeded weights at the
        same batch and sequence; ``None`` when the model cannot be rebuilt (factories)."""
        _check_positive("max_hidden", max_hidden)
        if self._reduce is None:
            return None
        return self._reduce(max_hidden)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of the built-in zoo (for ``GET /v1/models`` and ``distplan models``)."""

    name: str
    family: str
    kind: ModelKind
    description: str
    approx_params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.kind,
            "description": self.description,
            "approx_params": self.approx_params,
        }


# ---------------------------------------------------------------------------------------------- zoo
@dataclass(frozen=True, slots=True)
class _ZooEntry:
    info: ModelInfo
    source: Literal["mlp", "gpt", "hf"]
    config: Mapping[str, Any]


_NO_DROPOUT_GPT2 = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
_NO_DROPOUT_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _entries() -> dict[str, _ZooEntry]:
    # Dropout is zero throughout so a training step is deterministic (the lowering compares numerics).
    rows: list[tuple[str, str, ModelKind, str, int, Literal["mlp", "gpt", "hf"], dict[str, Any]]] = [
        ("mlp", "mlp", "regression", "residual MLP, 8 blocks of width 4096 (545M)", 545_000_000, "mlp", {}),
        (
            "mlp-tiny",
            "mlp",
            "regression",
            "residual MLP, 3 blocks of width 32 (tests)",
            13_600,
            "mlp",
            {"in_features": 16, "hidden": 32, "num_layers": 3, "out_features": 8},
        ),
        (
            "gpt",
            "gpt",
            "causal-lm",
            "hand-written GPT, 12 layers, width 768, tied embedding",
            124_500_000,
            "gpt",
            {},
        ),
        (
            "gpt-tiny",
            "gpt",
            "causal-lm",
            "hand-written GPT, 2 layers, width 32 (tests)",
            46_000,
            "gpt",
            {"vocab_size": 128, "block_size": 512, "n_layer": 2, "n_head": 4, "n_embd": 32},
        ),
        (
            "gpt2",
            "gpt2",
            "causal-lm",
            "Hugging Face GPT-2 small (124M)",
            124_400_000,
            "hf",
            {"model_type": "gpt2", **_NO_DROPOUT_GPT2},
        ),
        (
            "gpt2-tiny",
            "gpt2",
            "causal-lm",
            "Hugging Face GPT-2, 2 layers, width 64 (tests)",
            149_000,
            "hf",
            {
                "model_type": "gpt2",
                "n_layer": 2,
                "n_embd": 64,
                "n_head": 4,
                "vocab_size": 256,
                "n_positions": 512,
                "bos_token_id": 0,
                "eos_token_id": 0,
                **_NO_DROPOUT_GPT2,
            },
        ),
        (
            "gpt2-xl",
            "gpt2",
            "causal-lm",
            "Hugging Face GPT-2 XL (1.5B)",
            1_558_000_000,
            "hf",
            {"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25, **_NO_DROPOUT_GPT2},
        ),
        (
            "llama-tiny",
            "llama",
            "causal-lm",
            "Hugging Face Llama, 2 layers, width 64, grouped-query attention (tests)",
            107_000,
            "hf",
            {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 256,
                "max_position_embeddings": 2048,
            },
        ),
        (
            "llama-7b",
            "llama",
            "causal-lm",
            "Llama-2-7B config: 32 layers, width 4096",
            6_738_000_000,
            "hf",
            {
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": 32000,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
            },
        ),
        (
            "llama-13b",
            "llama",
            "causal-lm",
            "Llama-2-13B config: 40 layers, width 5120",
            13_016_000_000,
            "hf",
            {
                "model_type": "llama",
                "hidden_size": 5120,
                "intermediate_size": 13824,
                "num_hidden_layers": 40,
                "num_attention_heads": 40,
                "num_key_value_heads": 40,
                "vocab_size": 32000,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
            },
        ),
        (
            "llama-70b",
            "llama",
            "causal-lm",
            "Llama-2-70B config: 80 layers, width 8192, grouped-query attention (8 KV heads)",
            68_977_000_000,
            "hf",
            {
                "model_type": "llama",
                "hidden_size": 8192,
                "intermediate_size": 28672,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "vocab_size": 32000,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
            },
        ),
        (
            "bert-tiny",
            "bert",
            "encoder",
            "Hugging Face BERT encoder, 2 layers, width 64 (tests)",
            133_000,
            "hf",
            {
                "model_type": "bert",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 512,
                "max_position_embeddings": 512,
                "add_pooling_layer": False,
                **_NO_DROPOUT_BERT,
            },
        ),
        (
            "bert-base",
            "bert",
            "encoder",
            "Hugging Face BERT-base encoder (110M)",
            108_900_000,
            "hf",
            {"model_type": "bert", "add_pooling_layer": False, **_NO_DROPOUT_BERT},
        ),
    ]
    return {
        name: _ZooEntry(ModelInfo(name, family, kind, desc, approx), source, cfg)
        for name, family, kind, desc, approx, source, cfg in rows
    }


_ZOO = _entries()


def list_models() -> list[ModelInfo]:
    """The built-in models, in a stable order (small before large within a family)."""
    return [e.info for e in _ZOO.values()]


# ---------------------------------------------------------------------------------------------- resolve
def resolve_model(
    spec: str,
    *,
    batch: int = 1,
    seq: int = 512,
    device: str = "meta",
    seed: int = 0,
    config_overrides: Mapping[str, Any] | None = None,
) -> ModelBundle:
    """Build the model named by ``spec`` (zoo name, ``config.json`` path or ``package.module:function``).

    ``device="meta"`` builds without allocating weights (for tracing); ``device="cpu"`` builds real
    weights drawn from ``seed`` (same seed, same weights). ``batch``/``seq`` size the example inputs
    (``seq`` is ignored by models without a sequence dimension). ``config_overrides`` replace config fields
    (e.g. ``{"num_hidden_layers": 2}``). Raises :class:`ModelSpecError` naming what is wrong.

        >>> b = resolve_model("gpt-tiny", batch=2, seq=16)
        >>> tuple(b.example_args[0].shape)
        (2, 16)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    _check_positive("batch", batch)
    _check_positive("seq", seq)
    dev = _check_device(device)
    overrides = dict(config_overrides or {})
    if spec in _ZOO:
        return _build_zoo(spec, _ZOO[spec], batch=batch, seq=seq, device=dev, seed=seed, overrides=overrides)
    path = Path(spec)
    if spec.endswith(".json") or path.is_dir() or (path.exists() and ":" not in spec):
        return _build_from_config_file(
            path, spec=spec, batch=batch, seq=seq, device=dev, seed=seed, overrides=overrides
        )
    if ":" in spec:
        return _build_from_factory(spec, batch=batch, seq=seq, device=dev, seed=seed, overrides=overrides)
    close = difflib.get_close_matches(spec.lower(), list(_ZOO), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelSpecError(
        f"unknown model {spec!r}: not a built-in name, a config.json path or a 'package.module:function' "
        f"factory.{hint} Built-in models: {', '.join(_ZOO)}."
    )


def _check_positive(what: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ModelSpecError(f"{what} must be a positive integer, got {v!r}")


def _check_device(device: str) -> str:
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as e:
        raise ModelSpecError(f"device {device!r} is not a torch device (use 'meta' or 'cpu'): {e}") from e


@contextlib.contextmanager
def _building(device: str, seed: int) -> Iterator[None]:
    # Seeding the global RNG here is what makes "same seed -> same weights" hold; the previous state is
    # restored so building a model does not perturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            yield


def _token_ids(batch: int, seq: int, vocab: int, device: str, seed: int) -> torch.Tensor:
    if device == "meta":
        return torch.zeros((batch, seq), dtype=torch.long, device="meta")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def _build_zoo(
    name: str, entry: _ZooEntry, *, batch: int, seq: int, device: str, seed: int, overrides: dict[str, Any]
) -> ModelBundle:
    if device != "meta":
        meta = _build_zoo(
            name, entry, batch=1, seq=min(seq, 8), device="meta", seed=seed, overrides=overrides
        )
        _check_fits(name, meta.module, device)
    cfg = {**entry.config, **overrides}
    if entry.source == "hf":
        cfg.pop("model_type", None)
        model_type = str(entry.config["model_type"])
        return _build_hf(
            {"model_type": model_type, **cfg},
            name=name,
            spec=name,
            batch=batch,
            seq=seq,
            device=device,
            seed=seed,
            skip_size_check=True,  # checked above
        )
    if entry.source == "mlp":
        try:
            mcfg = MLPConfig(**cfg)
        except (TypeError, ValueError) as e:
            raise ModelSpecError(f"bad config for {name!r}: {e}") from e
        with _building(device, seed):
            module: nn.Module = MLP(mcfg)
        x = torch.zeros(batch, mcfg.in_features, device="meta") if device == "meta" else None
        if x is None:
            x = torch.randn(batch, mcfg.in_features, generator=torch.Generator().manual_seed(seed)).to(device)
        return ModelBundle(
            name=name,
            spec=name,
            module=module.train(),
            example_args=(x,),
            example_kwargs={},
            config=mcfg.to_dict(),
            kind="regression",
            batch=batch,
            seq=seq,
            device=device,
            seed=seed,
            _reduce=_reducer(name, entry, batch=batch, seq=seq, seed=seed, overrides=overrides),
            _target_shape=(mcfg.out_features,),
        )
    try:
        gcfg = GPTConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"bad config for {name!r}: {e}") from e
    _check_seq(name, seq, gcfg.block_size, "block_size")
    with _building(device, seed):
        module = GPT(gcfg)
    return ModelBundle(
        name=name,
        spec=name,
        module=module.train(),
        example_args=(_token_ids(batch, seq, gcfg.vocab_size, device, seed),),
        example_kwargs={},
        config=gcfg.to_dict(),
        kind="causal-lm",
        batch=batch,
        seq=seq,
        device=device,
        seed=seed,
        _reduce=_reducer(name, entry, batch=batch, seq=seq, seed=seed, overrides=overrides),
    )


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(name: str, meta_module: nn.Module, device: str) -> None:
    """Refuse to allocate a model bigger than this machine's memory (building it would get the process
    killed, not raise an error)."""
    if device != "cpu":
        return
    need = sum(p.numel() * p.element_size() for p in meta_module.parameters())
    have = _physical_memory()
    if have is not None and need > 0.8 * have:
        raise ModelSpecError(
            f"{name} has {need / 4e9:.2f}B float32 parameters = {need / 1e9:.1f} GB, more than 80% of this "
            f"machine's {have / 1e9:.1f} GB of memory; trace it on the meta device (the default) or use its "
            "width_reduced() copy for numerics"
        )


def _check_seq(name: str, seq: int, limit: int, field_name: str) -> None:
    if seq > limit:
        raise ModelSpecError(
            f"seq {seq} is longer than {name}'s {limit} learned positions ({field_name}={limit}); "
            f"use --seq {limit} or less, or raise {field_name} in the config"
        )


def _reducer(
    name: str, entry: _ZooEntry, *, batch: int, seq: int, seed: int, overrides: dict[str, Any]
) -> Callable[[int], ModelBundle]:
    def reduce(max_hidden: int) -> ModelBundle:
        cfg = {**entry.config, **overrides}
        small = _reduced_config(entry.source, cfg, max_hidden)
        out = _build_zoo(
            name, entry, batch=batch, seq=seq, device="cpu", seed=seed, overrides={**overrides, **small}
        )
        return replace(out, spec=name)

    return reduce


def _reduced_heads(heads: int, kv_heads: int, max_hidden: int) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) with the same heads-per-KV-head ratio (the graph of grouped-query
    attention depends on it) and an even head dimension (rotary embeddings split it in halves)."""
    ratio = max(1, heads // max(1, kv_heads))
    new_heads = max(ratio, min(heads, max(1, max_hidden // 8)) // ratio * ratio)
    head_dim = max(2, (max_hidden // new_heads) // 2 * 2)
    return new_heads, new_heads // ratio, head_dim


def _reduced_config(source: str, cfg: Mapping[str, Any], max_hidden: int) -> dict[str, Any]:
    if source == "mlp":
        m = MLPConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
        return {
            "in_features": min(m.in_features, max_hidden),
            "hidden": min(m.hidden, max_hidden),
            "out_features": min(m.out_features, max_hidden),
        }
    if source == "gpt":
        g = GPTConfig(**cfg)
        heads, _, head_dim = _reduced_heads(g.n_head, g.n_head, max_hidden)
        return {
            "n_head": heads,
            "n_embd": min(g.n_embd, heads * head_dim),
            "vocab_size": min(g.vocab_size, 128),
        }
    return _reduced_hf_config(cfg, max_hidden)


def _reduced_hf_config(cfg: Mapping[str, Any], max_hidden: int) -> dict[str, Any]:
    from transformers import AutoConfig

    full = AutoConfig.for_model(**cfg).to_dict()
    out: dict[str, Any] = {}
    hidden_key = next((k for k in ("hidden_size", "n_embd", "d_model", "dim") if k in full), None)
    heads_key = next((k for k in ("num_attention_heads", "n_head", "n_heads") if k in full), None)
    if hidden_key is None or heads_key is None:
        raise ModelSpecError(
            f"cannot width-reduce model_type {full.get('model_type')!r}: no hidden size/heads field"
        )
    hidden, heads = int(full[hidden_key]), int(full[heads_key])
    kv = int(full.get("num_key_value_heads") or heads)
    new_heads, new_kv, head_dim = _reduced_heads(heads, kv, max_hidden)
    new_hidden = min(hidden, new_heads * head_dim)
    out[hidden_key] = new_hidden
    out[heads_key] = new_heads
    if "num_key_value_heads" in full:
        out["num_key_value_heads"] = new_kv
    if full.get("head_dim") is not None:
        out["head_dim"] = new_hidden // new_heads
    for key in ("intermediate_size", "n_inner", "ffn_dim"):
        if full.get(key):
            out[key] = max(2, int(full[key]) * new_hidden // hidden)
    if full.get("vocab_size"):
        out["vocab_size"] = min(int(full["vocab_size"]), 128)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # special tokens must stay inside the smaller vocabulary
            v = full.get(key)
            if isinstance(v, int) and v >= out["vocab_size"]:
                out[key] = out["vocab_size"] - 1
    return out


# ---------------------------------------------------------------------------------------------- HF
def _is_causal_lm(cfg: Mapping[str, Any]) -> bool:
    archs = cfg.get("architectures") or []
    if archs:
        return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = cfg.get("model_type")
    # Encoders like BERT also have a causal-LM head class; decoder-only types have no masked-LM one.
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _build_from_config_file(
    path: Path, *, spec: str, batch: int, seq: int, device: str, seed: int, overrides: dict[str, Any]
) -> ModelBundle:
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text()
    except OSError as e:
        raise ModelSpecError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(data, dict):
        raise ModelSpecError(
            f"{path}: expected a JSON object (a Hugging Face config), got {type(data).__name__}"
        )
    if "model_type" not in data:
        raise ModelSpecError(f"{path}: no 'model_type' field, so it is not a Hugging Face model config")
    data.pop("auto_map", None)  # remote code is never run
    name = str(data.get("model_type"))
    return _build_hf(
        {**data, **overrides},
        name=name,
        spec=spec,
        batch=batch,
        seq=seq,
        device=device,
        seed=seed,
        source=path,
    )


def _build_hf(
    cfg: dict[str, Any],
    *,
    name: str,
    spec: str,
    batch: int,
    seq: int,
    device: str,
    seed: int,
    source: Path | None = None,
    skip_size_check: bool = False,
) -> ModelBundle:
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as e:
        raise ModelSpecError(
            f"model {spec!r} needs Hugging Face transformers: pip install 'distplan[hf]' ({e})"
        ) from e
    where = str(source) if source is not None else spec
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
        hint = f" (closest known: {', '.join(close)})" if close else ""
        raise ModelSpecError(
            f"{where}: model_type {model_type!r} is not known to transformers"
            f"{hint}; custom code (trust_remote_code) is never run"
        )
    # The attention implementation is a build argument (below), not a config field.
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", *_ATTN_KEYS)}
    kwargs["use_cache"] = False
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:  # transformers raises many types (strict-dataclass validators among them)
        raise ModelSpecError(f"{where}: invalid {model_type} config: {_one_line(e)}") from TorchFailure.of(e)
    causal = _is_causal_lm(cfg)
    rope = any(
        k in cfg or getattr(config, k, None) for k in ("rope_theta", "rope_parameters", "rope_scaling")
    )
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and not rope:
        field_name = (
            "max_position_embeddings" if hasattr(config, "max_position_embeddings") else "n_positions"
        )
        _check_seq(name, seq, int(limit), field_name)
    auto = AutoModelForCausalLM if causal else AutoModel
    if getattr(config, "is_encoder_decoder", False):
        raise ModelSpecError(
            f"{where}: {model_type} is an encoder-decoder model; distplan traces decoder-only (causal LM) "
            "and encoder models fed input_ids, or any model through a package.module:function factory"
        )
    if device != "meta" and not skip_size_check:
        probe = _build_hf(
            cfg, name=name, spec=spec, batch=1, seq=min(seq, 8), device="meta", seed=seed, source=source
        )
        _check_fits(name, probe.module, device)
    extra: dict[str, Any] = {"attn_implementation": _attn_implementation(cfg, auto, config, where)}
    if not causal and "add_pooling_layer" in cfg:
        extra["add_pooling_layer"] = bool(cfg["add_pooling_layer"])
    try:
        with _building(device, seed):
            try:
                model = auto.from_config(config, **extra)
            except (TypeError, ValueError):
                extra.pop("add_pooling_layer", None)
                model = auto.from_config(config, **extra)
    except Exception as e:
        raise ModelSpecError(
            f"{where}: cannot build {model_type} model ({auto.__name__}): {_one_line(e)}"
        ) from TorchFailure.of(e)
    if "input_ids" not in inspect.signature(type(model).forward).parameters:
        raise ModelSpecError(
            f"{where}: {type(model).__name__}.forward takes no input_ids (not a text model); use a "
            "package.module:function factory that returns the model with its example inputs"
        )
    _single_output(model, "logits" if causal else "last_hidden_state")
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    plain = config.to_dict()
    plain["attn_implementation"] = extra["attn_implementation"]
    plain = json.loads(json.dumps(plain, default=str))
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    bundle_cfg = dict(cfg)

    def reduce(max_hidden: int) -> ModelBundle:
        small = {**bundle_cfg, **_reduced_hf_config(bundle_cfg, max_hidden)}
        return _build_hf(
            small, name=name, spec=spec, batch=batch, seq=seq, device="cpu", seed=seed, source=source
        )

    return ModelBundle(
        name=name,
        spec=spec,
        module=model.train(),
        example_args=(_token_ids(batch, seq, vocab, device, seed),),
        example_kwargs={},
        config=plain,
        kind="causal-lm" if causal else "encoder",
        batch=batch,
        seq=seq,
        device=device,
        seed=seed,
        _reduce=reduce,
        _target_shape=None if causal or hidden is None else (seq, int(hidden)),
    )


_ATTN_KEYS = ("attn_implementation", "_attn_implementation")
# What a model class says it supports, per attention implementation (transformers' PreTrainedModel flags).
_ATTN_SUPPORT_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


def _attn_implementation(cfg: Mapping[str, Any], auto: Any, config: Any, where: str) -> str:
    """The attention implementation to build the model with.

    The config's own ``attn_implementation`` (or ``_attn_implementation``) when it has one; otherwise
    ``sdpa`` where the model class supports it (one fused op the tracer counts and prices as flash
    attention), else ``eager``, which every transformers model has (Mamba, RWKV, GPT-Neo, MPT, ...).
    Raises :class:`ModelSpecError` when the config asks for one the class does not support, naming the
    ones it does.
    """
    try:
        cls = auto._model_mapping[type(config)]
    except Exception:  # not in the mapping: let from_config report it
        cls = None
    supported = ["eager"] + [
        impl for impl, flag in _ATTN_SUPPORT_FLAGS.items() if cls is not None and getattr(cls, flag, False)
    ]
    asked = next((cfg[k] for k in _ATTN_KEYS if cfg.get(k) is not None), None)
    if asked is None:
        return "sdpa" if "sdpa" in supported else "eager"
    if not isinstance(asked, str) or not asked.strip():
        raise ModelSpecError(f"{where}: attn_implementation must be a string such as 'eager', got {asked!r}")
    asked = asked.strip()
    if cls is not None and asked in _ATTN_SUPPORT_FLAGS and asked not in supported:
        raise ModelSpecError(
            f"{where}: attn_implementation {asked!r} is not supported by {cls.__name__}; "
            f"it supports {', '.join(repr(s) for s in supported)} (set attn_implementation in the config)"
        )
    return asked


_SINGLE_OUTPUT_CLASSES: dict[tuple[type, str], type] = {}


def _single_output(model: nn.Module, attr: str) -> None:
    """Make ``model(input_ids)`` return one tensor, in place.

    The model's class is swapped for a subclass whose ``forward`` returns ``outputs.<attr>``. A subclass
    rather than a wrapper module keeps the parameter and module names the model's own
    (``model.layers.3.self_attn``), which is what the planner and lowering key on. ``position_ids`` are
    passed explicitly at full batch size: without them transformers expands them only when batch > 1,
    which would give batch 1 a different graph from other batch sizes.
    """
    base = type(model)
    key = (base, attr)
    cls = _SINGLE_OUTPUT_CLASSES.get(key)
    if cls is None:
        params = inspect.signature(base.forward).parameters
        takes_positions = "position_ids" in params
        takes_cache = "use_cache" in params

        def forward(self: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
            kw: dict[str, Any] = {"input_ids": input_ids}
            if takes_positions:
                b, t = input_ids.shape
                kw["position_ids"] = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
            if takes_cache:
                kw["use_cache"] = False
            out = base.forward(self, **kw)
            value = getattr(out, attr, None)
            return value if isinstance(value, torch.Tensor) else out[0]

        # A distinct __qualname__ makes pickling the whole module fail loudly instead of silently
        # unpickling as the base class (whose forward returns a ModelOutput); state_dicts are unaffected.
        cls = type(
            base.__name__,
            (base,),
            {
                "forward": forward,
                "__module__": base.__module__,
                "__qualname__": f"{base.__qualname__}.{attr}",
            },
        )
        _SINGLE_OUTPUT_CLASSES[key] = cls
    model.__class__ = cls


# ---------------------------------------------------------------------------------------------- factories
def _build_from_factory(
    spec: str, *, batch: int, seq: int, device: str, seed: int, overrides: dict[str, Any]
) -> ModelBundle:
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ModelSpecError(f"factory spec {spec!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelSpecError(f"cannot import module {mod_name!r} of factory {spec!r}: {e}") from e
    except Exception as e:
        raise ModelSpecError(
            f"importing module {mod_name!r} of factory {spec!r} raised {type(e).__name__}: {e}"
        ) from TorchFailure.of(e)
    fn: Any = mod
    for part in fn_name.split("."):
        if not hasattr(fn, part):
            raise ModelSpecError(f"module {mod_name!r} has no attribute {fn_name!r} (factory {spec!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelSpecError(f"factory {spec!r} is a {type(fn).__name__}, not a function")
    try:
        with _building(device, seed):
            result = fn(**overrides)
    except Exception as e:
        raise ModelSpecError(
            f"factory {spec!r} raised {type(e).__name__}: {_one_line(e)}"
        ) from TorchFailure.of(e)
    if isinstance(result, ModelBundle):
        return result
    kwargs: dict[str, Any] = {}
    if isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        module = result[0]
        args = result[1] if isinstance(result[1], tuple) else (result[1],)
        if len(result) == 3:
            if not isinstance(result[2], dict):
                raise ModelSpecError(f"factory {spec!r}: the third item (example kwargs) must be a dict")
            kwargs = dict(result[2])
    elif isinstance(result, nn.Module):
        module = result
        args = _factory_inputs(spec, fn, module, batch=batch, seq=seq, device=device, seed=seed)
    else:
        raise ModelSpecError(
            f"factory {spec!r} returned {type(result).__name__}; expected an nn.Module, "
            "(module, example_args[, example_kwargs]) or a ModelBundle"
        )
    args = tuple(_to_device(a, device) for a in args)
    kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
    return ModelBundle(
        name=fn_name.rsplit(".", 1)[-1],
        spec=spec,
        module=module,
        example_args=args,
        example_kwargs=kwargs,
        config={"factory": spec, **{k: v for k, v in overrides.items() if _is_json(v)}},
        kind="regression",
        batch=batch,
        seq=seq,
        device=device,
        seed=seed,
    )


def _one_line(e: BaseException, limit: int = 400) -> str:
    """An exception as one line: multi-line messages (validators, torch) joined, cut at ``limit``."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def _to_device(a: Any, device: str) -> Any:
    return a.to(device) if isinstance(a, torch.Tensor) else a


def _factory_inputs(
    spec: str, fn: Any, module: nn.Module, *, batch: int, seq: int, device: str, seed: int
) -> tuple[Any, ...]:
    maker = getattr(fn, "example_inputs", None) or getattr(module, "example_inputs", None)
    if callable(maker):
        with _building("cpu" if device == "meta" else device, seed):
            out = maker(batch, seq)
        return out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            if device == "meta":
                return (torch.zeros((batch, seq), dtype=torch.long),)
            return (torch.randint(0, m.num_embeddings, (batch, seq), generator=gen),)
        if isinstance(m, nn.Linear):
            return (torch.randn(batch, m.in_features, generator=gen),)
        if next(m.children(), None) is None and m is not module:
            break
    raise ModelSpecError(
        f"cannot infer example inputs for {type(module).__name__} from factory {spec!r}: give the factory "
        "an example_inputs(batch, seq) attribute, or return (module, example_args)"
    )


def _output_shape(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # A fake-tensor run gives the output shape without computing anything, whatever device the model is on.
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        out = module(*args, **kwargs)
    return tuple(out.shape)
