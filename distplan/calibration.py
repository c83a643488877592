"""Measured costs of a device kind and of a link: what ``distplan profile`` writes and the cost model reads.

A calibration replaces datasheet guesses (peak FLOP/s times an efficiency factor, bandwidth, a fixed
launch overhead) by times measured on the machine, for the op classes a traced graph contains and the
transfers a plan makes. It is plain data, torch-free, and round-trips through JSON like the other core
data (``to_dict``/``from_dict``, ``schema_version``).

[Note: curves]
A :class:`Curve` holds the measured seconds of one operation against its size (FLOPs for matrix multiplies
and attention, bytes for memory-bound ops and transfers). Between measured sizes the time is interpolated
linearly in log-log space (a power law between neighbours, which is how achieved throughput ramps up with
size); below the smallest size the time is the smallest measured one (there the fixed per-op overhead of
the framework dominates, and a smaller op costs no less); above the largest size the time grows at the
throughput of the largest measurement (``time = seconds[-1] * size / sizes[-1]``), the roofline's
asymptote. The curves include the per-op overhead of the runtime that ran them, which on a CPU and with
small models is most of an op's time.

[Note: op classes]
Every graph node is priced by one class (:data:`OP_CLASSES`), decided from its operator and sizes alone
(:func:`op_class`, no torch): ``matmul`` (mm, addmm, bmm, linear, conv, einsum; size = forward FLOPs),
``attention`` (fused scaled-dot-product attention; size = forward FLOPs), ``norm`` (layer/RMS/group/batch
norm, softmax: reductions; size = bytes moved), ``embedding`` (embedding, gather, index_select; size =
bytes moved), ``elementwise`` (every other op that moves bytes; size = bytes moved) and ``view`` (ops that
move no bytes and do no arithmetic: view, transpose, expand, split; a fixed cost). Each class has a forward
and a backward curve; the backward curve is keyed by the same forward size, so a node's backward needs
nothing but its forward size.

[Note: calibration files]
``distplan profile`` writes one :class:`Calibration` per run: the device kind it measured (``kind``), the
compute part (:class:`DeviceCalibration`) and, when it ran two ranks or more, the link part
(:class:`LinkCalibration`, measured over the backend in use between the ranks it ran). A cluster YAML
names such files in a top-level ``calibrations:`` list (paths relative to the YAML file); the compute part
attaches to the kind of that name, the link part to the links it measured: ``intra-host`` to the link of
every host whose devices are all of that kind, ``network`` to the cluster's network (see
``distplan.profiles``). Inside a cluster, and so inside a plan, the parts are stored with the kind and the
link they describe (``DeviceKind.calibration``, ``Link.calibration``), which keeps a plan self-contained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distplan._serde import get_float, get_int, get_list, get_map, get_str, load_json
from distplan.errors import CalibrationError

__all__ = [
    "ATTENTION_KERNELS",
    "CALIBRATION_SCHEMA_VERSION",
    "COLLECTIVES",
    "LINK_SCOPES",
    "OP_CLASSES",
    "PRECISIONS",
    "ROW_COUNTS",
    "Calibration",
    "Curve",
    "DeviceCalibration",
    "LinkCalibration",
    "OpTimes",
    "op_class",
]

CALIBRATION_SCHEMA_VERSION = 1
#: Classes every graph node is priced by (see [Note: op classes]).
OP_CLASSES: tuple[str, ...] = ("matmul", "attention", "norm", "embedding", "elementwise", "view")
#: Classes measured per matmul precision (the others are memory-bound and keyed by bytes).
PRECISION_CLASSES: tuple[str, ...] = ("matmul", "attention")
#: Matrix-multiply precisions: fp32 (strict IEEE), tf32 (fp32 tensors, TF32 tensor-core matmuls),
#: bf16 / fp16 (autocast: matmuls in half precision, fp32 master weights).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
#: Scaled-dot-product-attention kernels: the fused ones keep no score matrix; ``math`` stores it.
ATTENTION_KERNELS: tuple[str, ...] = ("flash", "efficient", "cudnn", "math")
#: Row counts ``distplan profile`` measures linears of few rows at (:attr:`DeviceCalibration.row_matmul`);
#: from the largest on, a linear is priced by its FLOPs.
ROW_COUNTS: tuple[int, ...] = (4, 16, 64)
COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter")
LINK_SCOPES: tuple[str, ...] = ("intra-host", "network")
_E = CalibrationError

_MATMUL_WORDS = ("addmm", "baddbmm", "bmm", "mm.", "matmul", "linear", "conv", "einsum")
_ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
_NORM_WORDS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm", "softmax")
_EMBEDDING_WORDS = ("embedding", "index_select", "gather", "take")


def op_class(target: str, *, fwd_flops: int, bytes_moved: int) -> str:
    """The class a graph node is priced by (see [Note: op classes]).

    Args:
        target: the node's operator, e.g. ``aten.linear.default``.
        fwd_flops / bytes_moved: its forward FLOPs and bytes (from the tracer).

    Returns:
        One of :data:`OP_CLASSES`.
    """
    t = target.lower()
    if any(w in t for w in _ATTENTION_WORDS):
        return "attention"
    if any(w in t for w in _MATMUL_WORDS) and fwd_flops > 0:
        return "matmul"
    if fwd_flops == 0 and bytes_moved == 0:
        return "view"
    if any(w in t for w in _NORM_WORDS):
        return "norm"
    if any(w in t for w in _EMBEDDING_WORDS):
        return "embedding"
    return "elementwise"


# ---------------------------------------------------------------------------------------------- curves
@dataclass(frozen=True, slots=True)
class Curve:
    """Measured seconds of one operation against its size (see [Note: curves]).

    Attributes:
        sizes: strictly increasing sizes > 0 (FLOPs or bytes, as the owner says).
        seconds: the median measured seconds at each size, > 0.
    """

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise _E("sizes: a curve needs at least one measured point")
        if len(self.sizes) != len(self.seconds):
            raise _E(f"seconds: {len(self.seconds)} times for {len(self.sizes)} sizes (one per size)")
        for i, (x, t) in enumerate(zip(self.sizes, self.seconds, strict=True)):
            if not (math.isfinite(x) and x > 0):
                raise _E(f"sizes[{i}]: expected a positive finite number, got {x!r}")
            if not (math.isfinite(t) and t > 0):
                raise _E(f"seconds[{i}]: expected a positive finite number, got {t!r}")
            if i and not x > self.sizes[i - 1]:
                raise _E(f"sizes[{i}]: sizes must increase strictly, got {self.sizes[i - 1]!r} then {x!r}")

    def time(self, size: float) -> float:
        """Seconds at ``size`` (interpolated, see [Note: curves]); 0 for a size <= 0 is *not* given: the
        smallest measured time is the floor."""
        xs, ts = self.sizes, self.seconds
        if size <= xs[0]:
            return ts[0]
        if size >= xs[-1]:
            return ts[-1] * size / xs[-1]
        lo, hi = 0, len(xs) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if xs[mid] <= size:
                lo = mid
            else:
                hi = mid
        w = (math.log(size) - math.log(xs[lo])) / (math.log(xs[hi]) - math.log(xs[lo]))
        return math.exp(math.log(ts[lo]) + w * (math.log(ts[hi]) - math.log(ts[lo])))

    def rate(self, size: float) -> float:
        """Achieved throughput at ``size``: size units per second (FLOP/s or bytes/s)."""
        return size / self.time(size)

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, d: Any, path: str) -> Curve:
        m = get_map(d, path, _E)
        sizes = get_list(m, "sizes", path, _E)
        seconds = get_list(m, "seconds", path, _E)
        for key, seq in (("sizes", sizes), ("seconds", seconds)):
            for i, v in enumerate(seq):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise _E(f"{path}.{key}[{i}]: expected a positive number, got {v!r}")
        try:
            return cls(tuple(float(x) for x in sizes), tuple(float(t) for t in seconds))
        except CalibrationError as e:
            raise _E(f"{path}.{e}") from e


@dataclass(frozen=True, slots=True)
class OpTimes:
    """Forward and backward seconds of one op class, both against the op's forward size."""

    fwd: Curve
    bwd: Curve

    def to_dict(self) -> dict[str, Any]:
        return {"fwd": self.fwd.to_dict(), "bwd": self.bwd.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, path: str) -> OpTimes:
        m = get_map(d, path, _E)
        for k in ("fwd", "bwd"):
            if k not in m:
                raise _E(f"{path}.{k}: missing required field")
        return cls(Curve.from_dict(m["fwd"], f"{path}.fwd"), Curve.from_dict(m["bwd"], f"{path}.bwd"))


