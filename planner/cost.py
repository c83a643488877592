"""The cost model: compute, communication and memory of a pipeline stage on a device kind.

Everything the planner, the baselines, the brute-force tests and the simulator compare is priced here, so
they all agree by construction.

Compute (per node, per device kind, for a microbatch of ``b`` samples; the graph was traced at
``trace_batch`` samples and per-sample costs scale linearly), from the datasheet::

    fwd(node) = max(b * flops_per_sample / (peak[precision] * efficiency),
                    (param_bytes + b * other_bytes_per_sample) / memory_bandwidth) + launch_overhead
    bwd(node) = the same with the backward FLOPs and twice the bytes (2 x launch overhead)

where ``peak[precision]`` is the kind's peak at the plan's matmul precision for matmul-class nodes (fp32,
TF32, bf16/fp16 autocast; ``PlanRequest.precision``) and at the dtype's for the others.

[Note: calibrated pricing]
A kind with measured figures (``DeviceKind.calibration``, from ``distplan profile``) is priced by what the
runtime was measured to do instead, op class by op class (``distplan.calibration.op_class``), each node's
time read off its class's curve at its size, or its operator's own curve for the operators a calibration
measures one by one (``DeviceCalibration.targets``: tanh, exp, reductions, ...; interpolated, see [Note:
curves] there):

    fwd(node) = curve[class].fwd(size(node, b)),  matmuls at least stream.fwd(bytes) (weights read from
                memory bound small-batch matmuls)
    bwd(node) = curve[class].bwd(...) for nodes on the gradient's path (reading a trainable parameter or
                an input that is), 0 for the rest (index arithmetic, masks)

Python-level nodes (``getitem``) and inputs cost nothing. What the pipeline runtime adds is priced too:
the fixed cost of each microbatch's forward and backward on a stage, the loss on the last stage
(cross-entropy over the outputs of a causal LM, mean squared error otherwise; the runtime scales the loss,
not the gradients, by ``1 / M``), the gradient synchronisation as the runner does it (concatenate,
all-reduce, copy back) and the optimizer step per parameter tensor. A class
or precision the calibration lacks falls back to the datasheet formula for those nodes; the plan's
``predictions.figures`` says which figures were measured. The integer program sees the per-node part and
the per-tensor optimizer costs; the per-stage fixed costs are added when the chosen layout is priced.

Attention: a kind whose attention kernel is not fused (``DeviceKind.fused_attention``; measured when
calibrated) keeps each attention's ``heads x seq x seq`` probabilities for the backward, which is added to
the activation memory of its nodes, and moves the score matrix through memory (about 4 passes forward, 6
backward) on top of the datasheet time.

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

from distplan.calibration import OP_CLASSES, Curve, DeviceCalibration, op_class
from distplan.cluster import Cluster, Link
from distplan.errors import PlanError
from distplan.graph import OpGraph, SharedParam, dtype_bytes
from distplan.plan import check_precision

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
#: Score-matrix passes through memory of a non-fused attention (forward, backward; see module docstring).
_MATH_ATTENTION_PASSES = (4.0, 6.0)


def _curve_times(curve: Curve, sizes: np.ndarray) -> np.ndarray:
    """``curve.time`` at every size, vectorised (same interpolation as ``Curve.time``)."""
    xs = np.log(np.asarray(curve.sizes, dtype=np.float64))
    ts = np.log(np.asarray(curve.seconds, dtype=np.float64))
    x = np.log(np.maximum(sizes, curve.sizes[0]))
    inside = np.exp(np.interp(x, xs, ts))
    above = curve.seconds[-1] * sizes / curve.sizes[-1]
    return np.where(sizes > curve.sizes[-1], above, inside)


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
        matmul_precision: str | None = None,
    ) -> None:
        if dtype not in _COMPUTE_BYTES:
            raise PlanError(f"dtype must be one of {', '.join(_COMPUTE_BYTES)}, got {dtype!r}")
        if optimizer not in _OPT_STATES:
            raise PlanError(f"optimizer must be one of {', '.join(_OPT_STATES)}, got {optimizer!r}")
        check_precision(dtype, matmul_precision)
        self.graph = graph
        self.cluster = cluster
        self.dtype = dtype
        self.precision = matmul_precision or dtype
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
        # How many tensors cross each cut: the runtime sends each one on its own (one latency each).
        diff = np.zeros(self.n + 2, dtype=np.int64)
        for i, last in enumerate(graph.last_uses()):
            if last > i and nodes[i].output_bytes > 0:
                diff[i + 1] += 1
                diff[last + 1] -= 1
        self.cut_tensors = np.cumsum(diff)[: self.n + 1]
        self.state_per_param = state_bytes_per_param(dtype, optimizer)
        self.opt_traffic_per_param = optimizer_bytes_per_param(dtype, optimizer)
        self.grad_bytes_per_param = _COMPUTE_BYTES[dtype]
        self._prefix_cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._init_calibrated(graph, tb)

    def _init_calibrated(self, graph: OpGraph, tb: float) -> None:
        """Per-node facts the calibrated pricing and the attention memory need (see [Note: calibrated
        pricing])."""
        nodes = graph.nodes
        self._class = np.array(
            [op_class(n.target, fwd_flops=n.fwd_flops, bytes_moved=n.bytes_moved) for n in nodes],
            dtype=object,
        )
        self._target = np.array([n.target for n in nodes], dtype=object)
        # Inputs and Python-level nodes (getitem on a tuple) run no op.
        self._free = np.array(
            [n.op == "placeholder" or n.target.startswith("_operator.") for n in nodes], dtype=bool
        )
        self._out_bytes = np.array([n.output_bytes for n in nodes], dtype=np.float64) / tb * self.act_scale
        sizes = graph.param_sizes
        index = graph.index()
        grad = [False] * len(nodes)
        for i, n in enumerate(nodes):
            if self._free[i] and n.op == "placeholder":
                continue
            reads = any(p in sizes for p in n.params) if sizes is not None else bool(n.params)
            grad[i] = reads or any(grad[index[x]] for x in n.inputs if x in index)
        self._grad = np.array(grad, dtype=bool)
        # Trainable tensors each node is the first reader of (their bytes, as traced): the optimizer and the
        # gradient passes of the runner work tensor by tensor.
        first: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for p in n.params:
                if sizes is not None and p in sizes:
                    first.setdefault(p, i)
        self._tensors: list[list[float]] = [[] for _ in nodes]
        if sizes is not None:
            for p, i in first.items():
                self._tensors[i].append(float(sizes[p]))
        else:  # no table: each node's parameters as one tensor
            for i, n in enumerate(nodes):
                if n.param_bytes:
                    self._tensors[i].append(float(n.param_bytes))
        self._sizes = dict(sizes or {})
        # The loss reads the graph's outputs (per sample, compute dtype).
        outs = [index[o] for o in graph.outputs if o in index]
        self._loss_bytes = float(sum(nodes[i].output_bytes for i in outs)) / tb * self.act_scale
        self._causal_lm = graph.meta.get("kind") == "causal-lm"
        # Attention score elements per sample (heads x queries x keys), for kinds that store them.
        scores = np.zeros(len(nodes), dtype=np.float64)
        for i, n in enumerate(nodes):
            if self._class[i] == "attention" and n.outputs and len(n.inputs) >= 2 and n.inputs[1] in index:
                q = n.outputs[0].shape
                k_outs = nodes[index[n.inputs[1]]].outputs
                if len(q) >= 3 and k_outs and len(k_outs[0].shape) >= 2:
                    heads = q[-3] if len(q) >= 4 else 1
                    scores[i] = q[0] * heads * q[-2] * k_outs[0].shape[-2] / tb
        self._score_elems = scores
        self._opt_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def device_calibration(self, kind: str) -> DeviceCalibration | None:
        """The measured figures of ``kind``, if any."""
        return self.cluster.kinds[kind].calibration

    def act_prefix_of(self, kind: str) -> np.ndarray:
        """:attr:`act_prefix` on ``kind``: plus the stored attention probabilities where its attention is not
        fused (see module docstring)."""
        k = self.cluster.kinds[kind]
        if k.fused_attention or not self._score_elems.any():
            return self.act_prefix
        extra = self._score_elems * _COMPUTE_BYTES[self.dtype]
        return self.act_prefix + np.concatenate([[0.0], np.cumsum(extra)])

    @property
    def act_prefix_max(self) -> np.ndarray:
        """The largest activation prefix over the cluster's kinds (what the integer program budgets)."""
        out = self.act_prefix
        for name in self.cluster.kinds:
            a = self.act_prefix_of(name)
            if a is not self.act_prefix:
                out = np.maximum(out, a)
        return out

    # ------------------------------------------------------------------ compute
    def time_prefix(self, kind: str, microbatch: int) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums (length ``n + 1``) of forward and backward seconds per microbatch of ``microbatch``
        samples on one device of ``kind``: a range costs ``prefix[end] - prefix[start]``."""
        key = (kind, microbatch)
        hit = self._prefix_cache.get(key)
        if hit is not None:
            return hit
        k = self.cluster.kinds[kind]
        peak = np.where(self._matmul, k.flops(self.precision), k.flops(self.dtype)) * k.efficiency
        bw = k.memory_bandwidth_bytes_s
        b = float(microbatch)
        mem_f = (self._param_read + b * self._other_bytes) / bw
        lo = self.options.launch_overhead_s * self._is_op
        fwd = np.maximum(b * self._fwd_flops / peak, mem_f) + lo
        bwd = np.maximum(b * self._bwd_flops / peak, self.options.bwd_bytes_factor * mem_f) + 2 * lo
        if not k.fused_attention:
            score_bytes = b * self._score_elems * _COMPUTE_BYTES[self.dtype] / bw
            fwd = fwd + _MATH_ATTENTION_PASSES[0] * score_bytes
            bwd = bwd + _MATH_ATTENTION_PASSES[1] * score_bytes
        if k.calibration is not None:
            fwd, bwd = self._calibrated_times(k.calibration, b, fwd, bwd)
        out = (np.concatenate([[0.0], np.cumsum(fwd)]), np.concatenate([[0.0], np.cumsum(bwd)]))
        self._prefix_cache[key] = out
        return out

    def _calibrated_times(
        self, cal: DeviceCalibration, b: float, ds_fwd: np.ndarray, ds_bwd: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-node forward and backward seconds from measured curves (see [Note: calibrated pricing]);
        nodes of a class the calibration lacks keep their datasheet times ``ds_fwd`` / ``ds_bwd``."""
        fwd = ds_fwd.copy()
        bwd = ds_bwd.copy()
        flops = b * self._fwd_flops
        moved = self._param_read + b * self._other_bytes
        for cls in OP_CLASSES:
            mask = self._class == cls
            if not mask.any():
                continue
            times = cal.op_times(cls, self.precision)
            if times is None:
                continue
            if cls in ("matmul", "attention"):
                kf = kb = flops[mask]
            elif cls == "embedding":  # gathers rows forward; writes a table-sized gradient backward
                kf, kb = b * self._out_bytes[mask], moved[mask]
            elif cls == "view":
                kf = kb = np.ones(int(mask.sum()))
            else:
                kf = kb = moved[mask]
            f = _curve_times(times.fwd, kf)
            bw = _curve_times(times.bwd, kb)
            if cls == "matmul" and cal.stream is not None:
                f = np.maximum(f, _curve_times(cal.stream.fwd, moved[mask]))
                bw = np.maximum(bw, _curve_times(cal.stream.bwd, moved[mask]))
            fwd[mask] = f
            bwd[mask] = bw
        # Operators measured one by one (DeviceCalibration.targets) are priced by their own curves.
        memory_bound = (self._class == "elementwise") | (self._class == "norm")
        for name, own in cal.targets.items():
            mask = memory_bound & (self._target == name)
            if mask.any():
                fwd[mask] = _curve_times(own.fwd, moved[mask])
                bwd[mask] = _curve_times(own.bwd, moved[mask])
        fwd[self._free] = 0.0
        bwd[self._free | ~self._grad] = 0.0
        # The loss runs on the last stage after the graph's outputs: charge it to the last node.
        lf, lb = self._loss_times(cal, b)
        fwd[-1] += lf
        bwd[-1] += lb
        return fwd, bwd

    def _loss_times(self, cal: DeviceCalibration, b: float) -> tuple[float, float]:
        """Forward and backward seconds of the runner's loss on one microbatch's outputs: cross-entropy
        (log-softmax, a normalisation over both reads and writes, then a gather) for causal LMs, mean squared
        error (subtract, square, mean) otherwise."""
        nbytes = b * self._loss_bytes
        norm, elem = cal.ops.get("norm"), cal.ops.get("elementwise")
        if nbytes <= 0 or norm is None or elem is None:
            return 0.0, 0.0
        if self._causal_lm:
            return (
                norm.fwd.time(2 * nbytes) + elem.fwd.time(nbytes),
                norm.bwd.time(2 * nbytes) + elem.bwd.time(nbytes),
            )
        return 3 * elem.fwd.time(2 * nbytes), 3 * elem.bwd.time(2 * nbytes)

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

    def activation_bytes(self, start: int, end: int, microbatch: int, kind: str | None = None) -> float:
        """Activation bytes one microbatch leaves for the backward of nodes ``[start, end)`` (on ``kind``,
        whose attention kernel may store more; see :meth:`act_prefix_of`)."""
        act = self.act_prefix if kind is None else self.act_prefix_of(kind)
        return float(act[end] - act[start]) * microbatch

    def stage_memory(
        self, start: int, end: int, *, microbatch: int, inflight: int, kind: str | None = None
    ) -> int:
        """Peak bytes per device of a stage holding ``inflight`` microbatches' activations."""
        return int(
            np.ceil(
                self.state_bytes(self.param_bytes(start, end))
                + inflight * self.activation_bytes(start, end, microbatch, kind)
            )
        )

    # ------------------------------------------------------------------ communication
    def cut_bytes(self, position: int, microbatch: int) -> float:
        """Bytes a cut at ``position`` sends per microbatch (0 at the graph's ends)."""
        return float(self.cut_per_sample[position]) * microbatch

    def send_time(self, position: int, microbatch: int, *, link: Link, streams: int = 1) -> float:
        """Seconds to send one microbatch's activations across a cut at ``position``; ``streams`` parallel
        transfers share ``link`` (measured send times of a calibrated link, at the bytes all streams move)."""
        nbytes = self.cut_bytes(position, microbatch)
        if nbytes <= 0:
            return 0.0
        if link.calibration is not None:
            # One transfer per crossing tensor, at the measured time of its share of the bytes.
            count = max(1, int(self.cut_tensors[position]))
            return count * link.calibration.send_time(streams * nbytes / count)
        return link.latency_s + streams * nbytes / link.bandwidth_bytes_s

    def allreduce_time(self, param_bytes: float, *, dp: int, link: Link, streams: int = 1) -> float:
        """Ring all-reduce of the gradients of ``param_bytes`` traced parameters among ``dp`` ranks;
        ``streams`` such rings share ``link`` (a calibrated link: its measured all-reduce)."""
        if dp <= 1:
            return 0.0
        grad = param_bytes / self.param_elem_bytes * self.grad_bytes_per_param
        if link.calibration is not None:
            t = link.calibration.collective_time("all_reduce", streams * grad, dp)
            if t is not None:
                return t
        return 2 * (dp - 1) / dp * streams * grad / link.bandwidth_bytes_s + 2 * (dp - 1) * link.latency_s

    def allreduce_latency(self, *, dp: int, link: Link) -> float:
        """The size-independent part of :meth:`allreduce_time` (the integer program keeps it apart)."""
        if dp <= 1:
            return 0.0
        if link.calibration is not None:
            t = link.calibration.collective_time("all_reduce", 1.0, dp)
            if t is not None:
                return t
        return 2 * (dp - 1) * link.latency_s

    def _tensor_prefix(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-node prefix sums over the trainable tensors each node first reads, on a calibrated ``kind``:
        (optimizer step seconds, seconds of one elementwise pass over their gradients)."""
        hit = self._opt_cache.get(kind)
        if hit is not None:
            return hit
        cal = self.cluster.kinds[kind].calibration
        assert cal is not None
        opt = cal.optimizer.get(self.optimizer)
        elem = cal.ops.get("elementwise")
        per_opt = np.zeros(self.n)
        per_pass = np.zeros(self.n)
        for i, tensors in enumerate(self._tensors):
            for nbytes in tensors:
                per_opt[i] += (
                    opt.time(nbytes) if opt is not None else self.optimizer_time_datasheet(nbytes, kind)
                )
                grad = nbytes / self.param_elem_bytes * self.grad_bytes_per_param
                per_pass[i] += elem.fwd.time(2 * grad) if elem is not None else 0.0
        out = (np.concatenate([[0.0], np.cumsum(per_opt)]), np.concatenate([[0.0], np.cumsum(per_pass)]))
        self._opt_cache[kind] = out
        return out

    def optimizer_time_datasheet(self, param_bytes: float, kind: str) -> float:
        """One optimizer step over ``param_bytes`` of traced parameters, memory-bound at the datasheet
        bandwidth."""
        n = param_bytes / self.param_elem_bytes
        return n * self.opt_traffic_per_param / self.cluster.kinds[kind].memory_bandwidth_bytes_s

    def optimizer_time(self, param_bytes: float, kind: str) -> float:
        """One optimizer step over ``param_bytes`` of traced parameters: memory-bound at the datasheet
        bandwidth, or on a calibrated kind at the model's measured average per byte (linear in bytes, as the
        integer program needs; a stage's own tensors are priced one by one in :meth:`stage_cost`)."""
        if self.cluster.kinds[kind].calibration is None or self.param_prefix[-1] <= 0:
            return self.optimizer_time_datasheet(param_bytes, kind)
        opt, _ = self._tensor_prefix(kind)
        return param_bytes * float(opt[-1]) / float(self.param_prefix[-1])

    def _shared_extra_tensors(self, start: int, end: int) -> list[float]:
        """Bytes of each shared tensor nodes ``[start, end)`` hold a copy of beyond ``param_prefix``."""
        out: list[float] = []
        for sp in self.shared:
            if sp.positions[0] < start and any(start <= p < end for p in sp.positions):
                out.extend(float(self._sizes.get(name, sp.nbytes / len(sp.names))) for name in sp.names)
        return out

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
        allreduce = self.allreduce_time(pbytes, dp=dp, link=allreduce_link)
        cal = self.cluster.kinds[kind].calibration
        if cal is None:
            optimizer = self.optimizer_time(pbytes, kind)
        else:
            # What the runtime does per stage (see [Note: calibrated pricing]).
            f += cal.microbatch_fwd_s
            b += cal.microbatch_bwd_s
            opt, passes = self._tensor_prefix(kind)
            extra = self._shared_extra_tensors(start, end)
            optimizer = float(opt[end] - opt[start]) + sum(self.optimizer_time(x, kind) for x in extra)
            one_pass = float(passes[end] - passes[start])
            elem = cal.ops.get("elementwise")
            if elem is not None and dp > 1:
                # The runner concatenates the gradients, all-reduces the buffer and copies each gradient
                # back (lowering.sharding.coalesced_all_reduce); the loss is summed over the replicas too.
                grad = pbytes / self.param_elem_bytes * self.grad_bytes_per_param
                one_pass += sum(elem.fwd.time(2 * x) for x in extra)
                allreduce += elem.fwd.time(2 * grad) + one_pass
                if end == self.n:
                    allreduce += self.allreduce_time(self.param_elem_bytes, dp=dp, link=allreduce_link)
        return StageCost(
            fwd_s=f,
            bwd_s=b,
            send_s=send,
            allreduce_s=allreduce,
            optimizer_s=optimizer,
            memory_bytes=self.stage_memory(start, end, microbatch=microbatch, inflight=inflight, kind=kind),
            param_bytes=pbytes,
            inflight=inflight,
        )

    def figures(self) -> dict[str, str]:
        """Where this model's figures come from (``Cluster.calibration_report``), with the matmul precision
        a calibrated kind was not measured at marked as datasheet."""
        out = self.cluster.calibration_report()
        for name, k in self.cluster.kinds.items():
            cal = k.calibration
            if cal is not None and self.precision not in cal.matmul:
                out[f"kind {name}"] += f"; matmul at {self.precision}: datasheet (not measured)"
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "nodes": self.n,
            "trace_batch": self.trace_batch,
            "dtype": self.dtype,
            "matmul_precision": self.precision,
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
