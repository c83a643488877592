"""Hugging Face models are built with an attention implementation they support: the config's own
``attn_implementation`` when it names one, else SDPA where the class has it, else eager attention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distplan.errors import ModelSpecError
from distplan.tracer import resolve_model, trace

# State-space model, no attention at all (transformers offers it "eager" only).
MAMBA = {
    "architectures": ["MambaForCausalLM"],
    "model_type": "mamba",
    "vocab_size": 128,
    "hidden_size": 64,
    "state_size": 8,
    "num_hidden_layers": 2,
    "expand": 2,
    "conv_kernel": 4,
    "use_cache": False,
}
# Attention with local and global layers, eager (and flash) only.
GPT_NEO = {
    "architectures": ["GPTNeoForCausalLM"],
    "model_type": "gpt_neo",
    "vocab_size": 128,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "attention_types": [[["global", "local"], 1]],
    "window_size": 8,
    "max_position_embeddings": 64,
    "embed_dropout": 0.0,
    "attention_dropout": 0.0,
    "resid_dropout": 0.0,
}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "vocab_size": 64,
}


def _config(tmp_path: Path, cfg: dict[str, Any]) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("cfg", [MAMBA, GPT_NEO], ids=["mamba", "gpt_neo"])
def test_models_without_sdpa_trace_with_eager_attention(cfg: dict[str, Any], tmp_path: Path) -> None:
    spec = _config(tmp_path, cfg)
    bundle = resolve_model(spec, batch=2, seq=16, device="cpu", seed=1)
    assert bundle.config["attn_implementation"] == "eager"
    g = trace(bundle)
    assert g.meta["method"] == "export"
    assert not any("scaled_dot_product" in n.target for n in g.nodes)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        out = bundle.module(*bundle.example_args)
    with FlopCounterMode(display=False) as bwd:
        out.backward(torch.ones_like(out))
    assert g.fwd_flops == pytest.approx(fwd.get_total_flops(), rel=0.01)
    assert g.bwd_flops == pytest.approx(bwd.get_total_flops(), rel=0.01)
    # the meta build (what `distplan trace` uses) chooses the same and gives the same graph
    assert trace(spec, batch=2, seq=16).structure_hash == g.structure_hash


@pytest.mark.parametrize("key", ["attn_implementation", "_attn_implementation"])
def test_config_attn_implementation_is_honoured(key: str, tmp_path: Path) -> None:
    default = trace(_config(tmp_path, LLAMA), seq=16)
    assert sum("scaled_dot_product" in n.target for n in default.nodes) == 1  # SDPA when supported
    eager = trace(_config(tmp_path, {**LLAMA, key: "eager"}), seq=16)
    assert not any("scaled_dot_product" in n.target for n in eager.nodes)
    assert any(n.target == "aten.softmax.int" for n in eager.nodes)
    assert eager.fwd_flops == default.fwd_flops  # same matmuls, written out


def test_unsupported_attn_implementation_names_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError) as e:
        resolve_model(_config(tmp_path, {**MAMBA, "attn_implementation": "sdpa"}), seq=8)
    msg = str(e.value)
    assert "'sdpa' is not supported by MambaForCausalLM" in msg and "supports 'eager'" in msg
    with pytest.raises(ModelSpecError, match="must be a string"):
        resolve_model(_config(tmp_path, {**MAMBA, "attn_implementation": 3}), seq=8)