def _four(v: Any, path: str) -> tuple[float, float, float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise _E(f"{path}: expected a list of four numbers, got {v!r}")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise _E(f"{path}[{i}]: expected a number >= 0, got {x!r}")
    return (float(v[0]), float(v[1]), float(v[2]), float(v[3]))


# ---------------------------------------------------------------------------------------------- device
@dataclass(frozen=True, slots=True)
class DeviceCalibration:
    """What one device of a kind was measured to do (the compute part of a :class:`Calibration`).

    Attributes:
        ops: per memory-bound / fixed-cost class (``norm``, ``embedding``, ``elementwise``, ``view``) the
            forward and backward seconds against bytes moved (see [Note: op classes]).
        targets: per ATen operator (``aten.tanh.default``, ``aten.mean.dim``, ...) whose cost per byte is far
            from its class's (transcendental functions run 3-20x longer per element than an add; reductions
            write little), its own forward and backward seconds against bytes moved; a node of such a target
            is priced by it rather than by its class.
        matmul / attention: per matmul precision (:data:`PRECISIONS`) the forward and backward seconds of
            a matrix multiply / fused attention against forward FLOPs. A precision not listed was not
            measured: the cost model prices it from the datasheet and says so.
        stream: forward and backward seconds of a one-token linear against bytes moved, its weights read
            from memory (not from a cache): how fast weights stream. A matmul costs at least this for its
            bytes, which decides small-batch matmuls (see ``distplan.profiler.compute``, [Note: cold weights]).
        row_matmul: per row count ``T`` (:data:`ROW_COUNTS`; the rows of a linear's input: tokens x samples
            of one microbatch), forward and backward seconds of a ``T``-row linear against its weight bytes,
            weights cold as for :attr:`stream` (which is the ``T = 1`` member). A linear of few rows is
            bound neither by its FLOPs nor by reading its weights once: its backward writes a weight-sized
            gradient and adds it into the accumulated one, and a GEMM packs the weights; measured at 4-row
            microbatches on a CPU, a 512 -> 1024 linear's backward took 3x its forward where the FLOP curve
            said 1.3x. The cost model interpolates between the counts (see ``distplan.planner.cost``,
            [Note: calibrated pricing]); empty when not measured.
        cache_bytes: the last-level cache one rank has (a GPU's L2; a CPU socket's last level over the ranks
            sharing it), for reference.
        attention_kernel: the scaled-dot-product-attention kernel the device ran (:data:`ATTENTION_KERNELS`);
            ``math`` stores the score matrix for the backward.
        microbatch_fwd_s / microbatch_bwd_s: the pipeline runtime's fixed cost of one microbatch's forward /
            backward on one stage (schedule bookkeeping, argument flattening, autograd set-up), beyond its ops.
        boundary_fwd_s / boundary_bwd_s: what each pipeline boundary of a stage adds to one microbatch's
            forward / backward on its rank, beyond the transfer itself: posting the send and the receive
            and handing the core to the backend's thread (measured on a CPU with gloo: 0.2-0.45 ms a
            message, outside every timed region; see ``distplan.profiler.compute.pipeline_overhead``).
            A first or last stage has one boundary, a middle stage two.
        step_s: the runtime's fixed cost of one iteration on a rank beyond its microbatches (clearing the
            gradients, slicing the batch, collecting the loss).
        in_graph: what an op costs inside a whole model beyond its time alone (its inputs no longer hot in
            the cache, its output in fresh memory): ``(forward s per node, forward s per output byte,
            backward s per node, backward s per output byte)``, fitted on a reference model run whole (see
            ``distplan.profiler.reference``); zeros when not measured.
        optimizer: per optimizer (``adam``, ``adamw``, ``sgd``) the seconds of one step of one parameter tensor
            against the tensor's bytes.
        threads: CPU threads the measurements ran with (a CPU rank's compute threads).
        device_name: what the device reported, e.g. ``NVIDIA A100-SXM4-80GB`` or the CPU model.
        source: where the figures came from (file, host, date), for plans and reports.
    """

    ops: Mapping[str, OpTimes]
    matmul: Mapping[str, OpTimes]
    attention: Mapping[str, OpTimes] = field(default_factory=dict)
    targets: Mapping[str, OpTimes] = field(default_factory=dict)
    stream: OpTimes | None = None
    row_matmul: Mapping[int, OpTimes] = field(default_factory=dict)
    cache_bytes: int = 0
    attention_kernel: str = "math"
    microbatch_fwd_s: float = 0.0
    microbatch_bwd_s: float = 0.0
    boundary_fwd_s: float = 0.0
    boundary_bwd_s: float = 0.0
    step_s: float = 0.0
    in_graph: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    optimizer: Mapping[str, Curve] = field(default_factory=dict)
    threads: int = 1
    device_name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for k in self.ops:
            if k not in OP_CLASSES or k in PRECISION_CLASSES:
                allowed = [c for c in OP_CLASSES if c not in PRECISION_CLASSES]
                raise _E(f"ops: unknown op class {k!r}; expected one of {', '.join(allowed)}")
        for what, table in (("matmul", self.matmul), ("attention", self.attention)):
            for p in table:
                if p not in PRECISIONS:
                    raise _E(f"{what}: unknown precision {p!r}; expected one of {', '.join(PRECISIONS)}")
        if not self.matmul:
            raise _E("matmul: no precision measured (a calibration needs at least one matmul curve)")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise _E(
                f"attention_kernel: expected one of {', '.join(ATTENTION_KERNELS)}, got {self.attention_kernel!r}"
            )
        for f in ("microbatch_fwd_s", "microbatch_bwd_s", "boundary_fwd_s", "boundary_bwd_s", "step_s"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v >= 0):
                raise _E(f"{f}: expected a number >= 0, got {v!r}")
        if self.threads < 1:
            raise _E(f"threads: expected an integer >= 1, got {self.threads}")
        if len(self.in_graph) != 4 or not all(math.isfinite(v) and v >= 0 for v in self.in_graph):
            raise _E(f"in_graph: expected four numbers >= 0, got {list(self.in_graph)!r}")
        if self.cache_bytes < 0:
            raise _E(f"cache_bytes: expected an integer >= 0, got {self.cache_bytes}")
        for rows in self.row_matmul:
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2:
                raise _E(f"row_matmul: row counts must be integers >= 2 (1 is `stream`), got {rows!r}")
        for t in self.targets:
            if not t.startswith("aten."):
                raise _E(f"targets: {t!r} is not an ATen operator name (aten.<op>.<overload>)")

    @property
    def fused_attention(self) -> bool:
        """Whether attention ran a fused kernel (no stored score matrix)."""
        return self.attention_kernel != "math"

    def classes(self) -> tuple[str, ...]:
        """The op classes with measured curves (``matmul``/``attention`` when any precision is)."""
        out = [c for c in OP_CLASSES if c in self.ops]
        out += [c for c, t in (("matmul", self.matmul), ("attention", self.attention)) if t]
        return tuple(c for c in OP_CLASSES if c in out)

    def node_times(self, target: str, cls: str, precision: str) -> OpTimes | None:
        """The curves pricing a node of operator ``target`` in class ``cls``: the operator's own when
        measured (:attr:`targets`), else its class's (:meth:`op_times`)."""
        own = self.targets.get(target)
        return own if own is not None else self.op_times(cls, precision)

    def op_times(self, cls: str, precision: str) -> OpTimes | None:
        """The curves pricing op class ``cls`` at matmul ``precision``; None when not measured."""
        if cls in PRECISION_CLASSES:
            return (self.matmul if cls == "matmul" else self.attention).get(precision)
        return self.ops.get(cls)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": {k: v.to_dict() for k, v in self.ops.items()},
            "matmul": {k: v.to_dict() for k, v in self.matmul.items()},
            "attention": {k: v.to_dict() for k, v in self.attention.items()},
            "targets": {k: v.to_dict() for k, v in self.targets.items()},
            "stream": None if self.stream is None else self.stream.to_dict(),
            "row_matmul": {str(k): v.to_dict() for k, v in sorted(self.row_matmul.items())},
            "cache_bytes": self.cache_bytes,
            "attention_kernel": self.attention_kernel,
            "microbatch_fwd_s": self.microbatch_fwd_s,
            "microbatch_bwd_s": self.microbatch_bwd_s,
            "boundary_fwd_s": self.boundary_fwd_s,
            "boundary_bwd_s": self.boundary_bwd_s,
            "step_s": self.step_s,
            "in_graph": list(self.in_graph),
            "optimizer": {k: v.to_dict() for k, v in self.optimizer.items()},
            "threads": self.threads,
            "device_name": self.device_name,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "device") -> DeviceCalibration:
        m = get_map(d, path, _E)

        def table(key: str, required: bool) -> dict[str, OpTimes]:
            if key not in m and required:
                raise _E(f"{path}.{key}: missing required field")
            raw = get_map(m.get(key, {}), f"{path}.{key}", _E)
            return {str(k): OpTimes.from_dict(v, f"{path}.{key}.{k}") for k, v in raw.items()}

        opt = get_map(m.get("optimizer", {}), f"{path}.optimizer", _E)
        rows: dict[int, OpTimes] = {}
        for k, v in get_map(m.get("row_matmul", {}), f"{path}.row_matmul", _E).items():
            if not str(k).isdigit():
                raise _E(f"{path}.row_matmul.{k}: a row count must be a positive integer, got {k!r}")
            rows[int(k)] = OpTimes.from_dict(v, f"{path}.row_matmul.{k}")
        try:
            return cls(
                ops=table("ops", True),
                matmul=table("matmul", True),
                attention=table("attention", False),
                targets=table("targets", False),
                stream=None if m.get("stream") is None else OpTimes.from_dict(m["stream"], f"{path}.stream"),
                row_matmul=rows,
                cache_bytes=get_int(m, "cache_bytes", path, _E, 0),
                attention_kernel=get_str(m, "attention_kernel", path, _E, "math"),
                microbatch_fwd_s=get_float(m, "microbatch_fwd_s", path, _E, 0.0),
                microbatch_bwd_s=get_float(m, "microbatch_bwd_s", path, _E, 0.0),
                boundary_fwd_s=get_float(m, "boundary_fwd_s", path, _E, 0.0),
                boundary_bwd_s=get_float(m, "boundary_bwd_s", path, _E, 0.0),
                step_s=get_float(m, "step_s", path, _E, 0.0),
                in_graph=_four(m.get("in_graph", [0.0, 0.0, 0.0, 0.0]), f"{path}.in_graph"),
                optimizer={str(k): Curve.from_dict(v, f"{path}.optimizer.{k}") for k, v in opt.items()},
                threads=get_int(m, "threads", path, _E, 1, minimum=1),
                device_name=get_str(m, "device_name", path, _E, ""),
                source=get_str(m, "source", path, _E, ""),
            )
        except CalibrationError as e:
            if str(e).startswith(path):
                raise
            raise _E(f"{path}.{e}") from e


