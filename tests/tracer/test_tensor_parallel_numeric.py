"""The annotation is right: split a model's parameters by it over two gloo ranks and get one device's numbers.

Each rank captures the same seeded CPU model, places its parameters with DTensor by the graph's
tensor-parallel annotation (``distplan.lowering.tensor_parallel``: ``Shard`` where a region splits them,
``Replicate`` elsewhere, the partial outputs reduced where the annotation says), runs one forward and
backward on ``Replicate`` inputs, and rank 0 writes the loss and every gradient (gathered whole). They must
equal the single-process run of the same captured graph. Models: a tiny Llama (grouped-query attention,
separate projections) and a tiny GPT-2 (Conv1D weights, fused q/k/v, tied embedding and head), both with
eager attention (SDPA's CPU flash kernel has no DTensor strategy and its fallback is very slow).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

BATCH, SEQ = 2, 8
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
    },
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "vocab_size": 256,
        "n_positions": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "attn_implementation": "eager",
    },
}


def _build(config_path: str) -> tuple[Any, Any, Any]:
    """(bundle, capture, graph) of the seeded CPU model: the same on every rank."""
    from distplan.tracer import capture, graph_from_capture, resolve_model

    b = resolve_model(config_path, batch=BATCH, seq=SEQ, device="cpu", seed=0)
    cap = capture(b.module, b.example_args, b.example_kwargs)
    graph = graph_from_capture(
        cap, b.module, b.example_args, b.example_kwargs, name="m", meta={"kind": b.kind, "batch": BATCH}
    )
    return b, cap, graph


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _logits(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


def _worker(rank: int, port: int, configs: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    result: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.experimental import implicit_replication

        from distplan.lowering.tensor_parallel import apply_tensor_parallel, replicate_inputs

        mesh = init_device_mesh("cpu", (2,))
        for name, path in configs.items():
            b, cap, graph = _build(path)
            applied = apply_tensor_parallel(cap.gm, graph.tensor_parallel, mesh)
            ids = b.example_args[0]
            with implicit_replication():
                logits = _logits(cap.gm(*replicate_inputs(b.example_args, mesh), **b.example_kwargs))
                loss = _loss(logits.full_tensor(), ids)
                loss.backward()
            grads = {}
            local_shapes = {}
            for fqn, p in cap.gm.named_parameters():
                assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), fqn
                grads[fqn] = p.grad.full_tensor()
                local_shapes[fqn] = tuple(p.to_local().shape)
            result[name] = {
                "loss": loss.detach().to_local() if isinstance(loss, DTensor) else loss.detach(),
                "grads": grads,
                "local_shapes": local_shapes,
                "logits_placement": repr(logits.placements),
                "regions": applied.regions,
                "n_regions": len(graph.tensor_parallel.regions),
            }
        dist.barrier()
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        if rank == 0 or "error" in result:
            torch.save(result, f"{out}.{rank}")
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_sharding_by_the_annotation_matches_one_device(tmp_path: Path) -> None:
    import multiprocessing as mp

    paths = {}
    for name, cfg in CONFIGS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        paths[name] = str(tmp_path / name / "config.json")
    # One device: the same captured graph, plain tensors.
    reference = {}
    for name, path in paths.items():
        b, cap, graph = _build(path)
        assert graph.tensor_parallel is not None and graph.tensor_parallel.regions
        loss = _loss(_logits(cap.gm(*b.example_args, **b.example_kwargs)), b.example_args[0])
        loss.backward()
        reference[name] = (loss.detach(), {n: p.grad for n, p in cap.gm.named_parameters()})

    out = str(tmp_path / "result")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, paths, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=500)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join()
    for r in range(2):
        if os.path.exists(f"{out}.{r}"):
            res = torch.load(f"{out}.{r}", weights_only=False)
            assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = torch.load(f"{out}.0", weights_only=False)

    for name, (ref_loss, ref_grads) in reference.items():
        res = got[name]
        # Every region was split two ways (each allows degree 2 here), and the split is real: rank 0 holds
        # half of each split weight, and the logits come out split over the vocabulary.
        assert len(res["regions"]) == res["n_regions"]
        assert res["logits_placement"] == "(Shard(dim=2),)"
        assert abs(float(res["loss"]) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss)), (
            name,
            float(res["loss"]),
            float(ref_loss),
        )
        assert set(res["grads"]) == set(ref_grads)
        worst = 0.0
        for fqn, g in ref_grads.items():
            err = float((res["grads"][fqn] - g).abs().max()) / max(float(g.abs().max()), 1e-12)
            worst = max(worst, err)
        assert worst <= 1e-5, (
            f"{name}: worst gradient error {worst:.2e} relative to each gradient's largest value"
        )
        print(
            f"{name}: loss {float(res['loss']):.7f} vs {float(ref_loss):.7f}, worst gradient rel error {worst:.1e}"
        )

    shapes = got["llama"]["local_shapes"]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 64)  # 2 kv heads of 16: one per rank
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 32)
    assert shapes["model.layers.0.input_layernorm.weight"] == (64,)  # norms replicated
    shapes = got["gpt2"]["local_shapes"]
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (64, 96)  # Conv1D [in, out]: out split
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (128, 64)  # [in, out]: in split
    assert shapes["transformer.h.0.mlp.c_proj.bias"] == (64,)  # a row-parallel bias stays whole
