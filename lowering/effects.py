"""What a forward does besides computing its output: draw random numbers, normalise over the batch, write
module state. The lowering must not change the user's module while it sets up, and the validation must
know all three to compare a pipeline with one device fairly.

[Note: random ops]
A random op (dropout, SDPA's ``dropout_p``, ``bernoulli``, ``rand*``, ``randn*``, ``normal``, ...) draws
different numbers on every rank and for every microbatch, so a pipeline can never reproduce the single
device's draws and a plain comparison reports a gradient mismatch with no cause. Randomness is read from
the captured graph, not from module names: the graph runs once at the microbatch shape under a dispatch
mode that records every ATen op tagged ``nondeterministic_seeded`` (ops whose ``dropout_p`` is 0 or whose
``train``/``training`` flag is false draw nothing and do not count), attributed to the graph node (and so
the module) that issued it. The validation then runs both sides under :class:`PinnedRandom`: every random
op returns a fixed value that does not depend on the batch, the microbatch or the rank -- identical random
streams on both sides. The values are the draw where nothing is dropped: ``bernoulli`` gives 1 wherever its
probability is positive (dropout keeps every element and scales by ``1/(1-p)``), ``native_dropout`` keeps
everything; ``rand``/``uniform`` give the interval's midpoint, ``randn``/``normal`` the mean, ``randint``/
``random_`` the lower bound, ``randperm`` the identity, ``multinomial`` the most probable classes,
``exponential``/``geometric``/``cauchy``/``log_normal`` their mean, mode, median and median. A random op
outside that list is named in a clear error before any rank starts. Training (:func:`~distplan.lowering.lower`)
never pins anything.

[Note: batch statistics and state]
A batch-norm op in training mode (any ATen ``*batch_norm*`` op with ``training`` true whose input's
leading dimension is the batch) computes statistics over the samples it sees, so under microbatching it
normalises over a microbatch, not the global batch, and its running statistics are updated once per
microbatch. Buffers written by the forward (running statistics, ``num_batches_tracked``, counters) are found
by their version counters and values across the same recorded run. What the validation does with them is in
[Note: validation policy] (``distplan.lowering.validation``). The recorded run itself, like every set-up
step of the lowering, happens under :func:`preserved_state`, so it leaves the module as it found it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from distplan.errors import LoweringError

__all__ = ["ForwardEffects", "NodeEffect", "PinnedRandom", "preserved_state", "scan_forward"]


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Run the body, then put back every buffer's value (and object) and every submodule's train/eval mode.

    The lowering's set-up (drawing example batches, capturing, annotating, recording a forward) must not
    change the user's module: a BatchNorm's ``num_batches_tracked`` or running statistics advanced by a
    set-up forward would be wrong in training and differ from the single-device model.
    """
    saved: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    for mod in module.modules():
        for name, t in mod._buffers.items():
            if t is not None:
                saved.append((mod, name, t, t.detach().clone()))
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for mod, name, t, copy in saved:
                mod._buffers[name] = t
                t.copy_(copy)
        for m, training in modes:
            m.training = training


