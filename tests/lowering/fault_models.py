"""Small factories (``fault_models:<name>``) for the lowering's fault tests: each kind of model that broke
the lowering, twice (the shape of the reported case and one more model of the same kind).

The validation's rank processes import these by spec, so the test puts this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

W = 16


def _inputs(shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    def example_inputs(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, *shape),)

    return example_inputs


# ---------------------------------------------------------------------------------------------- keyword inputs
class MaskedStack(nn.Module):
    """A per-sample mask (keyword) zeroes padded positions after every block."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(W, W)
        self.blocks = nn.ModuleList(nn.Linear(W, W) for _ in range(depth))
        self.out = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = torch.tanh(blk(h))
            if mask is not None:
                h = h * mask.unsqueeze(-1)
        return self.out(h)


def masked_stack():  # type: ignore[no-untyped-def]
    x = torch.randn(2, 6, W)
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3])
    return MaskedStack(), (x,), {"mask": mask}


class SegmentNet(nn.Module):
    """Token ids (positional), per-sample segment ids (integer keyword, batched) and a position table
    (keyword, shape (seq, width): no batch dimension, the same for every sample)."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(8, W)
        self.seg = nn.Embedding(2, W)
        self.blocks = nn.ModuleList(nn.Linear(W, W) for _ in range(depth))
        self.out = nn.Linear(W, 3)

    def forward(self, ids: torch.Tensor, *, segments: torch.Tensor, pos_table: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.seg(segments)
        for i, blk in enumerate(self.blocks):
            h = torch.relu(blk(h)) + pos_table * (i + 1)
        return self.out(h)


def segment_net():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 2, (3, 5), generator=g)
    segments = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    pos_table = 0.1 * torch.randn(5, W, generator=g)
    return SegmentNet(), (ids,), {"segments": segments, "pos_table": pos_table}


def one_sample_mask():  # type: ignore[no-untyped-def]
    """An example call of batch 1 whose mask also has leading dimension 1: ambiguous."""
    return MaskedStack(), (torch.randn(1, 6, W),), {"mask": torch.ones(1, 6)}


# ---------------------------------------------------------------------------------------------- structured outputs
class DictHead(nn.Module):
    """Returns ``{"logits": ..., "hidden": ...}``."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(W, W) for _ in range(depth)])
        self.head = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.blocks(x)
        return {"hidden": h, "logits": self.head(torch.tanh(h))}


def dict_head() -> nn.Module:
    return DictHead()


dict_head.example_inputs = _inputs((W,))  # type: ignore[attr-defined]


class TupleHead(nn.Module):
    """Returns ``(hidden, (scores, aux))``: the loss reads ``1.0``."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(W, W) for _ in range(depth))
        self.head = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h = x
        for blk in self.blocks:
            h = torch.tanh(blk(h))
        scores = self.head(h)
        return h, (scores, scores.pow(2).mean())


def tuple_head() -> nn.Module:
    return TupleHead()


tuple_head.example_inputs = _inputs((W,))  # type: ignore[attr-defined]


@dataclasses.dataclass
class HeadOutput:
    """A plain dataclass (not registered with torch's pytree: ``torch.export`` refuses it, ``fx`` captures)."""

    hidden: torch.Tensor
    logits: torch.Tensor


class DataclassHead(nn.Module):
    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(W, W) for _ in range(depth))
        self.head = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor) -> HeadOutput:
        h = x
        for blk in self.blocks:
            h = F.gelu(blk(h))
        return HeadOutput(hidden=h, logits=self.head(h))


def dataclass_head() -> nn.Module:
    return DataclassHead()


dataclass_head.example_inputs = _inputs((W,))  # type: ignore[attr-defined]


class MaskedDictHead(MaskedStack):
    """A keyword mask and a dict output together (the launcher test)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"aux": x.mean(), "logits": super().forward(x, mask)}


def masked_dict_head():  # type: ignore[no-untyped-def]
    _, args, kwargs = masked_stack()
    return MaskedDictHead(), args, kwargs


# ---------------------------------------------------------------------------------------------- random ops
class NoisyNet(nn.Module):
    """Random ops other than nn.Dropout: a hand-made dropout mask from ``rand_like``, stochastic depth from
    ``torch.rand`` per sample, ``bernoulli`` and additive ``randn_like`` noise, and ``F.dropout``."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(W, W) for _ in range(depth))
        self.out = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, blk in enumerate(self.blocks):
            y = torch.tanh(blk(h))
            if i % 2 == 0:
                keep = (torch.rand(h.shape[0], 1, device=h.device) < 0.8).to(h.dtype) / 0.8
                y = y * keep * (torch.rand_like(y) > 0.1).to(y.dtype) / 0.9
            else:
                y = y * torch.bernoulli(torch.full_like(y, 0.7)) / 0.7 + 0.05 * torch.randn_like(y)
            h = h + F.dropout(y, p=0.2, training=self.training)
        return self.out(h)


def noisy_net() -> nn.Module:
    return NoisyNet()


noisy_net.example_inputs = _inputs((W,))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- in-place ops
def relu_inplace_stack() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(5):
        layers += [nn.Linear(W, W), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(W, 4))


relu_inplace_stack.example_inputs = _inputs((W,))  # type: ignore[attr-defined]


class InplaceResidual(nn.Module):
    """Blocks that modify their input in place: ``mul_``, ``add_`` on a slice (a view), ``relu_``."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(W, W) for _ in range(depth))
        self.out = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        for blk in self.blocks[1:]:
            h.mul_(0.5)
            h[:, : W // 2].add_(1.0)
            h = blk(torch.relu_(h))
        return self.out(h)


def inplace_residual() -> nn.Module:
    return InplaceResidual()


inplace_residual.example_inputs = _inputs((W,))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- batch statistics
def bn_stack() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(W, W), nn.BatchNorm1d(W), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(W, 4))


bn_stack.example_inputs = _inputs((W,))  # type: ignore[attr-defined]


class ConvBN(nn.Module):
    """Convolutions with BatchNorm2d, and a buffer counting the samples the forward has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 5 * 5, 3)
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples_seen += x.shape[0]
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.flatten(1))


def conv_bn() -> nn.Module:
    return ConvBN()


conv_bn.example_inputs = _inputs((3, 5, 5))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- constructor values
class CausalMixer(nn.Module):
    """Tensors no ``reset_parameters`` sets, made by the constructor: a causal-mask buffer
    (``tril(ones)``), a gain made with ``torch.ones`` and a step counter; the initialisation must keep
    their constructor values."""

    def __init__(self, seq: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(W, W)
        self.gain = nn.Parameter(torch.ones(W) * 0.5)
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq)))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.out = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) * self.gain
        h = torch.einsum("st,btw->bsw", self.mask / self.mask.sum(1, keepdim=True), h)
        return self.out(torch.tanh(h))


def causal_mixer() -> nn.Module:
    return CausalMixer()


causal_mixer.example_inputs = _inputs((6, W))  # type: ignore[attr-defined]


class ForwardConstants(nn.Module):
    """Constant tensors made inside forward (``torch.tensor``, ``torch.arange``): the captured graph holds
    them as lifted constants with values even when the model is built on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(W, W)
        self.b = nn.Linear(W, W)
        self.c = nn.Linear(W, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * torch.tensor([2.0] * (W // 2) + [0.5] * (W // 2))
        h = torch.tanh(self.b(h)) + torch.arange(float(W)) / W
        return self.c(h)


def forward_constants() -> nn.Module:
    return ForwardConstants()


forward_constants.example_inputs = _inputs((W,))  # type: ignore[attr-defined]
