"""Measure one device's compute: the curves of a :class:`~distplan.calibration.DeviceCalibration`.

Every time comes from ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up, then blocks of calls
for at least the mode's ``min_run_time``, median of the blocks; it synchronises CUDA around each block).
Each op runs as in training: inputs and weights require grad, so the forward records the autograd graph;
the backward is timed on its own by re-running ``torch.autograd.backward(out, grad, retain_graph=True)``,
which accumulates into the leaves' ``.grad`` as every microbatch after the first does.

Ops are called as the runtime's stage programs call them: through the ATen overloads an exported graph
holds (``torch.ops.aten.linear.default``, ``aten.view.default``, ...), whose Python dispatch costs more
than ``torch.nn.functional``'s or a tensor method's, which is most of a small op's time on a CPU.

Sizes are computed as the tracer counts them (``distplan.tracer.annotate``), so a curve's key is the
number a graph node carries: forward FLOPs ``2 T K N`` of a linear and ``4 B H S^2 D`` of attention,
bytes moved = distinct inputs (weights included) + outputs. Memory-bound ops are timed in short chains
(``CHAIN`` ops from one leaf) and divided, so the single gradient accumulation into the leaf is shared as
it is in a real graph, where most ops feed other ops rather than leaves.

[Note: cold weights]
A layer's weights are read once per microbatch's forward and once in its backward, with every other
layer's data in between: in a model larger than the cache they come from memory, not from the cache. So
ops that read weights (linear, embedding, the one-token "stream" linear) rotate over a pool of distinct
weight tensors holding together at least twice the last-level cache (:func:`cache_bytes`; at most
``POOL_MAX`` tensors), forward and backward alike; activations stay as they are in a real graph, warm from
the op that produced them. The one-token linear measures how fast weights stream (a matrix-vector
product is bound by reading the matrix): the cost model prices a matmul at the slower of its FLOP curve and
this streaming curve, which is what decides small-batch matmuls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from distplan.calibration import ROW_COUNTS, Curve, DeviceCalibration, OpTimes
from distplan.errors import CalibrationError
from distplan.host_memory import keep_freed_memory

from .budget import Budget

aten = torch.ops.aten

__all__ = [
    "CHAIN",
    "POOL_MAX",
    "Progress",
    "attention_kernel",
    "cache_bytes",
    "measure_device",
    "merge_devices",
    "precisions_for",
]

#: Memory-bound ops per timed chain.
CHAIN = 4
#: Most distinct weight tensors a measurement rotates over (see [Note: cold weights]).
POOL_MAX = 64
#: Progress callback: (what is being measured, steps done, steps in all).
Progress = Callable[[str, int, int], None]


def _median_s(fn: Callable[[], Any], budget: Budget) -> float:
    """Median seconds of one call of ``fn`` (torch.utils.benchmark: warm-up, blocks, median)."""
    fn()  # warm-up outside the timer too: first calls allocate and pick kernels
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=budget.min_run_time_s)
    return float(m.median)


def _geometric(lo: float, hi: float, per_decade: float) -> list[float]:
    n = max(1, math.ceil(math.log10(hi / lo) * per_decade))
    return [lo * (hi / lo) ** (i / n) for i in range(n + 1)]


@dataclass(frozen=True)
class Peers:
    """Collectives over the ranks that measure one device kind at once (``distplan.profiler.ranks``).

    ``barrier()`` waits for all of them; ``any(flag)`` is True on every rank when it is on one (a barrier
    too); ``min(x)`` is the smallest ``x`` any of them passed. Every rank must make the same calls in the
    same order, so every decision that ends a loop of measurements goes through them.
    """

    barrier: Callable[[], None]
    any: Callable[[bool], bool]
    min: Callable[[float], float]


class _Sweep:
    """The sizes of one curve: ``values`` in order, ending before a size whose op would take longer than the
    mode's ``max_op_s``, extrapolated from the last size timed as ``seconds * (size / last) ** power``
    (``power`` 2 where time grows with the square of the swept value, as attention's with its length), or
    after one that did take longer (report each op's seconds with :meth:`took`). Without the first test,
    at one size per decade (``--quick``) the first size past the limit took up to 40x it, out of the cache:
    2 s of the 2.3 s each operator's curve took, half of the mode's time.

    With ``peers`` (ranks measuring at once, see :class:`Peers`) every rank takes every size together: the
    ranks agree before each size whether to go on (one rank's op over the limit stops them all), so each
    size is timed while the others time the same size. Started together only per class, a rank that had
    finished its sweep left the other to time its largest (memory-bound) sizes alone: measured here, an Adam
    step over 18 MB took 8.6 ms alone against 11-12.5 ms beside a second rank doing the same, and the
    pooled curve priced the data-parallel MLP's optimizer at 13 ms where it took 19."""

    def __init__(
        self, values: Sequence[float], budget: Budget, power: float = 1.0, peers: Peers | None = None
    ) -> None:
        self.values = list(values)
        self.limit = budget.max_op_s
        self.power = power
        self.peers = peers
        self.last: tuple[float, float] | None = None  # (value, seconds) of the last size timed
        self._current = 0.0

    def __iter__(self) -> Iterator[float]:
        for v in self.values:
            stop = False
            if self.last is not None:
                prev, secs = self.last
                stop = secs > self.limit or secs * (v / prev) ** self.power > self.limit
            if self.peers is not None:
                stop = self.peers.any(stop)  # every rank calls it at every size: also their barrier
            if stop:
                return
            self._current = v
            yield v

    def took(self, seconds: float) -> None:
        """Record the seconds the op at the current size took."""
        self.last = (self._current, seconds)


@dataclass(frozen=True, slots=True)
class _Pace:
    """What every curve of one op class is measured under: the mode, the progress tick after each size, and
    the ranks measuring beside this one (each size taken together, see :class:`_Sweep`)."""

    budget: Budget
    tick: Callable[[], None]
    peers: Peers | None = None

    def sweep(self, values: Sequence[float], power: float = 1.0) -> _Sweep:
        """The sizes of one curve (:class:`_Sweep`)."""
        return _Sweep(values, self.budget, power, self.peers)


def _curve(points: Sequence[tuple[float, float]]) -> Curve:
    """A curve from (size, seconds) points: per size the median (the geometric mean of the middle two of
    an even count: several ranks measure each size), then made non-decreasing by pooling adjacent
    violators (a larger op never takes less time; a dip is noise). Pooling averages a spike with its
    neighbours (geometrically, by point count) where a running maximum would carry one slow measurement
    up to every larger size."""
    by_size: dict[float, list[float]] = {}
    for x, t in points:
        by_size.setdefault(float(x), []).append(max(float(t), 1e-9))
    xs = sorted(by_size)
    blocks: list[list[float]] = []  # [sum of log seconds, weight, sizes covered]
    for x in xs:
        logs = sorted(math.log(t) for t in by_size[x])
        mid = len(logs) // 2
        v = logs[mid] if len(logs) % 2 else (logs[mid - 1] + logs[mid]) / 2
        blocks.append([v * len(logs), float(len(logs)), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            a, b = blocks[-2], blocks.pop()
            a[0] += b[0]
            a[1] += b[1]
            a[2] += b[2]
    ts: list[float] = []
    for total, weight, n in blocks:
        ts.extend([math.exp(total / weight)] * int(n))
    return Curve(tuple(xs), tuple(ts))


def merge_devices(parts: Sequence[DeviceCalibration]) -> DeviceCalibration:
    """One device calibration from several ranks' measurements of the same device kind (taken at once):
    every curve's points pooled (:func:`_curve`: the median per size), the other figures rank 0's. Sizes
    one rank measured and another did not (a curve stops at the first size past the mode's longest op)
    keep the ranks that have them."""
    if len(parts) == 1:
        return parts[0]

    def curve(cs: Sequence[Curve]) -> Curve:
        return _curve([pt for c in cs for pt in zip(c.sizes, c.seconds, strict=True)])

    def times(ts: Sequence[OpTimes]) -> OpTimes:
        return OpTimes(curve([t.fwd for t in ts]), curve([t.bwd for t in ts]))

    def table(get: Callable[[DeviceCalibration], Any]) -> dict[Any, OpTimes]:
        keys = [k for k in get(parts[0]) if all(k in get(p) for p in parts)]
        return {k: times([get(p)[k] for p in parts]) for k in keys}

    first = parts[0]
    streams = [p.stream for p in parts if p.stream is not None]
    opt_keys = [k for k in first.optimizer if all(k in p.optimizer for p in parts)]
    return dataclasses.replace(
        first,
        ops=table(lambda d: d.ops),
        matmul=table(lambda d: d.matmul),
        attention=table(lambda d: d.attention),
        targets=table(lambda d: d.targets),
        row_matmul=table(lambda d: d.row_matmul),
        stream=times(streams) if len(streams) == len(parts) else first.stream,
        optimizer={k: curve([p.optimizer[k] for p in parts]) for k in opt_keys},
    )


def precisions_for(device: torch.device) -> tuple[str, ...]:
    """The matmul precisions this device runs natively (fp32 always; TF32 on CUDA compute capability 8+;
    bf16 where supported; fp16 on CUDA)."""
    if device.type != "cuda":
        return ("fp32",)
    out = ["fp32"]
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        out.append("tf32")
    if torch.cuda.is_bf16_supported():
        out.append("bf16")
    out.append("fp16")
    return tuple(out)


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Run matmuls at ``precision`` as the lowering does: fp32 strict (``highest``), tf32 (``high``), or
    bf16/fp16 autocast; restores the previous setting."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield
        else:
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def attention_kernel(device: torch.device, precision: str = "fp32") -> str:
    """Which scaled-dot-product-attention kernel torch picks here for a causal, dropout-free call."""
    from torch.nn.attention import SDPBackend

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    q = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    choice = int(torch._fused_sdp_choice(q, q, q, is_causal=True))
    names = {
        SDPBackend.FLASH_ATTENTION.value: "flash",
        SDPBackend.EFFICIENT_ATTENTION.value: "efficient",
        SDPBackend.CUDNN_ATTENTION.value: "cudnn",
    }
    return names.get(choice, "math")


def cache_bytes(device: torch.device) -> int:
    """The last-level cache of ``device`` in bytes: the largest CPU cache level sysfs lists (whole socket),
    or a GPU's L2; 32 MiB when it cannot be read."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 32 << 20)
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in base.glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 << 20


def memory_limit(device: torch.device, sharing: int = 1) -> float:
    """Bytes one measurement may allocate: a quarter of the device's memory shared by ``sharing`` ranks
    measuring at once (a CPU's RAM, a GPU's free memory), at most 4 GiB. Curves stop growing before a size
    needs more (beyond it they extrapolate)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        total = float(free)
    else:
        try:
            total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            total = 8.0 * 2**30
    return min(4.0 * 2**30, total / (4 * max(1, sharing)))


def _pool(nbytes_each: float, llc: int) -> int:
    """How many distinct weights of ``nbytes_each`` to rotate over (see [Note: cold weights])."""
    return max(1, min(POOL_MAX, math.ceil(2 * llc / max(nbytes_each, 1.0))))


def _fwd_bwd(
    fwd: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]],
    budget: Budget,
    ctx: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    per: int = 1,
) -> tuple[float, float]:
    """Forward and backward seconds of the op(s) ``fwd`` runs, divided by the ``per`` ops it chains.

    Given several callables (one per weight of a pool), successive calls rotate over them, forward and
    backward alike (see [Note: cold weights])."""
    fns = list(fwd) if isinstance(fwd, Sequence) else [fwd]
    turn = itertools.cycle(range(len(fns)))

    def one_fwd() -> torch.Tensor:
        return fns[next(turn)]()

    with ctx():
        tf = _median_s(one_fwd, budget)
        outs = [fn() for fn in fns]
    grads = [torch.ones_like(o) for o in outs]

    def bwd() -> None:
        i = next(turn)
        torch.autograd.backward(outs[i], grads[i], retain_graph=True)

    tb = _median_s(bwd, budget)
    return tf / per, tb / per


# ---------------------------------------------------------------------------------------------- classes
def _matmul(device: torch.device, precision: str, pace: _Pace, llc: int, mem: float) -> OpTimes:
    fwd_pts, bwd_pts = [], []
    prec = functools.partial(matmul_precision, precision, device)
    sweep = pace.sweep(_geometric(1e4, 1e14, pace.budget.points_per_decade))
    for target in sweep:
        # A linear of T = 2h tokens from width h to 3h: 2 T K N = 12 h^3 FLOPs (a transformer's matmuls
        # range from h -> h to h -> 4h on T = batch x sequence tokens).
        h = max(4, round((target / 12) ** (1 / 3) / 4) * 4)
        t, k, n = 2 * h, h, 3 * h
        count = _pool(4.0 * n * k, llc)
        if 4.0 * (3 * t * (k + n) + count * (2 * n * k + t * n)) > mem:
            break
        x = torch.randn(t, k, device=device, requires_grad=True)
        ws = [torch.randn(n, k, device=device, requires_grad=True) for _ in range(count)]
        tf, tb = _fwd_bwd([functools.partial(aten.linear.default, x, w) for w in ws], pace.budget, prec)
        flops = 2.0 * t * k * n
        fwd_pts.append((flops, tf))
        bwd_pts.append((flops, tb))
        pace.tick()
        sweep.took(tf)
    return OpTimes(_curve(fwd_pts), _curve(bwd_pts))


def _attention(device: torch.device, precision: str, pace: _Pace) -> OpTimes:
    fwd_pts, bwd_pts = [], []
    prec = functools.partial(matmul_precision, precision, device)
    heads, dim = 4, 32
    lengths = sorted({max(8, round(x / 8) * 8) for x in _geometric(8, 16384, pace.budget.points_per_decade)})
    sweep = pace.sweep(lengths, power=2.0)
    for s in sweep:
        s = int(s)
        q, k, v = (torch.randn(1, heads, s, dim, device=device, requires_grad=True) for _ in range(3))
        sdpa = functools.partial(aten.scaled_dot_product_attention.default, q, k, v, None, 0.0, True)
        tf, tb = _fwd_bwd(sdpa, pace.budget, prec)
        flops = 4.0 * heads * s * s * dim  # torch's FlopCounter formula for SDPA's forward (QK^T and PV)
        fwd_pts.append((flops, tf))
        bwd_pts.append((flops, tb))
        pace.tick()
        sweep.took(tf)
    return OpTimes(_curve(fwd_pts), _curve(bwd_pts))


def _stream(device: torch.device, pace: _Pace, llc: int, mem: float) -> OpTimes:
    """A one-token linear (matrix-vector product) against bytes moved (input + weight + output): how fast
    cold weights stream, forward and backward (see [Note: cold weights])."""
    fwd_pts, bwd_pts = [], []
    sweep = pace.sweep(_geometric(1e3, 1e11, pace.budget.points_per_decade))
    for target in sweep:
        k = max(4, round(math.sqrt(target / 4) / 4) * 4)
        count = _pool(4.0 * k * k, llc)
        if 4.0 * count * (3 * k * k + 4 * k) > mem:  # weights, their gradients, one more for the backward
            break
        x = torch.randn(1, k, device=device, requires_grad=True)
        ws = [torch.randn(k, k, device=device, requires_grad=True) for _ in range(count)]
        tf, tb = _fwd_bwd([functools.partial(aten.linear.default, x, w) for w in ws], pace.budget)
        nbytes = 4.0 * (k * k + 2 * k)
        fwd_pts.append((nbytes, tf))
        bwd_pts.append((nbytes, tb))
        pace.tick()
        sweep.took(tf)
    return OpTimes(_curve(fwd_pts), _curve(bwd_pts))


def _row_matmul(device: torch.device, pace: _Pace, llc: int, mem: float) -> dict[int, OpTimes]:
    """Linears of ``T`` rows (each of :data:`~distplan.calibration.ROW_COUNTS`) against their weight bytes
    ``8 k^2``, weights cold as for :func:`_stream` (see [Note: cold weights]); the backward accumulates the
    weight gradient into ``.grad`` as every microbatch after the first does. Each point is the geometric
    mean of an up-projection (``k -> 2k``) and a down-projection (``2k -> k``) of the same weights, as an
    MLP block has: at 4 rows on a CPU the down-projection's backward took 1.5x the up-projection's."""
    out: dict[int, OpTimes] = {}
    for rows in ROW_COUNTS:
        fwd_pts, bwd_pts = [], []
        sweep = pace.sweep(_geometric(1e4, 1e10, pace.budget.points_per_decade))
        for target in sweep:
            k = max(4, round(math.sqrt(target / 8) / 4) * 4)
            count = _pool(8.0 * k * k, llc)
            if 4.0 * (count * 6 * k * k + 6 * rows * k) > mem:  # weights, their gradients, one more
                break
            times = []
            for k_in, k_out in ((k, 2 * k), (2 * k, k)):
                x = torch.randn(rows, k_in, device=device, requires_grad=True)
                ws = [torch.randn(k_out, k_in, device=device, requires_grad=True) for _ in range(count)]
                times.append(
                    _fwd_bwd([functools.partial(aten.linear.default, x, w) for w in ws], pace.budget)
                )
                del x, ws
            tf = math.sqrt(times[0][0] * times[1][0])
            tb = math.sqrt(times[0][1] * times[1][1])
            fwd_pts.append((8.0 * k * k, tf))
            bwd_pts.append((8.0 * k * k, tb))
            pace.tick()
            sweep.took(tf)
        out[rows] = OpTimes(_curve(fwd_pts), _curve(bwd_pts))
    return out


def _shape(n: int) -> tuple[int, int]:
    """A (rows, width) shape of about ``n`` elements, width as in a hidden dimension."""
    width = 64 if n < 4096 else 256 if n < 1 << 20 else 1024
    return max(1, n // width), width


def _add(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return aten.add.Tensor(x, c)  # type: ignore[no-any-return]


def _mul(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return aten.mul.Tensor(x, c)  # type: ignore[no-any-return]


def _gelu(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return aten.gelu.default(x)  # type: ignore[no-any-return]


def _silu(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return aten.silu.default(x)  # type: ignore[no-any-return]


_ELEMENTWISE: tuple[tuple[str, int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], ...] = (
    # name, bytes per element moved (fp32: inputs + output), op(x, constant)
    ("add", 12, _add),
    ("mul", 12, _mul),
    ("gelu", 8, _gelu),
    ("silu", 8, _silu),
)


def _memory_class(
    device: torch.device,
    pace: _Pace,
    mem: float,
    ops: Sequence[
        tuple[str, Callable[[int], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], float]]]
    ],
) -> OpTimes:
    """Curves of memory-bound ops against bytes moved, the geometric mean over ``ops`` at each size.

    Each entry of ``ops`` maps a byte budget to (leaf input x, op(x), bytes one op moves); the op's own
    weights, if any, are leaves that require grad."""
    fwd_pts, bwd_pts = [], []
    sweep = pace.sweep(_geometric(64, 1e11, pace.budget.points_per_decade))
    for target in sweep:
        if (CHAIN + 4) * target > mem:  # the input, a constant, the chain's saved values, a gradient
            break
        tfs, tbs, sizes = [], [], []
        for _, build in ops:
            x, op, nbytes = build(int(target))
            tf, tb = _fwd_bwd(functools.partial(_chain, op, x), pace.budget, per=CHAIN)
            tfs.append(tf)
            tbs.append(tb)
            sizes.append(nbytes)
        size = math.exp(sum(map(math.log, sizes)) / len(sizes))
        fwd_pts.append((size, math.exp(sum(map(math.log, tfs)) / len(tfs))))
        bwd_pts.append((size, math.exp(sum(map(math.log, tbs)) / len(tbs))))
        pace.tick()
        sweep.took(max(tfs))
    return OpTimes(_curve(fwd_pts), _curve(bwd_pts))


#: Operators measured one by one (see ``DeviceCalibration.targets``): (ATen name, bytes moved per element
#: of the input as the tracer counts them, op on a positive input, whether the op keeps the shape so it
#: can be chained).
_TARGETS: tuple[tuple[str, int, Callable[[torch.Tensor], torch.Tensor], bool], ...] = (
    ("aten.tanh.default", 8, aten.tanh.default, True),
    ("aten.exp.default", 8, aten.exp.default, True),
    ("aten.sigmoid.default", 8, aten.sigmoid.default, True),
    ("aten.silu.default", 8, aten.silu.default, True),
    ("aten.gelu.default", 8, aten.gelu.default, True),
    ("aten.erf.default", 8, aten.erf.default, True),
    ("aten.sin.default", 8, aten.sin.default, True),
    ("aten.cos.default", 8, aten.cos.default, True),
    ("aten.rsqrt.default", 8, aten.rsqrt.default, True),
    ("aten.sqrt.default", 8, aten.sqrt.default, True),
    ("aten.pow.Tensor_Scalar", 8, functools.partial(aten.pow.Tensor_Scalar, exponent=2.0), True),
    ("aten.neg.default", 8, aten.neg.default, True),
    ("aten.mean.dim", 4, functools.partial(aten.mean.dim, dim=[-1], keepdim=True), False),
    ("aten.sum.dim_IntList", 4, functools.partial(aten.sum.dim_IntList, dim=[-1], keepdim=True), False),
    ("aten.softmax.int", 8, functools.partial(aten.softmax.int, dim=-1), True),
)


def _targets(device: torch.device, pace: _Pace, mem: float) -> dict[str, OpTimes]:
    """Curves of the operators of :data:`_TARGETS`, each against the bytes it moves."""
    out: dict[str, OpTimes] = {}
    sizes = _geometric(64, 1e11, max(1.0, pace.budget.points_per_decade * 2 / 3))
    for name, per_elem, op, chains in _TARGETS:
        fwd_pts, bwd_pts = [], []
        sweep = pace.sweep(sizes)
        for target in sweep:
            if (CHAIN + 4) * target > mem:
                break
            rows, width = _shape(max(1, int(target) // per_elem))
            x = (torch.rand(rows, width, device=device) + 0.5).requires_grad_()
            nbytes = float(per_elem * rows * width) + (4.0 * rows if not chains else 0.0)
            if chains:
                tf, tb = _fwd_bwd(functools.partial(_chain, op, x), pace.budget, per=CHAIN)
            else:
                tf, tb = _fwd_bwd(functools.partial(op, x), pace.budget)
            fwd_pts.append((nbytes, tf))
            bwd_pts.append((nbytes, tb))
            sweep.took(tf)
        out[name] = OpTimes(_curve(fwd_pts), _curve(bwd_pts))
        pace.tick()
    return out


def _chain(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = x
    for _ in range(CHAIN):
        y = op(y)
    return y


_Build = Callable[[int], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], float]]


def _elementwise_ops(device: torch.device) -> list[tuple[str, _Build]]:
    out: list[tuple[str, _Build]] = []
    for name, per_elem, fn in _ELEMENTWISE:

        def build(nbytes: int, per_elem: int = per_elem, fn: Any = fn) -> Any:
            rows, width = _shape(max(1, nbytes // per_elem))
            x = torch.randn(rows, width, device=device, requires_grad=True)
            c = torch.full((rows, width), 1.0001, device=device)
            return x, functools.partial(fn, c=c), float(per_elem * rows * width)

        out.append((name, build))
    return out


def _layer_norm(x: torch.Tensor, shape: list[int], w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return aten.layer_norm.default(x, shape, w, b)  # type: ignore[no-any-return]


def _norm_ops(device: torch.device) -> list[tuple[str, _Build]]:
    def layer_norm(nbytes: int) -> Any:
        rows, width = _shape(max(1, nbytes // 8))
        x = torch.randn(rows, width, device=device, requires_grad=True)
        w = torch.ones(width, device=device, requires_grad=True)
        b = torch.zeros(width, device=device, requires_grad=True)
        op = functools.partial(_layer_norm, shape=[width], w=w, b=b)
        return x, op, float(8 * rows * width + 8 * width)

    def softmax(nbytes: int) -> Any:
        rows, width = _shape(max(1, nbytes // 8))
        x = torch.randn(rows, width, device=device, requires_grad=True)
        return x, functools.partial(aten.softmax.int, dim=-1), float(8 * rows * width)

    return [("layer_norm", layer_norm), ("softmax", softmax)]


def _embedding(device: torch.device, pace: _Pace, llc: int, mem: float) -> OpTimes:
    """Embedding: the forward reads only the gathered rows (keyed by output bytes); the backward writes a
    dense gradient as large as the table (keyed by bytes moved, the table included, as the tracer counts)."""
    fwd_pts, bwd_pts = [], []
    dim = 64
    sweep = pace.sweep(_geometric(256, 1e10, pace.budget.points_per_decade))
    for target in sweep:
        tokens = max(1, int(target) // (4 * dim))
        # A table several times the tokens it serves, as vocabularies are, within the memory limit.
        vocab = max(1024, min(16 * tokens, int(mem / 8 / (4 * dim))))
        count = _pool(4.0 * vocab * dim, llc)
        if 4.0 * (count * 3 * vocab * dim + 4 * tokens * dim) > mem:
            break
        idx = torch.randint(0, vocab, (1, tokens), device=device)
        tables = [torch.randn(vocab, dim, device=device, requires_grad=True) for _ in range(count)]
        tf, tb = _fwd_bwd([functools.partial(aten.embedding.default, w, idx) for w in tables], pace.budget)
        out_bytes = 4.0 * tokens * dim
        fwd_pts.append((out_bytes, tf))
        bwd_pts.append((4.0 * vocab * dim + 8.0 * tokens + out_bytes, tb))
        pace.tick()
        sweep.took(max(tf, tb))
    return OpTimes(_curve(fwd_pts), _curve(bwd_pts))


def _view(device: torch.device, budget: Budget) -> OpTimes:
    """The fixed cost of an op that moves no bytes (view, transpose): a chain of them, divided."""
    x = torch.randn(4, 8, device=device, requires_grad=True)

    def views(y: torch.Tensor) -> torch.Tensor:
        y = aten.view.default(aten.view.default(y, [8, 4]), [4, 8])
        return aten.transpose.int(aten.transpose.int(y, 0, 1), 0, 1)  # type: ignore[no-any-return]

    tf, tb = _fwd_bwd(functools.partial(_chain, views, x), budget, per=4 * CHAIN)
    return OpTimes(Curve((1.0,), (tf,)), Curve((1.0,), (tb,)))


def _optimizer(device: torch.device, name: str, pace: _Pace, mem: float, llc: int) -> Curve:
    """Seconds of one optimizer step per parameter tensor, against the tensor's bytes (8 equal tensors,
    stepped together as the runtime steps a stage's parameters, divided). In training the step reads
    weights, gradients and states the forward and backward have pushed out of the cache, so successive
    steps rotate over groups of 8 holding together at least twice the last-level cache, as the weight
    pools do (see [Note: cold weights]); stepping the same 8 small tensors again and again found them in
    the cache and measured 20-45% below what the runtime's steps took."""
    pts = []
    count = 8
    sweep = pace.sweep(_geometric(64, 4e9, pace.budget.points_per_decade))
    for target in sweep:
        n = max(1, int(target) // 4)
        groups = _pool(count * 4 * 4.0 * n, llc)  # weights, gradients, two states
        if groups * count * 4 * 4.0 * n > mem:
            break
        opts: list[torch.optim.Optimizer] = []
        for _ in range(groups):
            params = [torch.nn.Parameter(torch.randn(n, device=device)) for _ in range(count)]
            for p in params:
                p.grad = torch.randn_like(p)
            if name == "sgd":
                opts.append(torch.optim.SGD(params, lr=1e-3))
            elif name == "adamw":
                opts.append(torch.optim.AdamW(params, lr=1e-3))
            else:
                opts.append(torch.optim.Adam(params, lr=1e-3))
        turn = itertools.cycle(opts)

        def step(turn: Iterator[torch.optim.Optimizer] = turn) -> None:
            next(turn).step()

        t = _median_s(step, pace.budget) / count
        pts.append((4.0 * n, t))
        pace.tick()
        sweep.took(t * count)
    return _curve(pts)


@dataclass(frozen=True, slots=True)
class RuntimeOverhead:
    """What distplan's pipeline runtime adds on one rank beyond the ops it runs (seconds).

    Attributes:
        microbatch_fwd_s / microbatch_bwd_s: per microbatch on a stage, forward / backward.
        step_s: per iteration, beyond its microbatches.
    """

    microbatch_fwd_s: float
    microbatch_bwd_s: float
    step_s: float


def _profiled_cluster(devices: int) -> dict[str, Any]:
    """A cluster of ``devices`` devices of one host for plans that are run, not priced (any figures do)."""
    return {
        "name": "profiled",
        "kinds": [
            {"name": "profiled", "memory_gib": 1, "memory_bandwidth_gbyte_s": 1, "peak_tflops": {"fp32": 1}}
        ],
        "hosts": [
            {"name": "h", "devices": [{"kind": "profiled"}] * devices, "link": {"bandwidth_gbyte_s": 1}}
        ],
    }


def runtime_overhead(device: str, budget: Budget) -> RuntimeOverhead:
    """distplan's pipeline runtime's own cost on one stage: per microbatch, forward and backward, and per
    iteration (seconds).

    A one-stage plan of a tiny model is lowered for real (:func:`distplan.lowering.lower`, in a process
    group of this process alone) and stepped with 1 and 8 microbatches; the time per extra microbatch minus
    what the runner measured inside its stage and loss regions is what the runtime adds around them
    (input chunks, actions, bookkeeping), split evenly between the forward and the backward; what the
    one-microbatch step spent outside those regions beyond that is the per-iteration part (clearing the
    gradients, slicing the batch, collecting the loss). Needs this process outside any process group
    (``distplan profile`` calls it from the launching process).
    """
    import os

    import torch.distributed as dist

    from distplan.lowering import lower
    from distplan.planner import evaluate
    from distplan.tracer import trace

    if dist.is_initialized():
        raise CalibrationError("the runtime overhead is measured outside any process group")
    dev = torch.device(device)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(dev)
    graph = trace(model, (torch.randn(1, 8),))
    cluster = _profiled_cluster(1)
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        per_step: dict[int, tuple[float, float]] = {}
        for m in (1, 8):
            plan = evaluate(graph, cluster=cluster, layout=f"gpipe m{m}x1 | 0:{len(graph)}@0", global_batch=m)
            runner = lower(
                plan,
                model,
                example_inputs=(torch.randn(1, 8),),
                loss_fn=F.mse_loss,
                check_graph=False,
                device=device,
            )
            x = torch.randn(m, 8, device=dev)
            y = torch.randn(m, 8, device=dev)

            def step(runner: Any = runner, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                runner.step(x, y)

            total = _median_s(step, budget)
            t = runner.step_times()
            inside = t.compute_s
            per_step[m] = (total, inside)
        (t1, in1), (t8, in8) = per_step[1], per_step[8]
        outside = max(0.0, ((t8 - in8) - (t1 - in1)) / 7)
        return RuntimeOverhead(outside / 2, outside / 2, max(0.0, (t1 - in1) - outside))
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Iterations each launch of :func:`pipeline_overhead` measures, per mode (the median is kept).
_PIPELINE_STEPS = {"quick": 8, "default": 16, "thorough": 40}


def pipeline_overhead(device: str, budget: Budget, one_rank: RuntimeOverhead) -> tuple[float, float]:
    """What a pipeline boundary adds to one microbatch on each of its two ranks beyond the transfer,
    forward and backward (seconds): posting the send and the receive, and on a CPU handing the core to
    gloo's thread (see [Note: sends on CPU threads] in ``distplan.lowering.executor``).

    A two-stage GPipe plan of the built-in ``mlp-tiny`` (messages of a few hundred bytes) is run for real
    on two ranks of this host (:func:`distplan.lowering.timing.measure`) with 1 and 8 microbatches; per
    rank, the iteration minus every timed region (compute, loss, transfer waits, all-reduce, optimizer) is
    the runtime's own time, and its growth per microbatch minus ``one_rank``'s (a stage without
    boundaries) is the boundary's part, split evenly between the forward and the backward. Measured on
    this 2-core VM: 0.41-0.49 ms per microbatch per boundary (one rank's runtime alone: 0.06 ms); unpriced,
    it left every pipeline row of ``benchmarks/cost_accuracy.py`` under-predicted.

    Raises:
        CalibrationError: when the plan cannot be run here (fewer than two devices, a rank that failed).
    """
    from distplan.errors import DistplanError
    from distplan.lowering.timing import measure
    from distplan.planner import evaluate
    from distplan.tracer import resolve_model, trace_bundle

    graph = trace_bundle(resolve_model("mlp-tiny", batch=1, device="meta"))
    n = len(graph)
    cut = min(range(1, n), key=lambda p: (abs(p - n // 2), p))
    outside: dict[int, list[float]] = {}
    for m in (1, 8):
        plan = evaluate(
            graph,
            cluster=_profiled_cluster(2),
            layout=f"gpipe m{m}x1 | 0:{cut}@0 | {cut}:{n}@1",
            global_batch=m,
        )
        try:
            run = measure(
                plan, "mlp-tiny", steps=_PIPELINE_STEPS.get(budget.name, 16), warmup=3, device=device
            )
        except DistplanError as e:
            raise CalibrationError(f"the pipeline overhead could not be measured: {e}") from e
        outside[m] = [statistics.median(step[r].untimed_s for step in run.steps) for r in range(2)]
    slope = sum((outside[8][r] - outside[1][r]) / 7 for r in range(2)) / 2
    extra = max(0.0, slope - one_rank.microbatch_fwd_s - one_rank.microbatch_bwd_s)
    return extra / 2, extra / 2


def measure_device(
    *,
    device: str,
    budget: Budget,
    precisions: Sequence[str] | None = None,
    threads: int | None = None,
    optimizers: Sequence[str] = ("adam", "adamw", "sgd"),
    progress: Progress | None = None,
    source: str = "",
    peers: Peers | None = None,
    sharing: int = 1,
    runtime: bool = True,
) -> DeviceCalibration:
    """Measure this machine's ``device`` (``cpu``, ``cuda`` or ``cuda:N``) for the cost model.

    Args:
        device: the torch device to measure.
        budget: the mode (:data:`distplan.profiler.budget.MODES`).
        precisions: matmul precisions to measure; default the device's native ones (:func:`precisions_for`).
        threads: CPU compute threads (``torch.set_num_threads``) while measuring; default 1 on a CPU device,
            as each CPU rank of a distplan run computes on one core, and torch's current setting on CUDA.
        optimizers: optimizers whose per-tensor step is measured.
        progress: called with (what, done, total) as measurements finish.
        source: provenance written into the result.
        peers: the ranks measuring at once, if several (:class:`Peers`): they start each op class and each
            size together, so every measurement runs beside the others, as the ranks of a plan do, and they
            use the smallest memory limit any of them has.
        sharing: ranks sharing this device's last-level cache while measuring (the CPU cores of a host);
            the calibration records the cache per rank.
        runtime: also measure the pipeline runtime's per-microbatch cost (:func:`runtime_overhead`) and what
            ops cost inside a whole model (``distplan.profiler.reference``); only outside a process group —
            ranks measuring together leave both to the launching process.

    Returns:
        The :class:`DeviceCalibration`.

    Raises:
        CalibrationError: an unknown device or a precision the device cannot run.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CalibrationError(f"device {device!r} is not a torch device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("device 'cuda' asked for, but torch sees no CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise CalibrationError(f"device {device!r}: distplan profile measures cpu and cuda devices")
    native = precisions_for(dev)
    precs = tuple(precisions) if precisions else native
    for p in precs:
        if p not in native:
            raise CalibrationError(
                f"precision {p!r} cannot run on {dev.type} here (native: {', '.join(native)})"
            )
    old_threads = torch.get_num_threads()
    if threads is None:
        threads = 1 if dev.type == "cpu" else old_threads
    if threads < 1:
        raise CalibrationError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if dev.type == "cpu":
        keep_freed_memory()  # the ranks' allocator (see [Note: freed memory on CPU ranks])
    steps = {"n": 0}
    per_curve = max(2, math.ceil(10 * budget.points_per_decade))
    total = per_curve * (2 * len(precs) + 4 + len(ROW_COUNTS) + len(optimizers)) + len(_TARGETS) + 2
    llc = cache_bytes(dev)
    mem = memory_limit(dev, sharing)
    if peers is not None:
        # The same sizes on every rank: a size one rank skipped would leave the others waiting for it.
        mem = peers.min(mem)
    sync = peers.barrier if peers is not None else (lambda: None)

    def ticker(what: str) -> Callable[[], None]:
        def tick() -> None:
            steps["n"] = min(steps["n"] + 1, total - 1)
            if progress is not None:
                progress(what, steps["n"], total)

        return tick

    def pace(what: str) -> _Pace:
        return _Pace(budget, ticker(what), peers)

    try:
        torch.manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            matmul, attention = {}, {}
            for p in precs:
                sync()
                matmul[p] = _matmul(dev, p, pace(f"matmul {p}"), llc, mem)
                sync()
                attention[p] = _attention(dev, p, pace(f"attention {p}"))
            sync()
            stream = _stream(dev, pace("weight streaming"), llc, mem)
            sync()
            rows = _row_matmul(dev, pace("few-row matmuls"), llc, mem)
            ops = {}
            sync()
            ops["elementwise"] = _memory_class(dev, pace("elementwise"), mem, _elementwise_ops(dev))
            sync()
            ops["norm"] = _memory_class(dev, pace("norm"), mem, _norm_ops(dev))
            sync()
            ops["embedding"] = _embedding(dev, pace("embedding"), llc, mem)
            sync()
            ops["view"] = _view(dev, budget)
            sync()
            targets = _targets(dev, pace("operators"), mem)
            opt = {}
            for name in optimizers:
                sync()
                opt[name] = _optimizer(dev, name, pace(f"optimizer {name}"), mem, llc)
            overhead = RuntimeOverhead(0.0, 0.0, 0.0)
            if runtime:
                ticker("runtime overhead")()
                overhead = runtime_overhead(str(dev), budget)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
        kernel = attention_kernel(dev, precs[0])
        out = DeviceCalibration(
            ops=ops,
            matmul=matmul,
            attention=attention,
            targets=targets,
            stream=stream,
            row_matmul=rows,
            cache_bytes=llc // max(1, sharing),
            attention_kernel=kernel,
            microbatch_fwd_s=overhead.microbatch_fwd_s,
            microbatch_bwd_s=overhead.microbatch_bwd_s,
            step_s=overhead.step_s,
            optimizer=opt,
            threads=threads,
            device_name=name,
            source=source,
        )
        if runtime:
            from .reference import in_graph_costs

            out = in_graph_costs(str(dev), budget, out)
        if progress is not None:
            progress("done", total, total)
        return out
    finally:
        torch.set_num_threads(old_threads)


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
