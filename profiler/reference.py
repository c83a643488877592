"""What ops cost inside a whole model beyond their time alone, fitted on a reference model.

An op timed alone finds its inputs hot in the cache and its output in memory the allocator just freed.
Inside a model's forward it reads what earlier ops left (often evicted since), and its output is new
memory the backward keeps alive (on a CPU that memory is often fresh pages: faulted in and zeroed by the
kernel). Measured here on this 2-core CPU, a traced GPT-like model's forward took 1.3-1.7x the sum of its
ops' calibrated times, and more at small batches: a fixed cost per op and a cost per byte of output.

:func:`in_graph_costs` measures that: it traces reference models (small pre-norm transformers written
here, not models being planned; a narrow deep one and a wide shallow one), runs their exported graphs
forward and backward at two batch sizes, prices the same graphs with the curves just measured
(``distplan.planner.CostModel``), and fits ``measured - priced = per_node * nodes + per_byte *
output_bytes`` by least squares over the four runs (forward and backward apart; coefficients >= 0). The cost model then adds them to
every node (see ``distplan.planner.cost``, [Note: calibrated pricing]).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distplan.calibration import Calibration, DeviceCalibration

from .budget import Budget

__all__ = ["ReferenceModel", "in_graph_costs"]

#: Batch sizes the reference runs at (two equations for two unknowns).
BATCHES = (1, 4)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=-1)
        q, k, v = (t.view(b, s, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, w))
        return x + self.down(F.gelu(self.up(self.ln2(x))))  # type: ignore[no-any-return]


class ReferenceModel(nn.Module):
    """A small pre-norm transformer (embedding, attention, GELU MLP, residuals, output head)."""

    def __init__(self, vocab: int = 1024, width: int = 128, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(ids))))  # type: ignore[no-any-return]


#: Reference shapes (width, layers): a narrow deep one and a wide shallow one, so that nodes and output
#: bytes vary independently across the runs and the fit can tell them apart.
SHAPES = ((64, 6), (256, 2))


def _fit(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares ``gap = per_node * nodes + per_byte * nbytes`` over ``rows`` of (nodes, nbytes, gap),
    both coefficients kept >= 0 (a negative one is dropped and the other refitted alone)."""
    import numpy as np

    a = np.array([[n, x] for n, x, _ in rows], dtype=np.float64)
    y = np.array([g for _, _, g in rows], dtype=np.float64)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    coef, *_ = np.linalg.lstsq(a / scale, y, rcond=None)
    coef = coef / scale
    if coef[0] >= 0 and coef[1] >= 0:
        return float(coef[0]), float(coef[1])
    best = (0.0, 0.0)
    best_err = float(np.sum(y**2))
    for j in (0, 1):
        col = a[:, j]
        denom = float(col @ col)
        c = max(0.0, float(col @ y) / denom) if denom > 0 else 0.0
        err = float(np.sum((y - c * col) ** 2))
        if err < best_err:
            best, best_err = ((c, 0.0) if j == 0 else (0.0, c)), err
    return best


def in_graph_costs(
    device: str, budget: Budget, dev: DeviceCalibration, *, seq: int = 64
) -> DeviceCalibration:
    """``dev`` with :attr:`DeviceCalibration.in_graph` fitted on :class:`ReferenceModel` runs (see the module
    docstring); ``dev`` itself supplies the curves the references are priced with."""
    from torch.utils.benchmark import Timer

    from distplan.planner.cost import CostModel
    from distplan.profiles import load_cluster
    from distplan.tracer import trace

    torch_dev = torch.device(device)
    kind = "reference"
    cluster = load_cluster(
        {
            "name": "reference",
            "kinds": [
                {"name": kind, "memory_gib": 1, "memory_bandwidth_gbyte_s": 1, "peak_tflops": {"fp32": 1}}
            ],
            "hosts": [{"name": "h", "devices": [{"kind": kind}], "link": {"bandwidth_gbyte_s": 1}}],
        }
    ).calibrated(Calibration(kind=kind, device=dataclasses.replace(dev, in_graph=(0.0, 0.0, 0.0, 0.0))))
    fwd_rows: list[tuple[float, float, float]] = []
    bwd_rows: list[tuple[float, float, float]] = []
    for width, layers in SHAPES:
        model = ReferenceModel(width=width, layers=layers).to(torch_dev)
        for b in BATCHES:
            ids = torch.randint(0, 1024, (b, seq))
            graph = trace(model, (ids,), batch=b)
            cost = CostModel(graph, cluster)
            f, bw = cost.time_prefix(kind, b)
            nodes_f, bytes_f, nodes_b, bytes_b = cost.in_graph_counts()
            ids = ids.to(torch_dev)
            gm = torch.export.export(model, (ids,), strict=False).module()
            target = torch.randn(b, seq, 1024, device=torch_dev)

            def forward(gm: Any = gm, ids: torch.Tensor = ids) -> Any:
                return gm(ids)

            def both(gm: Any = gm, ids: torch.Tensor = ids, target: torch.Tensor = target) -> None:
                F.mse_loss(gm(ids), target).backward()

            run = 4 * budget.min_run_time_s
            t_f = float(Timer("f()", globals={"f": forward}).blocked_autorange(min_run_time=run).median)
            t_fb = float(Timer("f()", globals={"f": both}).blocked_autorange(min_run_time=run).median)
            fwd_rows.append((nodes_f, b * bytes_f, t_f - float(f[-1])))
            bwd_rows.append((nodes_b, b * bytes_b, (t_fb - t_f) - float(bw[-1])))
    node_f, byte_f = _fit(fwd_rows)
    node_b, byte_b = _fit(bwd_rows)
    return dataclasses.replace(dev, in_graph=(node_f, byte_f, node_b, byte_b))
