"""Transformer-shaped and random :class:`~distplan.graph.OpGraph` s built without torch.

They give the planner realistic inputs for tests and benchmarks when no traced graph is at hand: the node
sequence, module paths, FLOPs, parameter and activation bytes of a pre-norm decoder follow the usual
closed forms (2 FLOPs per multiply-add, backward = 2 x forward for matmuls, residual stream kept alive
across each layer as a skip connection).

    >>> g = synthetic_transformer(layers=2, hidden=64, heads=4, seq=16, vocab=100)
    >>> g.lint()
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

from distplan.cluster import Cluster
from distplan.graph import OpGraph, OpNode, TensorMeta, make_graph
from distplan.profiles import load_cluster
from distplan.tensor_parallel import (
    Collective,
    ParamSplit,
    TensorParallelAnnotation,
    TensorParallelRegion,
    divisors,
)

__all__ = [
    "TransformerShape",
    "random_chain_graph",
    "random_cluster",
    "synthetic_transformer",
    "transformer_shape",
]

_F32 = 4


@dataclass(frozen=True, slots=True)
class TransformerShape:
    """Sizes of a decoder-only transformer (what a Hugging Face config gives)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool = False


#: Well-known configurations (parameter counts match the published models to within a few percent).
_SHAPES: dict[str, TransformerShape] = {
    "gpt2-small": TransformerShape(12, 768, 12, 3072, 50257, tied_embeddings=True),
    "gpt2-xl": TransformerShape(48, 1600, 25, 6400, 50257, tied_embeddings=True),
    "llama-7b": TransformerShape(32, 4096, 32, 11008, 32000),
    "llama-13b": TransformerShape(40, 5120, 40, 13824, 32000),
}


def transformer_shape(name: str) -> TransformerShape:
    """A named shape (``gpt2-small``, ``gpt2-xl``, ``llama-7b``, ``llama-13b``)."""
    try:
        return _SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown transformer shape {name!r}; known: {', '.join(sorted(_SHAPES))}") from None


