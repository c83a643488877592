"""The tracer's side of shared parameters, on models traced for real (torch, meta device): a tied weight
is listed once in ``OpGraph.param_sizes``, under the name its readers use, and the planner charges every
stage that reads it.

Two architectures tie differently: Hugging Face GPT-2 registers one ``Parameter`` under two module paths
(``transformer.wte.weight`` is ``lm_head.weight``); the model below reads its embedding matrix directly in
the output projection (``F.linear(h, self.embed.weight)``), as the hand-written models of the reports do.
"""

from __future__ import annotations

import pytest

from distplan.graph import OpGraph
from distplan.planner import plan


class _ReusedEmbedding:
    """Factory of a small model whose output projection reuses its embedding matrix."""

    @staticmethod
    def build():  # type: ignore[no-untyped-def]
        import torch
        from torch import nn

        class Model(nn.Module):
            def __init__(self, vocab: int = 96, width: int = 24, depth: int = 4) -> None:
                super().__init__()
                self.embed = nn.Embedding(vocab, width)
                self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
                self.out_norm = nn.LayerNorm(width)

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                h = self.embed(ids)
                for layer in self.layers:
                    h = h + torch.relu(layer(h))
                return nn.functional.linear(self.out_norm(h), self.embed.weight)

        return Model(), (torch.randint(0, 96, (2, 8)),)


def _tiny_cluster(kib: int) -> dict:
    return {
        "name": "tiny",
        "kinds": [
            {
                "name": "tiny-cpu",
                "memory_gib": kib / 2**20,
                "memory_reserved_gib": 0,
                "memory_bandwidth_gbyte_s": 20,
                "peak_tflops": {"fp32": 0.16},
                "efficiency": 0.5,
            }
        ],
        "hosts": [
            {
                "name": "h",
                "devices": [{"kind": "tiny-cpu", "count": 4}],
                "link": {"bandwidth_gbyte_s": 5, "latency_us": 50},
            }
        ],
    }


def _check_tied(g: OpGraph, name: str, nbytes: int) -> None:
    assert g.param_sizes is not None
    # Every parameter once (the tied one under a single name), adding up to the model's bytes.
    assert sum(g.param_sizes.values()) == g.param_bytes
    assert g.param_sizes[name] == nbytes
    (sp,) = g.shared_params()
    assert sp.names == (name,) and sp.nbytes == nbytes
    first, *_, last = sp.positions
    assert "embedding" in g.nodes[first].target and g.nodes[first].param_bytes >= nbytes
    assert last >= len(g) - 3, "the output projection reads it near the end"
    assert OpGraph.from_json(g.to_json()) == g


def _check_planned(g: OpGraph, nbytes: int) -> None:
    # Memory for 60% of the model's fp32 Adam state per device: no device holds both ends (they are the
    # whole model apart), so the two stages holding them each hold a copy.
    cap_kib = int(0.6 * 4 * g.param_bytes / 1024)
    p = plan(g, cluster=_tiny_cluster(cap_kib), global_batch=4, schedule="gpipe", time_limit_s=10)
    p.check(g)
    (sp,) = g.shared_params()
    holders = [s for s in p.stages if any(s.start <= x < s.end for x in sp.positions)]
    assert len(holders) == 2, p.layout
    assert all(s.shared_param_bytes == nbytes and s.tied_allreduce_time_s > 0 for s in holders)
    assert sum(s.param_bytes for s in p.stages) == g.param_bytes + nbytes


def test_hugging_face_gpt2_ties_wte_and_lm_head() -> None:
    from distplan.tracer import trace

    g = trace("gpt2-tiny", batch=1, seq=16)
    (sp,) = g.shared_params()
    # Export lists the matrix under one of its two names; the embedding node carries exactly its bytes.
    (name,) = sp.names
    assert name in ("lm_head.weight", "transformer.wte.weight")
    nbytes = g.nodes[sp.positions[0]].param_bytes
    _check_tied(g, name, nbytes)
    assert (
        nbytes
        == 4 * g.nodes[sp.positions[0]].outputs[0].shape[-1] * g.nodes[sp.positions[-1]].outputs[0].shape[-1]
    )
    _check_planned(g, nbytes)


def test_a_model_reading_its_embedding_in_the_head() -> None:
    from distplan.tracer import trace

    model, args = _ReusedEmbedding.build()
    g = trace(model, example_inputs=args)
    _check_tied(g, "embed.weight", 96 * 24 * 4)
    _check_planned(g, 96 * 24 * 4)


@pytest.mark.parametrize("alias_first", [False, True])
def test_one_parameter_under_two_module_paths_is_one_table_entry(alias_first: bool) -> None:
    import torch
    from torch import nn

    from distplan.tracer import trace

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if alias_first:
                self.head = nn.Linear(16, 40, bias=False)
                self.embed = nn.Embedding(40, 16)
                self.embed.weight = self.head.weight
            else:
                self.embed = nn.Embedding(40, 16)
                self.head = nn.Linear(16, 40, bias=False)
                self.head.weight = self.embed.weight
            self.mid = nn.Linear(16, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mid(self.embed(ids))))

    g = trace(Tied(), example_inputs=(torch.randint(0, 40, (2, 6)),))
    assert g.param_sizes is not None and len(g.param_sizes) == 3  # the tied matrix, mid.weight, mid.bias
    (sp,) = g.shared_params()
    assert sp.nbytes == 40 * 16 * 4 and len(sp.names) == 1
    readers = {n for i, n in enumerate(g.nodes) if i in sp.positions for n in n.params}
    assert readers == set(sp.names)