def _bind(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """An ATen call's arguments by schema name (defaults filled in)."""
    out: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def is_random_call(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether this ATen call draws random numbers (see [Note: random ops])."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    bound = _bind(func, args, kwargs)
    if "dropout_p" in bound:
        return bool(float(bound["dropout_p"] or 0.0) > 0.0)
    return not any(bound.get(k) is False for k in ("train", "training"))


def _family(func: Any) -> str:
    name = func.overloadpacket.__name__
    name = name.removesuffix("_")
    return name.removesuffix("_like")


def _fill(t: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t.copy_(value.to(t.dtype).expand_as(t))
    else:
        t.fill_(value)


def _pin_bernoulli(b: dict[str, Any], out: torch.Tensor) -> None:
    p = b.get("p")
    if p is None:  # bernoulli(probs): probabilities are the input
        _fill(out, b["self"] > 0)
    elif isinstance(p, torch.Tensor):
        _fill(out, p > 0)
    else:
        _fill(out, 1.0 if p > 0 else 0.0)


def _pin_multinomial(b: dict[str, Any], out: torch.Tensor) -> None:
    probs, n = b["self"], int(b["num_samples"])
    order = probs.argsort(dim=-1, descending=True, stable=True)
    _fill(out, order[..., torch.arange(n, device=probs.device) % probs.shape[-1]])


# family -> writes the pinned value into the op's result, given the bound arguments.
_PINS: dict[str, Callable[[dict[str, Any], torch.Tensor], None]] = {
    "bernoulli": _pin_bernoulli,
    "rand": lambda b, out: _fill(out, 0.5),
    "uniform": lambda b, out: _fill(out, (float(b.get("from", 0.0)) + float(b.get("to", 1.0))) / 2),
    "randn": lambda b, out: _fill(out, 0.0),
    "normal": lambda b, out: _fill(out, b.get("mean", 0.0)),
    "randint": lambda b, out: _fill(out, int(b.get("low", 0) or 0)),
    "random": lambda b, out: _fill(out, int(b.get("from", 0) or 0)),
    "randperm": lambda b, out: _fill(out, torch.arange(out.numel(), device=out.device)),
    "multinomial": _pin_multinomial,
    "exponential": lambda b, out: _fill(out, 1.0 / float(b.get("lambd", 1.0))),
    "geometric": lambda b, out: _fill(out, 1.0),
    "cauchy": lambda b, out: _fill(out, float(b.get("median", 0.0))),
    "log_normal": lambda b, out: _fill(out, math.exp(float(b.get("mean", 1.0)))),
}


def can_pin(func: Any) -> bool:
    """Whether :class:`PinnedRandom` has a fixed value for this random op."""
    return _family(func) in _PINS or _family(func) == "native_dropout"


class PinnedRandom(TorchDispatchMode):
    """Every random op returns a fixed, batch-independent value (see [Note: random ops]).

    ``with PinnedRandom(): ...`` around both the single-device reference and each rank's steps gives both
    identical random streams. Raises :class:`LoweringError` for a random op it has no value for.
    """

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if not is_random_call(func, args, kwargs):
            return func(*args, **kwargs)
        family = _family(func)
        bound = _bind(func, args, kwargs)
        # The real op gives the result's shape, dtype and device (and writes in place or into `out=`);
        # its random values are then overwritten.
        result = func(*args, **kwargs)
        if family == "native_dropout":
            out, mask = result
            p = float(bound["p"])
            if 0.0 < p < 1.0:
                mask.fill_(True)
                out.copy_(bound["input"] * (1.0 / (1.0 - p)))
            return result
        pin = _PINS.get(family)
        if pin is None:
            raise LoweringError(
                f"validation cannot give random op {func} a fixed value; it draws different numbers on each "
                "rank, so the pipeline cannot be compared with one device"
            )
        pin(bound, result)
        return result


@dataclass(frozen=True, slots=True)
class NodeEffect:
    """One op of the recorded forward: the graph node that issued it, its module FQN and the ATen op."""

    node: str
    module: str
    op: str

    def __str__(self) -> str:
        return f"{self.module or '<root>'} ({self.op}, node {self.node})"


@dataclass(frozen=True, slots=True)
class ForwardEffects:
    """What one recorded forward did (see [Note: random ops] and [Note: batch statistics and state]).

    Attributes:
        random: random ops, one per (node, op).
        unpinnable: the random ops :class:`PinnedRandom` has no fixed value for.
        batch_stats: batch-norm ops in training mode over the batch dimension, one per node.
        written_buffers: FQNs of the buffers the forward wrote.
    """

    random: tuple[NodeEffect, ...] = ()
    unpinnable: tuple[NodeEffect, ...] = ()
    batch_stats: tuple[NodeEffect, ...] = ()
    written_buffers: tuple[str, ...] = ()

    def random_modules(self) -> list[str]:
        """The modules holding random ops, in graph order, each once."""
        return list(dict.fromkeys(e.module or "<root>" for e in self.random))

    def batch_stat_modules(self) -> list[str]:
        """The modules holding batch-statistics ops, in graph order, each once."""
        return list(dict.fromkeys(e.module or "<root>" for e in self.batch_stats))


class _Recorder(TorchDispatchMode):
    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.node = ""
        self.random: list[tuple[str, Any]] = []
        self.batch_stats: list[tuple[str, Any]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if is_random_call(func, args, kwargs):
            self.random.append((self.node, func))
        name = func.overloadpacket.__name__
        if "batch_norm" in name and "backward" not in name:
            b = _bind(func, args, kwargs)
            training = b.get("training", "with_update" in name)
            x = b.get("input")
            if training and isinstance(x, torch.Tensor) and x.dim() > 0 and int(x.shape[0]) == self.batch:
                self.batch_stats.append((self.node, func))
        return func(*args, **kwargs)


def scan_forward(
    gm: fx.GraphModule,
    inputs: list[Any],
    *,
    module: nn.Module,
    batch: int,
    module_of: Mapping[str, str],
) -> ForwardEffects:
    """Run the captured graph once on ``inputs`` (its placeholders' values, ``batch`` samples) and record
    its random ops, batch statistics and written buffers. ``module`` is the model the graph shares its
    parameters and buffers with (left as it was: :func:`preserved_state`); ``module_of`` maps node names
    to module FQNs for the report."""
    rec = _Recorder(batch)
    # Versions miss kernels that write an argument their schema does not mark as written (batch norm's
    # running statistics), so values are compared too.
    before = {n: (b._version, b.detach().clone()) for n, b in module.named_buffers()}

    class _Interp(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            rec.node = n.name
            return super().run_node(n)

    with preserved_state(module), torch.random.fork_rng(devices=[]), torch.no_grad():
        with rec:
            _Interp(gm).run(*inputs)
        written = tuple(
            n
            for n, b in module.named_buffers()
            if n in before and (b._version != before[n][0] or not torch.equal(b, before[n][1]))
        )

    def effects(items: list[tuple[str, Any]]) -> tuple[NodeEffect, ...]:
        seen = dict.fromkeys((node, str(func)) for node, func in items)
        return tuple(NodeEffect(node, module_of.get(node, ""), op) for node, op in seen)

    unpinnable = [(node, func) for node, func in rec.random if not can_pin(func)]
    return ForwardEffects(
        random=effects(rec.random),
        unpinnable=effects(unpinnable),
        batch_stats=tuple({e.node: e for e in effects(rec.batch_stats)}.values()),
        written_buffers=written,
    )
