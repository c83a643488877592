"""What the tracer finds a tensor-parallel group can split, on real traced models (meta device).

Each model is checked for the regions it should have (kinds, parameters by FQN and the dimension each is
split along, valid degrees) and, for all of them, for the invariants the planner relies on: a region's
FLOPs are its nodes', the collectives of a transformer block move ``hidden x seq x 4`` bytes per sample,
every valid degree divides every split parameter, and the annotation survives the graph's JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distplan.graph import OpGraph
from distplan.tensor_parallel import ParamSplit, TensorParallelRegion, divisors
from distplan.tracer import trace

BATCH, SEQ = 2, 8
FP32 = 4

# Hugging Face configs no other tracer test builds (written to a temporary folder by `_hf`).
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "router_aux_loss_coef": 0.0,
    "output_router_logits": False,
    "tie_word_embeddings": False,
}
# Phi-3: q, k and v from one fused projection (grouped-query: 4 query heads, 2 kv heads), gate and up too.
PHI3 = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# Gemma with one key/value head (multi-query attention): only the queries can be split by heads.
GEMMA_MQA = {
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}
# OLMo-2 normalises q and k over all heads together: splitting heads would need a collective inside.
OLMO2 = {
    "architectures": ["Olmo2ForCausalLM"],
    "model_type": "olmo2",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "bos_token_id": None,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], OpGraph]:
    """``hf(config)``: the model of a Hugging Face config traced at BATCH x SEQ (cached per config)."""
    cache: dict[str, OpGraph] = {}

    def get(config: dict[str, Any]) -> OpGraph:
        key = json.dumps(config, sort_keys=True)
        if key not in cache:
            folder = tmp_path_factory.mktemp(config["model_type"])
            (folder / "config.json").write_text(json.dumps(config))
            cache[key] = trace(str(folder / "config.json"), batch=BATCH, seq=SEQ)
        return cache[key]

    return get


def _regions(g: OpGraph, kind: str | None = None) -> list[TensorParallelRegion]:
    assert g.tensor_parallel is not None
    return [r for r in g.tensor_parallel.regions if kind is None or r.kind == kind]


def _splits(r: TensorParallelRegion) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """Parameter FQN -> (role, dim, pieces)."""
    return {p.name: (p.role, p.dim, p.pieces) for p in r.params}


def _check_invariants(g: OpGraph) -> None:
    """What holds for every annotation, whatever the model."""
    ann = g.tensor_parallel
    assert ann is not None and ann.batch == BATCH
    ann.lint(g)
    index = g.index()
    owner: dict[str, int] = {}
    for i, r in enumerate(ann.regions):
        nodes = [g.nodes[index[n]] for n in r.nodes]
        assert r.fwd_flops == sum(n.fwd_flops for n in nodes)
        assert r.bwd_flops == sum(n.bwd_flops for n in nodes)
        for n in (*r.nodes, *r.whole_nodes):
            assert owner.setdefault(n, i) == i, f"{n} in regions {owner[n]} and {i}"
        assert r.degrees == divisors(math.gcd(*r.split_sizes))
        assert all(s % t == 0 for s in r.split_sizes for t in r.degrees)
        for p in r.params:
            for t in r.degrees:
                local = p.local_shape(t)  # raises if t does not divide a split size
                assert p.dim is None or local[p.dim] * t == p.shape[p.dim]
        for c in r.collectives:
            assert c.node in index
    # The graph's JSON keeps the annotation exactly.
    assert OpGraph.from_json(g.to_json()).tensor_parallel == ann


def _block_collectives(r: TensorParallelRegion, hidden: int) -> None:
    """One backward all-reduce of the region input's gradient and one forward all-reduce of the row
    output, each ``hidden x seq`` fp32 values per sample (Megatron's f and g)."""
    per_sample = hidden * SEQ * FP32
    kinds = sorted((c.phase, c.reason, c.bytes_per_sample, c.fixed_bytes) for c in r.collectives)
    assert kinds == [
        ("backward", "input-gradient", per_sample, 0),
        ("forward", "partial-output", per_sample, 0),
    ]


# ---------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_fused_qkv_conv1d_layout_and_tied_vocabulary(traced: Callable[..., OpGraph]) -> None:
    g = traced("gpt2-tiny", batch=BATCH, seq=SEQ)  # hidden 64, 4 heads, 2 layers, vocab 256
    _check_invariants(g)
    assert [r.kind for r in _regions(g)] == [
        "embedding",
        "embedding",
        "attention",
        "mlp",
        "attention",
        "mlp",
        "output",
    ]
    for layer, (attn, mlp) in enumerate(zip(_regions(g, "attention"), _regions(g, "mlp"), strict=True)):
        h = f"transformer.h.{layer}"
        # Conv1D weights are [in, out]: column-parallel splits dim 1, row-parallel dim 0. c_attn makes q, k
        # and v at once, so each of its three blocks is split (rank r holds part r of q, of k and of v).
        assert _splits(attn) == {
            f"{h}.attn.c_attn.weight": ("column", 1, (64, 64, 64)),
            f"{h}.attn.c_attn.bias": ("column", 0, (64, 64, 64)),
            f"{h}.attn.c_proj.weight": ("row", 0, ()),
            f"{h}.attn.c_proj.bias": ("replicated", None, ()),
        }
        assert attn.degrees == (1, 2, 4)  # 4 heads
        assert _splits(mlp) == {
            f"{h}.mlp.c_fc.weight": ("column", 1, ()),
            f"{h}.mlp.c_fc.bias": ("column", 0, ()),
            f"{h}.mlp.c_proj.weight": ("row", 0, ()),
            f"{h}.mlp.c_proj.bias": ("replicated", None, ()),
        }
        assert mlp.degrees == divisors(256)  # the MLP's width
        _block_collectives(attn, 64)
        _block_collectives(mlp, 64)
    # The token embedding and the LM head are one tensor: both split it by vocabulary rows.
    wte, wpe = _regions(g, "embedding")
    (head,) = _regions(g, "output")
    assert _splits(wte) == {"lm_head.weight": ("vocab", 0, ())}
    assert _splits(head) == {"lm_head.weight": ("column", 0, ())}
    assert _splits(wpe) == {"transformer.wpe.weight": ("vocab", 0, ())}
    assert head.collectives[-1].reason == "loss-statistics"
    assert head.collectives[-1].bytes_per_sample == 3 * SEQ * FP32  # max, sum-exp, target logit per token
    # Layer norms stay replicated: no region reads them.
    assert not any("ln_" in p.name for r in _regions(g) for p in r.params)


# ---------------------------------------------------------------------------------------------- Llama
def test_llama_grouped_query_attention_limits_the_degree_to_the_kv_heads(
    traced: Callable[..., OpGraph],
) -> None:
    g = traced("llama-tiny", batch=BATCH, seq=SEQ)  # hidden 64, 4 heads, 2 kv heads, width 128
    _check_invariants(g)
    assert [r.kind for r in _regions(g)] == ["embedding", "attention", "mlp", "attention", "mlp", "output"]
    for layer, (attn, mlp) in enumerate(zip(_regions(g, "attention"), _regions(g, "mlp"), strict=True)):
        p = f"model.layers.{layer}"
        # nn.Linear weights are [out, in]: DTensor Shard(0) for column-, Shard(1) for row-parallel.
        assert _splits(attn) == {
            f"{p}.self_attn.q_proj.weight": ("column", 0, ()),
            f"{p}.self_attn.k_proj.weight": ("column", 0, ()),
            f"{p}.self_attn.v_proj.weight": ("column", 0, ()),
            f"{p}.self_attn.o_proj.weight": ("row", 1, ()),
        }
        assert {4, 2} <= set(attn.split_sizes)  # query heads and kv heads
        assert attn.degrees == (1, 2)
        assert _splits(mlp) == {
            f"{p}.mlp.gate_proj.weight": ("column", 0, ()),
            f"{p}.mlp.up_proj.weight": ("column", 0, ()),
            f"{p}.mlp.down_proj.weight": ("row", 1, ()),
        }
        assert mlp.degrees == divisors(128)
        _block_collectives(attn, 64)
        _block_collectives(mlp, 64)
        # The attention region holds the rotary products and attention itself, the MLP its product.
        targets = {g.nodes[g.index()[n]].target for n in attn.nodes}
        assert "aten.scaled_dot_product_attention.default" in targets
    split = set(g.tensor_parallel.param_splits()) if g.tensor_parallel else set()
    assert not any("norm" in name for name in split)
    assert len(split) == 2 * 7 + 2  # every projection, the embedding and the head


# ---------------------------------------------------------------------------------------------- BERT
def test_bert_biases_and_no_output_region_for_an_encoder(traced: Callable[..., OpGraph]) -> None:
    g = traced("bert-tiny", batch=BATCH, seq=SEQ)  # hidden 64, 4 heads, width 128, vocab 512
    _check_invariants(g)
    assert [r.kind for r in _regions(g)] == ["embedding"] * 3 + ["attention", "mlp"] * 2
    attn = _regions(g, "attention")[0]
    pre = "encoder.layer.0"
    assert _splits(attn) == {
        **{f"{pre}.attention.self.{x}.{w}": ("column", 0, ()) for x in ("query", "key", "value") for w in ("weight", "bias")},
        f"{pre}.attention.output.dense.weight": ("row", 1, ()),
        f"{pre}.attention.output.dense.bias": ("replicated", None, ()),
    }  # fmt: skip
    assert attn.degrees == (1, 2, 4)
    mlp = _regions(g, "mlp")[0]
    assert _splits(mlp)[f"{pre}.intermediate.dense.bias"] == ("column", 0, ())
    assert _splits(mlp)[f"{pre}.output.dense.weight"] == ("row", 1, ())
    for r in _regions(g, "attention") + _regions(g, "mlp"):
        _block_collectives(r, 64)
    word, token_type, position = _regions(g, "embedding")
    assert word.degrees == divisors(512) and token_type.degrees == (1, 2)
    assert _splits(position) == {"embeddings.position_embeddings.weight": ("vocab", 0, ())}
    # Each embedding's partial lookup is all-reduced in the forward, hidden x seq values per sample.
    assert [c.bytes_per_sample for c in word.collectives] == [64 * SEQ * FP32]


# ---------------------------------------------------------------------------------------------- MoE
def test_mixtral_experts_split_along_the_expert_width_router_replicated(hf: Callable[..., OpGraph]) -> None:
    g = hf(MIXTRAL)
    _check_invariants(g)
    experts = _regions(g, "experts")
    assert len(experts) == 2 and len(_regions(g, "attention")) == 2
    for layer, r in enumerate(experts):
        p = f"model.layers.{layer}.mlp.experts"
        # Stacked [experts, 2 x width, hidden] and [experts, hidden, width]: every expert's gate/up split
        # block by block along its width, its down projection along the same width; the expert
        # dimension stays whole (expert parallelism is not this axis).
        assert _splits(r) == {
            f"{p}.gate_up_proj": ("column", 1, (96, 96)),
            f"{p}.down_proj": ("row", 2, ()),
        }
        assert r.degrees == divisors(96)
        by_phase = {c.phase: c for c in r.collectives}
        # The input gradient is reduced before the token gather (hidden x seq), the partial output right
        # after the experts (top-2 rows per token: the combine multiplies by router weights, which need
        # their gradient whole).
        assert by_phase["backward"].bytes_per_sample == 64 * SEQ * FP32
        assert by_phase["forward"].bytes_per_sample == 2 * 64 * SEQ * FP32
        assert r.whole_nodes  # the token gather runs whole on every device
    router = {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert not router & set(g.tensor_parallel.param_splits() if g.tensor_parallel else {})


# ---------------------------------------------------------------------------------------------- plain MLP, conv net
def test_a_plain_matmul_pair_is_one_region(factories: str) -> None:
    g = trace("tracer_test_factories:plain_mlp", batch=BATCH)  # Linear(6, 10), Tanh, Linear(10, 3)
    _check_invariants(g)
    (r,) = _regions(g)
    assert r.kind == "mlp"
    assert _splits(r) == {
        "0.weight": ("column", 0, ()),
        "0.bias": ("column", 0, ()),
        "2.weight": ("row", 1, ()),
        "2.bias": ("replicated", None, ()),
    }
    assert r.degrees == (1, 2, 5, 10)
    assert r.nodes == tuple(n.name for n in g.nodes if n.op != "placeholder")
    fwd = next(c for c in r.collectives if c.phase == "forward")
    assert fwd.bytes_per_sample == 3 * FP32  # the 3 outputs of each sample are summed over the group
    assert r.cost(5).fwd_flops == pytest.approx(g.fwd_flops / 5)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def test_a_model_without_such_structure_gets_no_regions() -> None:
    g = trace(_ConvNet(), (torch.randn(BATCH, 3, 8, 8),))
    assert g.tensor_parallel is not None and g.tensor_parallel.regions == ()


# ---------------------------------------------------------------------------------------------- names mean nothing
class _OddlyNamed(nn.Module):
    """An attention block whose parts are named like something else: the search reads the ops, not names."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 24)
        self.mlp = nn.Linear(24, 72)  # q, k, v
        self.norm = nn.Linear(24, 24)  # output projection
        self.lm_head = nn.Linear(24, 48)  # the first half of a real MLP
        self.attention = nn.Linear(48, 24)  # its second half

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, t, c = x.shape
        q, k, v = (y.view(b, t, 6, 4).transpose(1, 2) for y in self.mlp(x).split(c, dim=-1))
        x = x + self.norm(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))
        return x + self.attention(F.gelu(self.lm_head(x)))


def test_regions_follow_the_ops_not_the_names() -> None:
    g = trace(_OddlyNamed(), (torch.randint(0, 32, (BATCH, SEQ)),))
    _check_invariants(g)
    emb, attn, mlp = _regions(g)
    assert (emb.kind, attn.kind, mlp.kind) == ("embedding", "attention", "mlp")
    assert _splits(attn)["mlp.weight"] == ("column", 0, (24, 24, 24))
    assert _splits(attn)["norm.weight"] == ("row", 1, ())
    assert attn.degrees == (1, 2, 3, 6)  # 6 heads
    assert _splits(mlp)["lm_head.weight"] == ("column", 0, ())
    assert _splits(mlp)["attention.weight"] == ("row", 1, ())


# ---------------------------------------------------------------------------------------------- other families
def test_phi3_fused_projections_of_unequal_blocks(hf: Callable[..., OpGraph]) -> None:
    g = hf(PHI3)  # 4 query heads and 2 kv heads of 16: qkv_proj makes [64 | 32 | 32] features
    _check_invariants(g)
    (attn,) = _regions(g, "attention")
    (mlp,) = _regions(g, "mlp")
    pre = "model.layers.0"
    assert _splits(attn) == {
        f"{pre}.self_attn.qkv_proj.weight": ("column", 0, (64, 32, 32)),
        f"{pre}.self_attn.o_proj.weight": ("row", 1, ()),
    }
    assert attn.degrees == (1, 2)
    assert _splits(mlp) == {
        f"{pre}.mlp.gate_up_proj.weight": ("column", 0, (96, 96)),
        f"{pre}.mlp.down_proj.weight": ("row", 1, ()),
    }
    _block_collectives(attn, 64)
    _block_collectives(mlp, 64)


def test_multi_query_attention_splits_queries_and_keeps_the_one_kv_head_whole(
    hf: Callable[..., OpGraph],
) -> None:
    g = hf(GEMMA_MQA)
    _check_invariants(g)
    (attn,) = _regions(g, "attention")
    pre = "model.layers.0.self_attn"
    assert _splits(attn) == {
        f"{pre}.q_proj.weight": ("column", 0, ()),
        f"{pre}.o_proj.weight": ("row", 1, ()),
    }
    assert attn.degrees == (1, 2, 4)
    # Each device slices its heads' share of the whole key and value; their gradients are partial sums,
    # all-reduced at the (small, one-head) values before they are broadcast to the query heads.
    grads = sorted(c.bytes_per_sample for c in attn.collectives if c.phase == "backward")
    assert grads == [16 * SEQ * FP32, 16 * SEQ * FP32, 64 * SEQ * FP32]
    assert attn.whole_nodes
    # Tied embedding and head (one tensor, under the one name the graph gives it): both split by rows.
    (tied,) = _splits(_regions(g, "embedding")[0])
    assert tied in ("model.embed_tokens.weight", "lm_head.weight")
    assert _splits(_regions(g, "embedding")[0]) == {tied: ("vocab", 0, ())}
    assert _splits(_regions(g, "output")[0]) == {tied: ("column", 0, ())}


def test_a_norm_over_all_heads_keeps_attention_whole(hf: Callable[..., OpGraph]) -> None:
    g = hf(OLMO2)
    _check_invariants(g)
    assert [r.kind for r in _regions(g)] == ["embedding", "mlp", "output"]
    split = g.tensor_parallel.param_splits() if g.tensor_parallel else {}
    assert not any("self_attn" in name for name in split)


def test_split_parameters_local_shapes(traced: Callable[..., OpGraph]) -> None:
    g = traced("llama-tiny", batch=BATCH, seq=SEQ)
    assert g.tensor_parallel is not None
    splits: dict[str, ParamSplit] = g.tensor_parallel.param_splits()
    assert splits["model.layers.0.self_attn.k_proj.weight"].local_shape(2) == (16, 64)
    assert splits["model.layers.0.mlp.down_proj.weight"].local_shape(4) == (64, 32)
    assert splits["lm_head.weight"].local_shape(8) == (32, 64)


def test_graph_json_on_disk_round_trip(traced: Callable[..., OpGraph], tmp_path: Path) -> None:
    g = traced("gpt2-tiny", batch=BATCH, seq=SEQ)
    g.save(tmp_path / "g.json")
    assert OpGraph.load(tmp_path / "g.json").tensor_parallel == g.tensor_parallel