def synthetic_transformer(
    name: str | None = None,
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    ffn: int | None = None,
    vocab: int = 1000,
    seq: int = 128,
    batch: int = 1,
    tied_embeddings: bool = False,
    tensor_parallel: bool = True,
) -> OpGraph:
    """A pre-norm decoder-only transformer graph (fp32), traced at ``batch`` x ``seq`` tokens.

    ``name`` picks a known shape (see :func:`transformer_shape`) and overrides the size arguments. With
    ``tensor_parallel`` the graph carries the annotation the tracer would give (see [Note: tensor-parallel
    regions] in ``distplan.tensor_parallel``): per layer an attention region (the fused ``qkv`` projection
    column-parallel by heads, attention, ``o_proj`` row-parallel) and an MLP region (``fc1`` column, the
    activation, ``fc2`` row), each with a forward all-reduce of its output and a backward all-reduce of its
    input's gradient; degrees: the divisors of ``gcd(heads, ffn)``.
    """
    if name is not None:
        s = transformer_shape(name)
        layers, hidden, heads, ffn, vocab, tied_embeddings = (
            s.layers,
            s.hidden,
            s.heads,
            s.ffn,
            s.vocab,
            s.tied_embeddings,
        )
    ffn = ffn or 4 * hidden
    tokens = batch * seq
    x_bytes = tokens * hidden * _F32
    nodes: list[OpNode] = []

    def t(*shape: int, dtype: str = "float32", size: int = _F32) -> tuple[TensorMeta, ...]:
        n = 1
        for d in shape:
            n *= d
        return (TensorMeta(tuple(shape), dtype, n * size),)

    def add(
        name_: str, module: str, target: str, inputs: tuple[str, ...], out: tuple[TensorMeta, ...], **kw: Any
    ) -> str:
        op = "placeholder" if target == "input" else "call_function"
        nodes.append(
            OpNode(name=name_, op=op, target=target, module=module, inputs=inputs, outputs=out, **kw)
        )  # type: ignore[arg-type]
        return name_

    ids = add("input_ids", "", "input", (), t(batch, seq, dtype="int64", size=8))
    labels = add("labels", "", "input", (), t(batch, seq, dtype="int64", size=8))
    emb_params = vocab * hidden * _F32
    x = add(
        "embed",
        "model.embed_tokens",
        "aten.embedding.default",
        (ids,),
        t(batch, seq, hidden),
        bytes_moved=2 * x_bytes,
        param_bytes=emb_params,
        params=("model.embed_tokens.weight",),
        activation_bytes=tokens * 8,
    )

    sizes: dict[str, int] = {"model.embed_tokens.weight": emb_params}

    def linear(nm: str, module: str, src: str, fin: int, fout: int) -> str:
        w = fin * fout * _F32
        flops = 2 * tokens * fin * fout
        sizes[f"{module}.weight"] = w
        return add(
            nm,
            module,
            "aten.mm.default",
            (src,),
            t(batch, seq, fout),
            fwd_flops=flops,
            bwd_flops=2 * flops,
            bytes_moved=w + tokens * (fin + fout) * _F32,
            param_bytes=w,
            params=(f"{module}.weight",),
            activation_bytes=tokens * fin * _F32,
        )

    def norm(nm: str, module: str, src: str) -> str:
        sizes[f"{module}.weight"] = 2 * hidden * _F32  # weight and bias, one name for both
        return add(
            nm,
            module,
            "aten.native_layer_norm.default",
            (src,),
            t(batch, seq, hidden),
            fwd_flops=5 * tokens * hidden,
            bwd_flops=10 * tokens * hidden,
            bytes_moved=2 * x_bytes,
            param_bytes=2 * hidden * _F32,
            params=(f"{module}.weight",),
            activation_bytes=x_bytes,
        )

    regions: list[TensorParallelRegion] = []
    by_name: dict[str, OpNode] = {}

    def region(kind: str, names: tuple[str, ...], col: str, row: str, src: str, pieces: int) -> None:
        ops = [by_name[n] for n in names]
        col_w, row_w = f"{by_name[col].module}.weight", f"{by_name[row].module}.weight"
        fin = sizes[col_w] // _F32 // (pieces * (hidden if kind == "attention" else ffn))
        width = hidden if kind == "attention" else ffn
        regions.append(
            TensorParallelRegion(
                kind=kind,  # type: ignore[arg-type]
                nodes=names,
                params=(
                    ParamSplit(
                        col_w,
                        (pieces * width, fin),
                        sizes[col_w],
                        "column",
                        0,
                        (width,) * pieces if pieces > 1 else (),
                    ),
                    ParamSplit(row_w, (hidden, width), sizes[row_w], "row", 1),
                ),
                split_sizes=tuple(sorted({heads, width})),
                degrees=divisors(math.gcd(heads, width)),
                collectives=(
                    Collective("all-reduce", "forward", "partial-output", row, seq * hidden * _F32),
                    Collective("all-reduce", "backward", "input-gradient", src, seq * hidden * _F32),
                ),
                fwd_flops=sum(o.fwd_flops for o in ops),
                bwd_flops=sum(o.bwd_flops for o in ops),
                # The column matmul keeps its whole input; everything after it is split.
                split_activation_bytes=sum(o.activation_bytes for o in ops[1:]),
                whole_activation_bytes=ops[0].activation_bytes,
            )
        )

    for i in range(layers):
        p = f"model.layers.{i}"
        h = norm(f"l{i}_ln1", f"{p}.ln_1", x)
        qkv = linear(f"l{i}_qkv", f"{p}.attn.qkv", h, hidden, 3 * hidden)
        attn_flops = 4 * batch * seq * seq * hidden
        a = add(
            f"l{i}_sdpa",
            f"{p}.attn",
            "aten._scaled_dot_product_flash_attention.default",
            (qkv,),
            t(batch, heads, seq, hidden // heads),
            fwd_flops=attn_flops,
            bwd_flops=int(2.5 * attn_flops),
            bytes_moved=4 * x_bytes,
            activation_bytes=4 * x_bytes,
        )
        o = linear(f"l{i}_proj", f"{p}.attn.o_proj", a, hidden, hidden)
        x1 = add(
            f"l{i}_add1",
            p,
            "aten.add.Tensor",
            (x, o),
            t(batch, seq, hidden),
            fwd_flops=tokens * hidden,
            bytes_moved=3 * x_bytes,
        )
        h2 = norm(f"l{i}_ln2", f"{p}.ln_2", x1)
        f1 = linear(f"l{i}_fc1", f"{p}.mlp.fc1", h2, hidden, ffn)
        g = add(
            f"l{i}_act",
            f"{p}.mlp.act",
            "aten.gelu.default",
            (f1,),
            t(batch, seq, ffn),
            fwd_flops=8 * tokens * ffn,
            bwd_flops=16 * tokens * ffn,
            bytes_moved=2 * tokens * ffn * _F32,
            activation_bytes=tokens * ffn * _F32,
        )
        f2 = linear(f"l{i}_fc2", f"{p}.mlp.fc2", g, ffn, hidden)
        x = add(
            f"l{i}_add2",
            p,
            "aten.add.Tensor",
            (x1, f2),
            t(batch, seq, hidden),
            fwd_flops=tokens * hidden,
            bytes_moved=3 * x_bytes,
        )
        if tensor_parallel:
            by_name.update({n.name: n for n in nodes[-10:]})
            region("attention", (qkv, a, o), qkv, o, h, 3)
            region("mlp", (f1, g, f2), f1, f2, h2, 1)
    h = norm("final_norm", "model.norm", x)
    # Tied: the head reads the embedding matrix (its first reader, the embedding, carries the bytes).
    head_params = 0 if tied_embeddings else vocab * hidden * _F32
    head_name = "model.embed_tokens.weight" if tied_embeddings else "lm_head.weight"
    if not tied_embeddings:
        sizes[head_name] = head_params
    logits_flops = 2 * tokens * hidden * vocab
    logits = add(
        "lm_head",
        "lm_head",
        "aten.mm.default",
        (h,),
        t(batch, seq, vocab),
        fwd_flops=logits_flops,
        bwd_flops=2 * logits_flops,
        bytes_moved=vocab * hidden * _F32 + tokens * (hidden + vocab) * _F32,
        param_bytes=head_params,
        params=(head_name,),
        activation_bytes=x_bytes,
    )
    loss = add(
        "loss",
        "",
        "aten.cross_entropy_loss.default",
        (logits, labels),
        t(),
        fwd_flops=5 * tokens * vocab,
        bwd_flops=5 * tokens * vocab,
        bytes_moved=2 * tokens * vocab * _F32,
        activation_bytes=tokens * vocab * _F32,
    )
    total = sum(n.param_bytes for n in nodes)
    return make_graph(
        name or f"transformer-{layers}x{hidden}",
        nodes,
        outputs=(loss,),
        num_params=total // _F32,
        meta={"batch": batch, "seq": seq, "tracer": "synthetic"},
        param_sizes=sizes,
        tensor_parallel=TensorParallelAnnotation(tuple(regions), batch=batch) if tensor_parallel else None,
    )


def random_chain_graph(
    seed: int,
    *,
    nodes: int = 6,
    skip_prob: float = 0.3,
    scale: float = 1.0,
    shared: int = 0,
    regions: int = 0,
) -> OpGraph:
    """A random chain of ``nodes`` ops (each its own module, so each is one block), with random FLOPs,
    parameters, activations and occasional skip connections; sizes are GPU-scale (GFLOPs, hundreds of MB).

    ``shared`` parameters (``s0``, ``s1``, ...) are each read by 2-3 random ops, like a tied embedding and
    output projection; their first reader carries their bytes (see [Note: shared parameters] in
    ``distplan.graph``). They are drawn after everything else, so a graph's other figures do not depend on
    ``shared``.

    ``regions`` tensor-parallel regions (runs of one or two ops, degrees up to 2 or 4, a forward all-reduce
    of their output and a backward one of their input's gradient; see [Note: tensor-parallel regions] in
    ``distplan.tensor_parallel``), each op in a region reading a named parameter ``w<i>`` it splits, and one
    of them a fused attention op that keeps statistics selective recomputation drops; also drawn last."""
    rng = random.Random(seed)
    out: list[OpNode] = []
    for i in range(nodes):
        inputs: tuple[str, ...] = ()
        if i > 0:
            inputs = (out[-1].name,)
            if i > 1 and rng.random() < skip_prob:
                inputs = (*inputs, out[rng.randrange(0, i - 1)].name)
        flops = int(rng.uniform(0.2, 5.0) * 1e12 * scale)
        nbytes = int(rng.uniform(1, 64) * 2**20 * scale)
        out.append(
            OpNode(
                f"n{i}",
                "call_function" if i else "placeholder",
                "aten.mm.default" if i else "input",
                f"m{i}",
                inputs,
                (TensorMeta((nbytes // 4,), "float32", nbytes),),
                fwd_flops=flops if i else 0,
                bwd_flops=2 * flops if i else 0,
                bytes_moved=3 * nbytes,
                param_bytes=int(rng.uniform(0.1, 6.0) * 2**30 * scale) if i else 0,
                activation_bytes=int(rng.uniform(0.05, 2.0) * 2**30 * scale) if i else 0,
            )
        )
    sizes: dict[str, int] = {}
    extra = random.Random(seed + 7919)
    for k in range(shared):
        readers = sorted(extra.sample(range(1, nodes), min(nodes - 1, extra.choice((2, 2, 3)))))
        name = f"s{k}"
        sizes[name] = int(extra.uniform(0.1, 2.0) * 2**30 * scale)
        for j, i in enumerate(readers):
            n = out[i]
            out[i] = dataclasses.replace(
                n, params=(*n.params, name), param_bytes=n.param_bytes + (sizes[name] if j == 0 else 0)
            )
    annotation = _random_regions(out, regions, random.Random(seed + 104729), sizes) if regions else None
    total = sum(n.param_bytes for n in out)
    return make_graph(
        f"random-{seed}",
        out,
        outputs=(out[-1].name,),
        num_params=total // 4,
        meta={"batch": 1},
        param_sizes=sizes if shared else None,
        tensor_parallel=annotation,
    )


def _random_regions(
    out: list[OpNode], count: int, rng: random.Random, sizes: dict[str, int]
) -> TensorParallelAnnotation:
    """Mark ``count`` disjoint runs of ``out`` (changed in place) as tensor-parallel regions."""
    free = list(range(1, len(out)))
    regions = []
    attention_done = False
    for _ in range(count):
        starts = [i for i in free if i + 1 not in free or rng.random() < 0.5]
        if not starts:
            break
        i = rng.choice(starts)
        run = [i] + ([i + 1] if i + 1 in free and rng.random() < 0.5 else [])
        for j in run:
            free.remove(j)
        params = []
        for j in run:
            n = out[j]
            name = f"w{j}"
            changes: dict[str, Any] = {"params": (*n.params, name)}
            if not attention_done:
                # A fused attention kernel: keeps its statistics for the backward beyond what it reads.
                attention_done = True
                changes["target"] = "aten._scaled_dot_product_flash_attention.default"
                reads = sum(out[k].output_bytes for k in range(j) if out[k].name in n.inputs)
                changes["activation_bytes"] = n.activation_bytes + reads + n.output_bytes
            out[j] = dataclasses.replace(n, **changes)
            size = max(4, out[j].param_bytes // 4 * 4)
            params.append(ParamSplit(name, (size // 4,), size, "column", 0))
            # Shared parameters stay whole (replicated) in every region reading them.
            params += [
                ParamSplit(x, (sizes[x] // 4,), sizes[x], "replicated")
                for x in n.params
                if x in sizes and all(q.name != x for q in params)
            ]
        ops = [out[j] for j in run]
        deg = rng.choice((2, 4))
        first = out[run[0]]
        regions.append(
            TensorParallelRegion(
                kind="mlp",
                nodes=tuple(o.name for o in ops),
                params=tuple(params),
                split_sizes=(deg,),
                degrees=divisors(deg),
                collectives=(
                    Collective("all-reduce", "forward", "partial-output", ops[-1].name, ops[-1].output_bytes),
                    Collective(
                        "all-reduce",
                        "backward",
                        "input-gradient",
                        first.inputs[0],
                        out[run[0] - 1].output_bytes,
                    ),
                ),
                fwd_flops=sum(o.fwd_flops for o in ops),
                bwd_flops=sum(o.bwd_flops for o in ops),
                split_activation_bytes=sum(o.activation_bytes for o in ops[1:]),
                whole_activation_bytes=ops[0].activation_bytes,
            )
        )
    regions.sort(key=lambda r: int(r.nodes[0][1:]))
    return TensorParallelAnnotation(tuple(regions), batch=1)


_RANDOM_KINDS = ("a100-sxm-80g", "v100-sxm2-32g", "t4-16g", "h100-sxm-80g")


def random_cluster(seed: int, *, max_devices: int = 4) -> Cluster:
    """1-2 hosts, at most ``max_devices`` devices of at most 2 kinds, random link speeds."""
    rng = random.Random(seed)
    kinds = rng.sample(_RANDOM_KINDS, 2)
    n = rng.randint(2, max_devices)
    hosts: list[dict[str, Any]] = []
    left = n
    while left:
        take = rng.randint(1, left)
        left -= take
        kind_split = rng.randint(0, take)
        devs = [{"kind": kinds[0], "count": kind_split}, {"kind": kinds[1], "count": take - kind_split}]
        hosts.append(
            {
                "name": f"h{len(hosts)}",
                "devices": [d for d in devs if d["count"]],
                "link": {"bandwidth_gbyte_s": rng.choice([16, 150, 300]), "latency_us": rng.choice([2, 10])},
            }
        )
    return load_cluster(
        {
            "name": f"random-{seed}",
            "hosts": hosts,
            "network": {"bandwidth_gbit_s": rng.choice([25, 100]), "latency_us": 20},
        }
    )