# ---------------------------------------------------------------------------------------------- link
@dataclass(frozen=True, slots=True)
class LinkCalibration:
    """What a link was measured to do over one backend (the link part of a :class:`Calibration`).

    Sizes are bytes of the whole tensor: the buffer each rank sends (point-to-point), holds (all-reduce),
    ends with (all-gather) or starts with (reduce-scatter).

    Attributes:
        backend: ``gloo`` or ``nccl``.
        scope: ``intra-host`` (ranks on one host) or ``network`` (ranks on different hosts).
        p2p: seconds of one send/receive pair against bytes.
        collectives: per collective (:data:`COLLECTIVES`) and world size, seconds against bytes.
        source: where the figures came from (file, host, date).
    """

    backend: str
    scope: str
    p2p: Curve
    collectives: Mapping[str, Mapping[int, Curve]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.backend:
            raise _E("backend: must not be empty (gloo, nccl, ...)")
        if self.scope not in LINK_SCOPES:
            raise _E(f"scope: expected one of {', '.join(LINK_SCOPES)}, got {self.scope!r}")
        for name, by_world in self.collectives.items():
            if name not in COLLECTIVES:
                raise _E(
                    f"collectives: unknown collective {name!r}; expected one of {', '.join(COLLECTIVES)}"
                )
            for w in by_world:
                if isinstance(w, bool) or not isinstance(w, int) or w < 2:
                    raise _E(f"collectives.{name}: world sizes must be integers >= 2, got {w!r}")

    def send_time(self, nbytes: float) -> float:
        """Seconds to send ``nbytes`` to one peer (0 for nothing)."""
        return self.p2p.time(nbytes) if nbytes > 0 else 0.0

    def collective_time(self, name: str, nbytes: float, world: int) -> float | None:
        """Seconds of collective ``name`` over ``world`` ranks on ``nbytes``; None when never measured.

        A world size that was not measured is scaled from the nearest measured one with the ring algorithm's
        cost (Thakur, Rabenseifner & Gropp 2005; NCCL's "bus bandwidth"): the latency part (the smallest
        measured time) grows with the ring's steps, ``w - 1``, the bandwidth part with ``(w - 1) / w``.
        """
        if world <= 1 or nbytes <= 0:
            return 0.0
        by_world = self.collectives.get(name)
        if not by_world:
            return None
        if world in by_world:
            return by_world[world].time(nbytes)
        w = min(by_world, key=lambda x: (abs(x - world), x))
        curve = by_world[w]
        t = curve.time(nbytes)
        lat = min(curve.seconds[0], t)
        steps = (world - 1) / (w - 1)
        share = ((world - 1) / world) / ((w - 1) / w)
        return lat * steps + (t - lat) * share

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "scope": self.scope,
            "p2p": self.p2p.to_dict(),
            "collectives": {
                name: {str(w): c.to_dict() for w, c in sorted(by_world.items())}
                for name, by_world in self.collectives.items()
            },
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "link") -> LinkCalibration:
        m = get_map(d, path, _E)
        if "p2p" not in m:
            raise _E(f"{path}.p2p: missing required field")
        raw = get_map(m.get("collectives", {}), f"{path}.collectives", _E)
        coll: dict[str, dict[int, Curve]] = {}
        for name, by_world in raw.items():
            cp = f"{path}.collectives.{name}"
            if name not in COLLECTIVES:
                raise _E(f"{cp}: unknown collective {name!r}; expected one of {', '.join(COLLECTIVES)}")
            coll[name] = {}
            for w, c in get_map(by_world, cp, _E).items():
                try:
                    wi = int(w)
                except (TypeError, ValueError):
                    raise _E(f"{cp}: world size {w!r} is not an integer") from None
                if wi < 2:
                    raise _E(f"{cp}: world size {w!r} must be >= 2")
                coll[name][wi] = Curve.from_dict(c, f"{cp}.{w}")
        try:
            return cls(
                backend=get_str(m, "backend", path, _E),
                scope=get_str(m, "scope", path, _E),
                p2p=Curve.from_dict(m["p2p"], f"{path}.p2p"),
                collectives=coll,
                source=get_str(m, "source", path, _E, ""),
            )
        except CalibrationError as e:
            if str(e).startswith(path):
                raise
            raise _E(f"{path}.{e}") from e


