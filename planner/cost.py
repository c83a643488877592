"""The cost model: compute, communication and memory of a pipeline stage on a device kind.

Everything the planner, the baselines, the brute-force tests and the simulator compare is priced here, so
they all agree by construction.

Compute (per node, per device kind, for a microbatch of ``b`` samples; the graph was traced at
``trace_batch`` samples and per-sample costs scale linearly)::

    fwd(node) = max(b * flops_per_sample / (peak[dtype] * efficiency * calibration),
                    (param_bytes + b * other_bytes_per_sample) / memory_bandwidth) + launch_overhead
    bwd(node) = the same with the backward FLOPs and twice the bytes (2 x launch overhead)

Communication: a cut sends ``cut_bytes(p) * b / trace_batch`` bytes per microbatch forward and the same
size of gradient backward, ``latency + bytes / bandwidth`` on the link used; the replicas of a stage send
in parallel over their own NVLink/PCIe links inside a host, but share the host's network link between
hosts (``streams`` transfers). Gradient all-reduce among ``d`` replicas (ring):
``2 (d-1)/d * grad_bytes / bw + 2 (d-1) * latency``.

Memory per device = parameters + gradients + optimizer state (:func:`state_bytes_per_param`) + the
activations of the microbatches the schedule keeps in flight (1F1B: stage ``s`` of ``S`` holds
``min(S - s, M)``; GPipe: ``M``). A stage's parameters are those its nodes read: a parameter read in several
stages (a tied embedding and output projection) is held, with its gradient and optimizer state, by every
one of them (see [Note: shared parameters] in ``distplan.graph``); each holder also all-reduces and steps it.

Shared parameters: after the last backward the ``h`` stages holding a copy of shared parameters ``p`` sum
their gradients (ring all-reduce, ``2 (h-1)/h * grad_bytes(p) / bw + 2 (h-1) * latency``, on the host
link when every holder of a replica sits on one host, else on the network shared by the ``dp`` replicas'
rings), before the data-parallel all-reduce. Parameters are priced in groups read at the same node
positions (``OpGraph.shared_params``); the lowering coalesces groups with the same holders into one
all-reduce, so the model may count a few latencies more than it pays.

Iteration time (:func:`iteration_time`), with stage ``s`` taking ``f_s``/``b_s`` per microbatch, sending
``c_s`` each way to stage ``s + 1``, and ``r_s`` for its all-reduces (shared parameters, then data
parallel) and optimizer step::

    1F1B:  sum_s (f_s + b_s + 2 c_s) + (M - 1) * max_s (f_s + b_s + 2 c_s) + max_s r_s
    GPipe: sum_s (f_s + b_s + 2 c_s) + (M - 1) * (max_s f_s + max_s b_s)   + max_s r_s

(fill and drain, then the steady state paced by the slowest stage). GPipe's forward and backward phases
are flow shops with transfer lags, for which this is exact. Under 1F1B each stage runs only one
microbatch ahead of the next, so a window of stages ``s..t`` paces the steady state at
``(sum T + 2 sum c) / (t - s + 1)`` (the cycle mean of the event graph), which approaches
``T + 2c`` in a long balanced pipeline; ``max_s (T_s + 2 c_s)`` bounds every window mean from above.
This closed form is the integer program's objective; ``distplan.planner.simulate`` replays the schedule
event by event and lands within a few percent below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distplan.cluster import Cluster, Link
from distplan.errors import PlanError
from distplan.graph import OpGraph, SharedParam, dtype_bytes

__all__ = [
    "CostModel",
    "CostOptions",
    "IterationCost",
    "StageCost",
    "iteration_time",
    "optimizer_bytes_per_param",
    "state_bytes_per_param",
]

_OPT_STATES = {"adam": 2, "adamw": 2, "sgd": 1}
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_MATMUL_WORDS = ("mm", "matmul", "linear", "conv", "attention", "baddbmm", "einsum")


@dataclass(frozen=True, slots=True)
class CostOptions:
    """Tunable constants of the cost model.

    Attributes:
        launch_overhead_s: fixed cost of one op's forward per microbatch (kernel launch, framework); it is
            what makes very small microbatches slow.
        bwd_bytes_factor: backward memory traffic as a multiple of the forward's.
    """

    launch_overhead_s: float = 4e-6
    bwd_bytes_factor: float = 2.0


def state_bytes_per_param(dtype: str, optimizer: str) -> int:
    """Bytes per parameter for weights + gradients + optimizer state.

    fp32: 4 + 4 + 4 per state; bf16/fp16 mixed precision: 2 + 2 + 4 (fp32 master) + 4 per state.
    Adam/AdamW keep 2 states, SGD (momentum) 1.
    """
    states = _OPT_STATES[optimizer]
    # Both come to the same count: mixed precision trades 4 bytes of fp32 weights and gradients for
    # 2 + 2 bytes of low-precision copies plus a 4-byte fp32 master copy.
    return (4 + 4 if dtype == "fp32" else 2 + 2 + 4) + 4 * states


def optimizer_bytes_per_param(dtype: str, optimizer: str) -> int:
    """Memory traffic of one optimizer step per parameter (read weights, grads, states; write weights,
    states; mixed precision also writes the low-precision copy)."""
    states = _OPT_STATES[optimizer]
    fp32 = 4 * (2 + states) + 4 * (1 + states)
    return fp32 if dtype == "fp32" else fp32 + 2


@dataclass(frozen=True, slots=True)
class StageCost:
    """Predicted costs of one stage (per replica).

    ``param_bytes`` counts every parameter the stage holds (copies of shared ones included);
    ``shared_param_bytes`` the part other stages of the layout hold too, and ``tied_allreduce_s`` the time
    to sum those gradients with them (both 0 until the whole layout is known, see ``evaluate.layout_cost``).
    """

    fwd_s: float
    bwd_s: float
    send_s: float
    allreduce_s: float
    optimizer_s: float
    memory_bytes: int
    param_bytes: int
    inflight: int
    shared_param_bytes: int = 0
    tied_allreduce_s: float = 0.0


@dataclass(frozen=True, slots=True)
class IterationCost:
    iteration_time_s: float
    bubble_fraction: float


def iteration_time(stages: Sequence[StageCost], *, schedule: str, microbatches: int) -> IterationCost:
    """The closed-form iteration time (see module docstring) and the resulting bubble fraction."""
    m = microbatches
    fill = sum(s.fwd_s + s.bwd_s + 2 * s.send_s for s in stages)
    if schedule == "gpipe":
        steady = (m - 1) * (max(s.fwd_s for s in stages) + max(s.bwd_s for s in stages))
    elif schedule == "1f1b":
        steady = (m - 1) * max(s.fwd_s + s.bwd_s + 2 * s.send_s for s in stages)
    else:
        raise PlanError(f"the planner's cost model supports schedules gpipe and 1f1b, not {schedule!r}")
    tail = max(s.tied_allreduce_s + s.allreduce_s + s.optimizer_s for s in stages)
    total = fill + steady + tail
    busy = sum(m * (s.fwd_s + s.bwd_s) + s.tied_allreduce_s + s.allreduce_s + s.optimizer_s for s in stages)
    bubble = 1.0 - busy / (len(stages) * total) if total > 0 else 0.0
    return IterationCost(total, max(0.0, bubble))


def _op_class(target: str) -> str:
    t = target.lower()
    return "matmul" if any(w in t for w in _MATMUL_WORDS) else "elementwise"


class CostModel:
    """Prices node ranges of one graph on the device kinds of one cluster (see module docstring).

    Node ranges are half-open position ranges ``[start, end)`` of the graph (see ``OpGraph``).
    """

    def __init__(
        self,
        graph: OpGraph,
        cluster: Cluster,
        *,
        dtype: str = "fp32",
        optimizer: str = "adam",
        options: CostOptions | None = None,
    ) -> None:
        if dtype not in _COMPUTE_BYTES:
            raise PlanError(f"dtype must be one of {', '.join(_COMPUTE_BYTES)}, got {dtype!r}")
        if optimizer not in _OPT_STATES:
            raise PlanError(f"optimizer must be one of {', '.join(_OPT_STATES)}, got {optimizer!r}")
        self.graph = graph
        self.cluster = cluster
        self.dtype = dtype
        self.optimizer = optimizer
        self.options = options or CostOptions()
        self.trace_batch = _trace_batch(graph)
        nodes = graph.nodes
        self.n = len(nodes)
        self.param_elem_bytes = dtype_bytes(graph.param_dtype)
        # Activations and cut tensors shrink with a narrower compute dtype than the traced one.
        self.act_scale = _COMPUTE_BYTES[dtype] / self.param_elem_bytes
        tb = float(self.trace_batch)
        self._fwd_flops = np.array([n.fwd_flops for n in nodes], dtype=np.float64) / tb
        self._bwd_flops = (
            np.array(
                [n.bwd_flops if n.bwd_flops or not n.fwd_flops else 2 * n.fwd_flops for n in nodes],
                dtype=np.float64,
            )
            / tb
        )
        pbytes = np.array([n.param_bytes for n in nodes], dtype=np.float64)
        moved = np.array([n.bytes_moved for n in nodes], dtype=np.float64)
        self._param_read = pbytes * self.act_scale
        self._other_bytes = np.maximum(moved - pbytes, 0.0) / tb * self.act_scale
        self._is_op = np.array(
            [n.op != "placeholder" and (n.fwd_flops > 0 or n.bytes_moved > 0) for n in nodes],
            dtype=np.float64,
        )
        self._matmul = np.array([_op_class(n.target) == "matmul" for n in nodes], dtype=bool)
        self.param_prefix = np.concatenate([[0], np.cumsum([n.param_bytes for n in nodes])]).astype(np.int64)
        # Parameters read in several places: param_prefix charges them to their first reader, every other
        # stage reading them holds a copy on top (see the module docstring).
        self.shared: tuple[SharedParam, ...] = graph.shared_params()
        act = np.array([n.activation_bytes for n in nodes], dtype=np.float64) / tb * self.act_scale
        self.act_prefix = np.concatenate([[0.0], np.cumsum(act)])
        cut = np.array(graph.cut_costs(), dtype=np.float64) / tb * self.act_scale
        cut[0] = 0.0
        cut[-1] = 0.0
        self.cut_per_sample = cut
        self.state_per_param = state_bytes_per_param(dtype, optimizer)
        self.opt_traffic_per_param = optimizer_bytes_per_param(dtype, optimizer)
        self.grad_bytes_per_param = _COMPUTE_BYTES[dtype]
        self._prefix_cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ compute
    def time_prefix(self, kind: str, microbatch: int) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums (length ``n + 1``) of forward and backward seconds per microbatch of ``microbatch``
        samples on one device of ``kind``: a range costs ``prefix[end] - prefix[start]``."""
        key = (kind, microbatch)
        hit = self._prefix_cache.get(key)
        if hit is not None:
            return hit
        k = self.cluster.kinds[kind]
        peak = k.flops(self.dtype) * k.efficiency
        cal_mm = k.calibration.get("matmul", k.calibration.get("default", 1.0))
        cal_el = k.calibration.get("elementwise", k.calibration.get("default", 1.0))
        cal = np.where(self._matmul, cal_mm, cal_el)
        bw = k.memory_bandwidth_bytes_s
        b = float(microbatch)
        mem_f = (self._param_read + b * self._other_bytes) / bw
        lo = self.options.launch_overhead_s * self._is_op
        fwd = np.maximum(b * self._fwd_flops / peak * cal, mem_f) + lo
        bwd = np.maximum(b * self._bwd_flops / peak * cal, self.options.bwd_bytes_factor * mem_f) + 2 * lo
        out = (np.concatenate([[0.0], np.cumsum(fwd)]), np.concatenate([[0.0], np.cumsum(bwd)]))
        self._prefix_cache[key] = out
        return out

    def compute_time(self, start: int, end: int, kind: str, microbatch: int) -> tuple[float, float]:
        """Forward and backward seconds of nodes ``[start, end)`` for one microbatch on one ``kind``."""
        f, b = self.time_prefix(kind, microbatch)
        return float(f[end] - f[start]), float(b[end] - b[start])

    # ------------------------------------------------------------------ memory
    def held_shared(self, start: int, end: int) -> list[int]:
        """Indices into ``self.shared`` of the shared parameter groups nodes ``[start, end)`` read."""
        return [i for i, sp in enumerate(self.shared) if any(start <= p < end for p in sp.positions)]

    def shared_extra_bytes(self, start: int, end: int) -> int:
        """Bytes of the shared parameters nodes ``[start, end)`` read although their first reader comes
        before ``start``: the copies a stage over that range holds beyond ``param_prefix``."""
        return sum(
            sp.nbytes
            for sp in self.shared
            if sp.positions[0] < start and any(start <= p < end for p in sp.positions)
        )

    def param_bytes(self, start: int, end: int) -> int:
        """Bytes of every parameter nodes ``[start, end)`` own or read (shared ones included, once)."""
        return int(self.param_prefix[end] - self.param_prefix[start]) + self.shared_extra_bytes(start, end)

    def state_bytes(self, param_bytes: float) -> float:
        """Weights + gradients + optimizer state for ``param_bytes`` of traced parameters."""
        return param_bytes / self.param_elem_bytes * self.state_per_param

    def activation_bytes(self, start: int, end: int, microbatch: int) -> float:
        """Activation bytes one microbatch leaves for the backward of nodes ``[start, end)``."""
        return float(self.act_prefix[end] - self.act_prefix[start]) * microbatch

    def stage_memory(self, start: int, end: int, *, microbatch: int, inflight: int) -> int:
        """Peak bytes per device of a stage holding ``inflight`` microbatches' activations."""
        return int(
            np.ceil(
                self.state_bytes(self.param_bytes(start, end))
                + inflight * self.activation_bytes(start, end, microbatch)
            )
        )

    # ------------------------------------------------------------------ communication
    def cut_bytes(self, position: int, microbatch: int) -> float:
        """Bytes a cut at ``position`` sends per microbatch (0 at the graph's ends)."""
        return float(self.cut_per_sample[position]) * microbatch

    def send_time(self, position: int, microbatch: int, *, link: Link, streams: int = 1) -> float:
        """Seconds to send one microbatch's activations across a cut at ``position``; ``streams`` parallel
        transfers share ``link``."""
        nbytes = self.cut_bytes(position, microbatch)
        return link.latency_s + streams * nbytes / link.bandwidth_bytes_s if nbytes > 0 else 0.0

    def allreduce_time(self, param_bytes: float, *, dp: int, link: Link, streams: int = 1) -> float:
        """Ring all-reduce of the gradients of ``param_bytes`` traced parameters among ``dp`` ranks;
        ``streams`` such rings share ``link``."""
        if dp <= 1:
            return 0.0
        grad = param_bytes / self.param_elem_bytes * self.grad_bytes_per_param
        return 2 * (dp - 1) / dp * streams * grad / link.bandwidth_bytes_s + 2 * (dp - 1) * link.latency_s

    def optimizer_time(self, param_bytes: float, kind: str) -> float:
        """One optimizer step over ``param_bytes`` of traced parameters (memory-bound)."""
        n = param_bytes / self.param_elem_bytes
        return n * self.opt_traffic_per_param / self.cluster.kinds[kind].memory_bandwidth_bytes_s

    # ------------------------------------------------------------------ stages
    def stage_cost(
        self,
        start: int,
        end: int,
        *,
        kind: str,
        microbatch: int,
        inflight: int,
        dp: int,
        allreduce_link: Link,
        send_link: Link | None,
        send_streams: int = 1,
    ) -> StageCost:
        """All predicted costs of one stage (``send_link`` None for the last stage)."""
        f, b = self.compute_time(start, end, kind, microbatch)
        pbytes = self.param_bytes(start, end)
        send = 0.0
        if send_link is not None:
            send = self.send_time(end, microbatch, link=send_link, streams=send_streams)
        return StageCost(
            fwd_s=f,
            bwd_s=b,
            send_s=send,
            allreduce_s=self.allreduce_time(pbytes, dp=dp, link=allreduce_link),
            optimizer_s=self.optimizer_time(pbytes, kind),
            memory_bytes=self.stage_memory(start, end, microbatch=microbatch, inflight=inflight),
            param_bytes=pbytes,
            inflight=inflight,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "nodes": self.n,
            "trace_batch": self.trace_batch,
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "state_bytes_per_param": self.state_per_param,
        }


def inflight_microbatches(schedule: str, *, stage: int, num_stages: int, microbatches: int) -> int:
    """Microbatches whose activations a stage holds at its peak (1F1B: ``min(S - s, M)``; GPipe: ``M``)."""
    if schedule == "gpipe":
        return microbatches
    return min(num_stages - stage, microbatches)


def _trace_batch(graph: OpGraph) -> int:
    b = graph.meta.get("batch", 1)
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise PlanError(f"graph {graph.name!r}: meta.batch must be a positive integer, got {b!r}")
    return b
