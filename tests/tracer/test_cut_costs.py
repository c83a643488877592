"""Cut costs on real traced models, checked by hand and against an independent liveness computation."""

from __future__ import annotations

import torch
from torch import fx, nn

from distplan.tracer import capture, graph_from_capture, resolve_model, trace


class _Skip(nn.Module):
    """``fc2(relu(fc1(x))) + x``: the input skips over three ops."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + x


def test_cut_costs_of_a_skip_connection_by_hand() -> None:
    g = trace(_Skip(), (torch.randn(4, 8),))
    assert [n.name for n in g.nodes] == ["x", "linear", "relu", "linear_1", "add"]
    assert g.outputs == ("add",)
    x, hidden = 4 * 8 * 4, 4 * 16 * 4  # bytes of a (4, 8) and a (4, 16) float32 tensor
    assert g.cut_costs() == (
        0,  # before the input: nothing
        x,  # x waits for fc1 and for the add
        x + hidden,  # x (skip) + fc1's output
        x + hidden,  # x (skip) + relu's output
        x + x,  # x (skip) + fc2's output, both read by the add
        x,  # the model output
    )
    assert g.crossing_values(3) == ["x", "relu"]


def _real_output_bytes(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> dict[str, int]:
    sizes: dict[str, int] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):  # type: ignore[no-untyped-def]
            out = super().run_node(n)
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            sizes[n.name] = sum(t.numel() * t.element_size() for t in leaves)
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return sizes


def test_cut_costs_match_liveness_of_the_real_captured_graph() -> None:
    # Independent of OpGraph.cut_costs: fx's own `users` lists and the sizes of real CPU tensors.
    bundle = resolve_model("gpt-tiny", batch=2, seq=16, device="cpu")
    cap = capture(bundle.module, bundle.example_args)
    g = graph_from_capture(cap, bundle.module, bundle.example_args, name="gpt-tiny")
    sizes = _real_output_bytes(cap.gm, bundle.example_args)
    order = [n for n in cap.gm.graph.nodes if n.op not in ("get_attr", "output")]
    pos = {n: i for i, n in enumerate(order)}
    last = {}
    for n in order:
        uses = [len(order) if u.op == "output" else pos[u] for u in n.users]
        last[n] = max(uses, default=-1)
    expected = [sum(sizes[n.name] for n in order if pos[n] < p <= last[n]) for p in range(len(order) + 1)]
    assert list(g.cut_costs()) == expected
    # residual streams cross every cut inside a block: no interior position is free
    assert min(g.cut_costs()[1:-1]) > 0