# ---------------------------------------------------------------------------------------------- file
@dataclass(frozen=True, slots=True)
class Calibration:
    """One ``distplan profile`` run: a device kind's compute and, optionally, its link (see
    [Note: calibration files]).

    Attributes:
        kind: the device kind the compute part describes (a catalogue name or the cluster's own kind).
        device: the compute part; None for a link-only calibration.
        link: the link part; None when the run had a single rank.
        meta: facts about the run (host, torch version, mode, seconds, date); strings and numbers.
    """

    kind: str
    device: DeviceCalibration | None = None
    link: LinkCalibration | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = CALIBRATION_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != CALIBRATION_SCHEMA_VERSION:
            raise _E(
                f"schema_version: {self.schema_version} is not supported (this distplan reads "
                f"{CALIBRATION_SCHEMA_VERSION})"
            )
        if not self.kind:
            raise _E("kind: must name the device kind that was measured")
        if self.device is None and self.link is None:
            raise _E("device: missing, and so is link (a calibration holds at least one of them)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "device": None if self.device is None else self.device.to_dict(),
            "link": None if self.link is None else self.link.to_dict(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "calibration") -> Calibration:
        m = get_map(d, path, _E)
        version = get_int(m, "schema_version", path, _E)
        if version != CALIBRATION_SCHEMA_VERSION:
            raise _E(
                f"{path}.schema_version: {version} is not supported (this distplan reads "
                f"{CALIBRATION_SCHEMA_VERSION}); run distplan profile again"
            )
        dev = m.get("device")
        link = m.get("link")
        meta = get_map(m.get("meta", {}), f"{path}.meta", _E)
        try:
            return cls(
                kind=get_str(m, "kind", path, _E),
                device=None if dev is None else DeviceCalibration.from_dict(dev, f"{path}.device"),
                link=None if link is None else LinkCalibration.from_dict(link, f"{path}.link"),
                meta=dict(meta),
            )
        except CalibrationError as e:
            if str(e).startswith(path):
                raise
            raise _E(f"{path}.{e}") from e

    def summary(self) -> dict[str, Any]:
        """Headline figures: throughput at the largest measured size per class (TFLOP/s, GB/s), the fixed
        costs (microseconds), the link's latency and bandwidth; for people, not for the cost model."""
        out: dict[str, Any] = {"kind": self.kind}
        d = self.device
        if d is not None:
            out["device"] = d.device_name
            out["threads"] = d.threads
            for p, t in d.matmul.items():
                out[f"matmul_{p}_tflops"] = t.fwd.rate(t.fwd.sizes[-1]) / 1e12
            for p, t in d.attention.items():
                out[f"attention_{p}_tflops"] = t.fwd.rate(t.fwd.sizes[-1]) / 1e12
            if d.stream is not None:
                out["weight_stream_gbyte_s"] = d.stream.fwd.rate(d.stream.fwd.sizes[-1]) / 1e9
            for c in ("elementwise", "norm"):
                if c in d.ops:
                    out[f"{c}_gbyte_s"] = d.ops[c].fwd.rate(d.ops[c].fwd.sizes[-1]) / 1e9
            if "elementwise" in d.ops:
                out["op_overhead_us"] = d.ops["elementwise"].fwd.seconds[0] * 1e6
            if "view" in d.ops:
                out["view_overhead_us"] = d.ops["view"].fwd.seconds[0] * 1e6
            out["microbatch_overhead_us"] = (d.microbatch_fwd_s + d.microbatch_bwd_s) * 1e6
            out["boundary_overhead_us"] = (d.boundary_fwd_s + d.boundary_bwd_s) * 1e6
            out["step_overhead_us"] = d.step_s * 1e6
            out["attention_kernel"] = d.attention_kernel
        lk = self.link
        if lk is not None:
            out["link"] = f"{lk.scope} over {lk.backend}"
            out["p2p_latency_us"] = lk.p2p.seconds[0] * 1e6
            out["p2p_gbyte_s"] = lk.p2p.rate(lk.p2p.sizes[-1]) / 1e9
            for w, curve in sorted(lk.collectives.get("all_reduce", {}).items()):
                out[f"all_reduce_{w}_latency_us"] = curve.seconds[0] * 1e6
        return out

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str, source: str = "calibration") -> Calibration:
        return cls.from_dict(load_json(text, CalibrationError, source))

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON (making the folder); raises :class:`CalibrationError` naming the
        file when it cannot be written."""
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(self.to_json(), encoding="utf-8")
        except OSError as e:
            raise CalibrationError(f"cannot write calibration file {str(p)!r}: {e.strerror}") from e

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file; every error names the file and the field."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise CalibrationError(f"cannot read calibration file {str(p)!r}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise CalibrationError(f"{p}: not a text file ({e.reason})") from e
        try:
            return cls.from_dict(load_json(text, CalibrationError, "calibration"))
        except CalibrationError as e:
            raise CalibrationError(f"{p}: {e}") from e
