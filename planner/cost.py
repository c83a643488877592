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
                memory bound small-batch matmuls); a linear of fewer rows (tokens x samples) than the largest
                count of ``row_matmul`` instead reads the few-row curves at its weight bytes, interpolated
                geometrically in the row count between the two measured counts around it (``stream`` is
                the one-row member)
                + in_graph per node + in_graph per output byte (what an op costs inside a model beyond its
                time alone: inputs no longer hot in the cache, output in fresh memory; fitted on a
                reference model, see ``distplan.profiler.reference``)
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

Communication: see [Note: transfers]. Collectives (all-reduce, reduce-scatter, all-gather) are rings: among
``w`` ranks each sends ``2 (w-1)/w`` (all-reduce) or ``(w-1)/w`` of the payload, ``latency`` per ring step
(:meth:`CostModel.collective_time`; a calibrated link: its measured collective).

[Note: transfers]
A cut between a stage of ``(dp_a, tp_a)`` and the next of ``(dp_b, tp_b)`` moves the microbatch as the
lowering does (``distplan.lowering.parallel``, [Note: chunks] and [Note: tensor-parallel lanes]): in
``lcm(dp_a, dp_b)`` chunks, each from the replica of ``a`` that owns it to the replica of ``b`` that owns it,
one whole copy for every tensor-parallel rank of the receiver (forward, from sender rank ``t % tp_a``) and of
every gradient for every rank of the sender (backward). Inside a host every device has its own link and the
busiest device paces the transfer (:func:`boundary_rows`: forward ``max(ceil(tp_b / tp_a) / dp_a, 1 / dp_b)``
of the microbatch); between hosts every copy shares the network (``tp_b`` microbatches forward, ``tp_a``
backward). Each direction costs ``latency + bytes / bandwidth``; a calibrated link sends each crossing tensor
on its own. With one degree everywhere this is the classic ``b / dp`` per replica pair.

[Note: stage configurations]
A stage runs as a :class:`~distplan.planner.parallelism.StageConfig` (``dp`` replicas of ``tp`` ranks,
recomputation, sharding); :class:`~distplan.planner.parallelism.ParallelFacts` reads from the graph what each
changes:

- *Tensor parallelism* (Megatron-LM, Shoeybi et al. 2019): the split nodes of every region a stage holds
  whole and whose degrees contain ``tp`` do ``1 / tp`` of their FLOPs and memory traffic; their parameters
  and split activations divide by ``tp``; each region's collectives (per microbatch, on the link the group
  sits on: one host) run forward and backward; replicated parameters with partial gradients are all-reduced
  over the group once per step. Shared (tied) parameters are priced whole on every rank.
- *Data parallelism*: a replica computes ``b / dp`` rows; its own parameters' gradients are all-reduced over
  the ``dp`` replicas of each tensor-parallel rank once per step (shared ones over every rank holding them,
  see below).
- *Sharding* (ZeRO, Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", Figure 1 and section 5: per device ``(2 + 2 + K) Psi`` for weights, gradients and ``K`` bytes of
  optimizer state per parameter, ``2 Psi + 2 Psi + K Psi / N`` under P_os, ``2 Psi + (2 + K) Psi / N`` under
  P_os+g, ``(2 + 2 + K) Psi / N`` under P_os+g+p). ``optimizer`` (ZeRO-1): the optimizer state of the
  stage's own parameters divides over the ``dp`` replicas, and FSDP2 keeps each device's ``1 / dp`` shard of
  the weights beside the gathered ones; gradients are reduce-scattered once and the weights all-gathered once
  (the two halves of a ring all-reduce), and the optimizer steps ``1 / dp`` of them. ``optimizer+gradients``
  and ``full``: the lowering shards a stage as one FSDP2 unit (``distplan.lowering.sharding``), so while a
  microbatch's backward runs the stage's whole gradient (and under ``full`` its gathered weights) are held
  anyway: the table's ``1 / N`` holds only between units, which per stage means no saving at the peak. They
  are priced so -- ZeRO-1's memory plus the gradient shard, a reduce-scatter after every microbatch's backward
  and, for ``full``, an all-gather before every forward and backward -- and so never beat ZeRO-1 here
  (the integer data drops them; ``distplan.planner.problem``). Shared parameters are never sharded.
- *Recomputation* (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"):
  ``full`` keeps only the stage's input per in-flight microbatch and one microbatch's activations while its
  backward recomputes the forward (one more forward per microbatch); ``selective`` drops what the attention
  cores keep beyond their inputs and outputs (the probabilities; a kind without a fused kernel stores the
  scores) and runs their forward again, holding one core's activations while it does.

Memory per device (:meth:`CostModel.memory_parts`) = weights + gradients + optimizer state (by
:func:`state_parts_per_param`, divided as above) + activations: the microbatches the schedule keeps in flight
(1F1B: stage ``s`` of ``S`` holds ``min(S - s, M)``; GPipe: ``M``) at ``b / dp`` rows, less what
recomputation drops. The plan records the parts per stage (``Stage.memory``), with what recomputation and
sharding removed. A stage's parameters are those its nodes read: a parameter read in several stages (a tied
embedding and output projection) is held, with its gradient and optimizer state, by every one of them (see
[Note: shared parameters] in ``distplan.graph``); each holder also steps it.

Shared parameters: after the last backward every rank holding a copy of shared parameters ``p`` (every
device of every stage reading them) sums their gradients in one ring all-reduce (the lowering's group of
tied parameters): ``2 (w-1)/w * grad_bytes(p) / bw + 2 (w-1) * latency`` over ``w`` ranks, on the host's
link when they all sit on one host, else on the network. With one holding stage that is its ranks' sum.
Parameters are priced in groups read at the same node positions (``OpGraph.shared_params``); the lowering
coalesces groups with the same holders into one all-reduce, so the model may count a few latencies more
than it pays.

Iteration time (:func:`iteration_time`), with stage ``s`` taking ``f_s``/``b_s`` per microbatch, sending
its activations in ``c_s`` and receiving their gradients in ``g_s`` (stage ``s + 1``), and ``r_s`` for its
all-reduces (shared parameters, then data parallel) and optimizer step::

    1F1B:  sum_s (f_s + b_s + c_s + g_s) + (M - 1) * max_s (f_s + b_s + c_s + g_s) + max_s r_s
    GPipe: sum_s (f_s + b_s + c_s + g_s) + (M - 1) * (max_s f_s + max_s b_s)     + max_s r_s

(fill and drain, then the steady state paced by the slowest stage). GPipe's forward and backward phases
are flow shops with transfer lags, for which this is exact. Under 1F1B each stage runs only one
microbatch ahead of the next, so a window of stages ``s..t`` paces the steady state at
``(sum T + sum (c + g)) / (t - s + 1)`` (the cycle mean of the event graph), which approaches ``T + c + g`` in
a long balanced pipeline; ``max_s (T_s + c_s + g_s)`` bounds every window mean from above. This closed form
is the integer program's objective; ``distplan.planner.simulate`` replays the schedule event by event and
lands within a few percent below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distplan.calibration import OP_CLASSES, Curve, DeviceCalibration, op_class
from distplan.cluster import Cluster, Link
from distplan.errors import PlanError
from distplan.graph import OpGraph, SharedParam, dtype_bytes
from distplan.plan import StageMemory, check_precision

from .parallelism import ParallelFacts, StageConfig

__all__ = [
    "CostModel",
    "CostOptions",
    "IterationCost",
    "StageConfig",
    "StageCost",
    "boundary_rows",
    "boundary_sides",
    "iteration_time",
    "optimizer_bytes_per_param",
    "state_bytes_per_param",
    "state_parts_per_param",
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


#: Operators that are a linear when they read a weight (``linear``, ``addmm``, ``mm``): rows x width in.
_LINEAR_WORDS = ("linear", "addmm", "aten.mm.")


def _few_row_times(
    cal: DeviceCalibration, rows: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward seconds of linears of ``rows`` rows (each below the largest measured count) and
    ``weights`` weight bytes, from :attr:`DeviceCalibration.row_matmul` (with :attr:`~DeviceCalibration.stream`
    as the one-row member): geometric interpolation in the row count between the two measured counts around
    it, each read at the node's weight bytes (see [Note: calibrated pricing])."""
    counts = sorted(cal.row_matmul)
    curves = [cal.row_matmul[c] for c in counts]
    if cal.stream is not None:
        counts, curves = [1, *counts], [cal.stream, *curves]
    if len(counts) == 1:
        return _curve_times(curves[0].fwd, weights), _curve_times(curves[0].bwd, weights)
    logc = np.log(np.asarray(counts, dtype=np.float64))
    x = np.log(np.clip(rows, counts[0], counts[-1]))
    hi = np.clip(np.searchsorted(logc, x, side="right"), 1, len(counts) - 1)
    lo = hi - 1
    w = (x - logc[lo]) / (logc[hi] - logc[lo])
    out = []
    for part in ("fwd", "bwd"):
        table = np.log(np.stack([_curve_times(getattr(c, part), weights) for c in curves]))
        idx = np.arange(len(rows))
        out.append(np.exp(table[lo, idx] * (1 - w) + table[hi, idx] * w))
    return out[0], out[1]


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


def state_parts_per_param(dtype: str, optimizer: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter (see :func:`state_bytes_per_param`): the
    optimizer state holds the fp32 master weights under mixed precision."""
    states = _OPT_STATES[optimizer]
    return (4, 4, 4 * states) if dtype == "fp32" else (2, 2, 4 + 4 * states)


def boundary_rows(sender: StageConfig, receiver: StageConfig, *, network: bool) -> tuple[float, float]:
    """Rows of one microbatch, as a multiple of the microbatch ``b``, that a cut between two stages moves on
    its busiest path, forward (activations) and backward (their gradients); see [Note: transfers].

    Inside a host every device has its own link, so the busiest device paces the transfer: forward, a
    receiving device takes its replica's ``b / dp_r`` rows and a sending device sends its ``b / dp_s`` rows to
    ``ceil(tp_r / tp_s)`` receiving ranks (each tensor-parallel rank of the receiver gets the whole value);
    backward the same with the roles swapped. Between hosts the network is shared: every copy crosses it,
    ``tp_r`` times ``b`` rows forward and ``tp_s`` times backward.
    """
    if network:
        return float(receiver.tp), float(sender.tp)
    fwd = max(-(-receiver.tp // sender.tp) / sender.dp, 1.0 / receiver.dp)
    bwd = max(-(-sender.tp // receiver.tp) / receiver.dp, 1.0 / sender.dp)
    return fwd, bwd


def optimizer_bytes_per_param(dtype: str, optimizer: str) -> int:
    """Memory traffic of one optimizer step per parameter (read weights, grads, states; write weights,
    states; mixed precision also writes the low-precision copy)."""
    states = _OPT_STATES[optimizer]
    fp32 = 4 * (2 + states) + 4 * (1 + states)
    return fp32 if dtype == "fp32" else fp32 + 2


@dataclass(frozen=True, slots=True)
class StageCost:
    """Predicted costs of one stage (one replica; its tensor-parallel ranks run in step).

    ``param_bytes`` counts every parameter the stage holds (copies of shared ones included; one replica's,
    whole); ``shared_param_bytes`` the part other stages of the layout hold too, and ``tied_allreduce_s`` the
    time to sum those gradients with them (both 0 until the whole layout is known, see
    ``evaluate.layout_cost``). ``send_s`` / ``grad_send_s``: one microbatch's activations to the next stage
    and their gradients back. ``memory_bytes``: peak per device, ``memory`` its parts.
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
    grad_send_s: float = 0.0
    memory: StageMemory | None = None
    config: StageConfig = field(default_factory=StageConfig)


@dataclass(frozen=True, slots=True)
class IterationCost:
    iteration_time_s: float
    bubble_fraction: float


def iteration_time(stages: Sequence[StageCost], *, schedule: str, microbatches: int) -> IterationCost:
    """The closed-form iteration time (see module docstring) and the resulting bubble fraction."""
    m = microbatches
    fill = sum(s.fwd_s + s.bwd_s + s.send_s + s.grad_send_s for s in stages)
    if schedule == "gpipe":
        steady = (m - 1) * (max(s.fwd_s for s in stages) + max(s.bwd_s for s in stages))
    elif schedule == "1f1b":
        steady = (m - 1) * max(s.fwd_s + s.bwd_s + s.send_s + s.grad_send_s for s in stages)
    else:
        raise PlanError(f"the planner's cost model supports schedules gpipe and 1f1b, not {schedule!r}")
    tail = max(s.tied_allreduce_s + s.allreduce_s + s.optimizer_s for s in stages)
    total = fill + steady + tail
    busy = sum(m * (s.fwd_s + s.bwd_s) + s.tied_allreduce_s + s.allreduce_s + s.optimizer_s for s in stages)
    bubble = 1.0 - busy / (len(stages) * total) if total > 0 else 0.0
    return IterationCost(total, max(0.0, bubble))


def boundary_sides(start: int, end: int, n: int) -> int:
    """Pipeline boundaries of the stage ``[start, end)`` of an ``n``-node graph: one for a first or last
    stage of several, two for a middle stage, none for a single stage (each costs the runtime
    ``DeviceCalibration.boundary_fwd_s`` / ``boundary_bwd_s`` per microbatch)."""
    return int(start > 0) + int(end < n)


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
        #: ``cluster.devices()``, computed once (layouts are priced many times).
        self.devices = cluster.devices()
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
        self.state_per_param = state_bytes_per_param(dtype, optimizer)
        self.opt_traffic_per_param = optimizer_bytes_per_param(dtype, optimizer)
        self.grad_bytes_per_param = _COMPUTE_BYTES[dtype]
        self._prefix_cache: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._init_calibrated(graph, tb)
        self._init_parallel()

    def _init_parallel(self) -> None:
        """What tensor parallelism, recomputation and sharding change (see [Note: stage configurations])."""
        self.parallel = ParallelFacts(self.graph, shared_names={x for sp in self.shared for x in sp.names})
        # Shared parameters are never sharded (the lowering keeps them out of FSDP2) nor split here.
        first = np.zeros(self.n, dtype=np.float64)
        for sp in self.shared:
            first[sp.positions[0]] += sp.nbytes
        self.unshardable_prefix = np.concatenate([[0.0], np.cumsum(first)])
        self.weight_bpp, self.grad_bpp, self.opt_bpp = state_parts_per_param(self.dtype, self.optimizer)
        self._array_cache: dict[tuple[Any, ...], np.ndarray] = {}

    def _init_calibrated(self, graph: OpGraph, tb: float) -> None:
        """Per-node facts the calibrated pricing and the attention memory need (see [Note: calibrated
        pricing])."""
        nodes = graph.nodes
        self._class = np.array(
            [op_class(n.target, fwd_flops=n.fwd_flops, bytes_moved=n.bytes_moved) for n in nodes],
            dtype=object,
        )
        self._target = np.array([n.target for n in nodes], dtype=object)
        # Rows per sample of each linear reading a weight (its output's elements over the last dimension;
        # 0 for other nodes), for the few-row matmul curves.
        self._rows = np.array(
            [
                float(np.prod(n.outputs[0].shape[:-1])) / tb
                if n.param_bytes > 0
                and n.outputs
                and len(n.outputs[0].shape) >= 2
                and any(w in n.target for w in _LINEAR_WORDS)
                else 0.0
                for n in nodes
            ],
            dtype=np.float64,
        )
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
            if self._class[i] != "attention" or not n.outputs:
                continue
            q = n.outputs[0].shape
            # The keys' length: the second input's (query, key, value), or the queries' own where one packed
            # input carries all three (self-attention).
            if len(q) < 3:
                continue
            k_outs = (
                nodes[index[n.inputs[1]]].outputs if len(n.inputs) >= 2 and n.inputs[1] in index else None
            )
            keys = k_outs[0].shape[-2] if k_outs and len(k_outs[0].shape) >= 2 else (q[-2] if n.inputs else 0)
            heads = q[-3] if len(q) >= 4 else 1
            scores[i] = q[0] * heads * q[-2] * keys / tb
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

    # ------------------------------------------------------------------ tensor parallelism
    def param_prefix_tp(self, tp: int) -> np.ndarray:
        """:attr:`param_prefix` as one of ``tp`` tensor-parallel ranks holds it: the parameters of split
        regions divided by ``tp`` (as traced, bytes)."""
        if tp == 1:
            return self.param_prefix.astype(np.float64)
        key = ("param", tp)
        hit = self._array_cache.get(key)
        if hit is None:
            red = np.zeros(self.n, dtype=np.float64)
            for ri, splits in enumerate(self.parallel.param_split):
                if self.parallel.splits(ri, tp):
                    for pos, nbytes in splits:
                        red[pos] += nbytes * (1.0 - 1.0 / tp)
            hit = self.param_prefix - np.concatenate([[0.0], np.cumsum(red)])
            self._array_cache[key] = hit
        return hit

    def _score_extra(self, kind: str | None) -> np.ndarray:
        """Per node and sample, the attention probabilities a kind without a fused kernel keeps (bytes)."""
        if kind is None or self.cluster.kinds[kind].fused_attention:
            return np.zeros(self.n, dtype=np.float64)
        return self._score_elems * _COMPUTE_BYTES[self.dtype]

    def act_prefix_tp(self, kind: str | None, tp: int) -> np.ndarray:
        """Activation bytes per sample one of ``tp`` ranks keeps, as a prefix over nodes (:meth:`act_prefix_of`
        with split regions' share divided by ``tp``; ``kind`` None: without stored attention scores)."""
        key = ("act", kind, tp)
        hit = self._array_cache.get(key)
        if hit is None:
            per = np.diff(self.act_prefix) + self._score_extra(kind)
            if tp > 1:
                per = per.copy()
                for ri, (pos, nbytes) in enumerate(self.parallel.act_split):
                    if self.parallel.splits(ri, tp):
                        per[pos] -= nbytes * self.act_scale * (1.0 - 1.0 / tp)
                per -= self._score_extra(kind) * (1.0 - self.parallel.split_factor(tp))
            hit = np.concatenate([[0.0], np.cumsum(per)])
            self._array_cache[key] = hit
        return hit

    def core_prefix(self, kind: str | None, tp: int) -> np.ndarray:
        """Activation bytes per sample that selective recomputation does not keep (one of ``tp`` ranks), as a
        prefix over nodes: what the attention cores keep beyond their inputs and outputs, plus the stored
        probabilities of a kind without a fused kernel."""
        key = ("core", kind, tp)
        hit = self._array_cache.get(key)
        if hit is None:
            per = (
                self.parallel.core_saved * self.act_scale + self._score_extra(kind) * self.parallel.in_core
            ) * (self.parallel.split_factor(tp))
            hit = np.concatenate([[0.0], np.cumsum(per)])
            self._array_cache[key] = hit
        return hit

    def core_transient(self, kind: str | None, tp: int) -> float:
        """Per sample, the largest one attention core holds while the backward recomputes it (selective)."""
        key = ("core_max", kind, tp)
        hit = self._array_cache.get(key)
        if hit is None:
            pre = self.core_prefix(kind, tp)
            hit = np.array(max((float(pre[c[-1] + 1] - pre[c[0]]) for c in self.parallel.cores), default=0.0))
            self._array_cache[key] = hit
        return float(hit)

    def tp_comm_prefix(
        self, link: Link, microbatch: float, tp: int, recompute: str = "none"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums of the tensor-parallel collectives' seconds (forward, backward) per microbatch of
        ``microbatch`` rows on one replica of degree ``tp`` whose group sits on ``link`` (ring algorithms,
        see :meth:`collective_time`); full recomputation runs the forward ones again in the backward."""
        key = ("tpcomm", id(link), microbatch, tp, recompute)  # (a calibrated link is not hashable)
        hit = self._prefix_cache.get(key)
        if hit is not None:
            return hit
        fwd = np.zeros(self.n, dtype=np.float64)
        bwd = np.zeros(self.n, dtype=np.float64)
        if tp > 1:
            for c in self.parallel.collectives:
                if tp not in c.degrees:
                    continue
                scale = self.act_scale if c.scaled else 1.0
                nbytes = (c.fixed + microbatch * c.per_sample) * scale
                t = self.collective_time(c.op.replace("-", "_"), nbytes, world=tp, link=link)
                (fwd if c.phase == "forward" else bwd)[c.position] += t
        if recompute == "full":
            bwd = bwd + fwd
        out = (np.concatenate([[0.0], np.cumsum(fwd)]), np.concatenate([[0.0], np.cumsum(bwd)]))
        self._prefix_cache[key] = out
        return out

    # ------------------------------------------------------------------ compute
    def time_prefix(
        self, kind: str, microbatch: float, *, tp: int = 1, recompute: str = "none"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums (length ``n + 1``) of forward and backward seconds per microbatch of ``microbatch``
        samples on one device of ``kind``: a range costs ``prefix[end] - prefix[start]``. With ``tp > 1``,
        one of ``tp`` ranks (split regions' nodes do ``1 / tp`` of their work; their collectives are priced
        apart, :meth:`tp_comm_prefix`); ``recompute`` adds the forward run again in the backward (``full``:
        every node's; ``selective``: the attention cores')."""
        key = (kind, microbatch, tp, recompute)
        hit = self._prefix_cache.get(key)
        if hit is not None:
            return hit
        k = self.cluster.kinds[kind]
        peak = np.where(self._matmul, k.flops(self.precision), k.flops(self.dtype)) * k.efficiency
        bw = k.memory_bandwidth_bytes_s
        b = float(microbatch)
        share = self.parallel.split_factor(tp)
        mem_f = (self._param_read + b * self._other_bytes) * share / bw
        lo = self.options.launch_overhead_s * self._is_op
        fwd = np.maximum(b * self._fwd_flops * share / peak, mem_f) + lo
        bwd = np.maximum(b * self._bwd_flops * share / peak, self.options.bwd_bytes_factor * mem_f) + 2 * lo
        if not k.fused_attention:
            score_bytes = b * self._score_elems * share * _COMPUTE_BYTES[self.dtype] / bw
            fwd = fwd + _MATH_ATTENTION_PASSES[0] * score_bytes
            bwd = bwd + _MATH_ATTENTION_PASSES[1] * score_bytes
        if k.calibration is not None:
            fwd, bwd = self._calibrated_times(k.calibration, b, fwd, bwd, share)
        if recompute == "full":
            bwd = bwd + fwd
        elif recompute == "selective":
            bwd = bwd + fwd * self.parallel.in_core
        out = (np.concatenate([[0.0], np.cumsum(fwd)]), np.concatenate([[0.0], np.cumsum(bwd)]))
        self._prefix_cache[key] = out
        return out

    def _calibrated_times(
        self,
        cal: DeviceCalibration,
        b: float,
        ds_fwd: np.ndarray,
        ds_bwd: np.ndarray,
        share: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-node forward and backward seconds from measured curves (see [Note: calibrated pricing]);
        nodes of a class the calibration lacks keep their datasheet times ``ds_fwd`` / ``ds_bwd``. ``share``:
        per node, the part of its work one tensor-parallel rank does (read off the curves at that size)."""
        fwd = ds_fwd.copy()
        bwd = ds_bwd.copy()
        sh = np.ones(self.n) if share is None else share
        flops = b * self._fwd_flops * sh
        moved = (self._param_read + b * self._other_bytes) * sh
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
                kf, kb = b * self._out_bytes[mask] * sh[mask], moved[mask]
            elif cls == "view":
                kf = kb = np.ones(int(mask.sum()))
            else:
                kf = kb = moved[mask]
            f = _curve_times(times.fwd, kf)
            bw = _curve_times(times.bwd, kb)
            if cls == "matmul" and cal.stream is not None:
                f = np.maximum(f, _curve_times(cal.stream.fwd, moved[mask]))
                bw = np.maximum(bw, _curve_times(cal.stream.bwd, moved[mask]))
            if cls == "matmul" and cal.row_matmul:
                rows = b * self._rows[mask]
                few = (rows > 0) & (rows < max(cal.row_matmul))
                if few.any():
                    weights = (self._param_read * sh)[mask][few]
                    f[few], bw[few] = _few_row_times(cal, rows[few], weights)
            fwd[mask] = f
            bwd[mask] = bw
        # Operators measured one by one (DeviceCalibration.targets) are priced by their own curves.
        memory_bound = (self._class == "elementwise") | (self._class == "norm")
        for name, own in cal.targets.items():
            mask = memory_bound & (self._target == name)
            if mask.any():
                fwd[mask] = _curve_times(own.fwd, moved[mask])
                bwd[mask] = _curve_times(own.bwd, moved[mask])
        # What an op costs inside a whole model beyond its time alone (DeviceCalibration.in_graph).
        node_f, byte_f, node_b, byte_b = cal.in_graph
        out = b * self._out_bytes
        fwd = fwd + node_f + byte_f * out
        bwd = bwd + node_b + byte_b * out
        fwd[self._free] = 0.0
        bwd[self._free | ~self._grad] = 0.0
        # The loss runs on the last stage after the graph's outputs: charge it to the last node.
        lf, lb = self._loss_times(cal, b)
        fwd[-1] += lf
        bwd[-1] += lb
        return fwd, bwd

    def in_graph_counts(self) -> tuple[float, float, float, float]:
        """What ``DeviceCalibration.in_graph`` is charged on: (op nodes, their output bytes per sample,
        nodes on the gradient path, their output bytes per sample)."""
        ops = ~self._free
        grad = ops & self._grad
        return (
            float(ops.sum()),
            float(self._out_bytes[ops].sum()),
            float(grad.sum()),
            float(self._out_bytes[grad].sum()),
        )

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

    def compute_time(
        self, start: int, end: int, kind: str, microbatch: float, *, tp: int = 1, recompute: str = "none"
    ) -> tuple[float, float]:
        """Forward and backward seconds of nodes ``[start, end)`` for one microbatch on one ``kind`` (one of
        ``tp`` ranks, collectives apart; see :meth:`time_prefix`)."""
        f, b = self.time_prefix(kind, microbatch, tp=tp, recompute=recompute)
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
        self,
        start: int,
        end: int,
        *,
        microbatch: float,
        inflight: int,
        kind: str | None = None,
        config: StageConfig | None = None,
    ) -> int:
        """Peak bytes per device of a stage holding ``inflight`` microbatches' activations (``microbatch``
        rows each: one replica's), run as ``config`` (see :meth:`memory_parts`)."""
        return int(
            np.ceil(
                self.memory_parts(
                    start, end, microbatch=microbatch, inflight=inflight, kind=kind, config=config
                )[1]
            )
        )

    def memory_parts(
        self,
        start: int,
        end: int,
        *,
        microbatch: float,
        inflight: int,
        kind: str | None = None,
        config: StageConfig | None = None,
    ) -> tuple[StageMemory, float]:
        """Peak memory of one device of a stage over nodes ``[start, end)`` run as ``config``, by part, and
        its exact total in bytes (see [Note: stage configurations]); ``microbatch``: rows one replica
        computes per microbatch; ``inflight``: microbatches whose activations the schedule keeps."""
        cfg = config or StageConfig()
        tp, dp = cfg.tp, cfg.dp
        extra = self.shared_extra_bytes(start, end)
        pre = self.param_prefix_tp(tp)
        held = float(pre[end] - pre[start]) + extra  # traced bytes one rank holds
        whole = float(self.unshardable_prefix[end] - self.unshardable_prefix[start]) + extra
        part = max(0.0, held - whole)  # what sharding may divide
        per = 1.0 / self.param_elem_bytes
        w, g, o = self.weight_bpp * per, self.grad_bpp * per, self.opt_bpp * per
        weights, grads, opt = w * held, g * held, o * held
        if cfg.shard != "none":
            # ZeRO-1: the optimizer state of the stage's own parameters divides over the replicas; FSDP2 also
            # keeps each device's shard of the weights beside the gathered ones. ZeRO-2/3 add the gradient
            # shard; the stage is one FSDP2 unit, so its whole gradient (and, for ZeRO-3, its gathered weights)
            # are still held while a microbatch's backward runs.
            opt = o * whole + o * part / dp
            weights = w * held + w * part / dp
            if cfg.shard in ("optimizer+gradients", "full"):
                grads = g * held + g * part / dp
        shard_saved = max(0.0, (w + g + o) * held - (weights + grads + opt))
        r = float(microbatch)
        act_pre = self.act_prefix_tp(kind, tp)
        kept = float(act_pre[end] - act_pre[start]) * r
        if cfg.recompute == "full":
            # Only the stage's inputs per microbatch, and one microbatch's activations while it recomputes.
            act = inflight * float(self.cut_per_sample[start]) * r + kept
        elif cfg.recompute == "selective":
            core = self.core_prefix(kind, tp)
            saved = float(core[end] - core[start]) * r
            act = inflight * (kept - saved) + self.core_transient(kind, tp) * r
        else:
            act = inflight * kept
        recompute_saved = max(0.0, inflight * kept - act)
        parts = StageMemory(
            parameters=math.ceil(weights),
            gradients=math.ceil(grads),
            optimizer=math.ceil(opt),
            activations=math.ceil(act),
            recompute_saved=math.floor(recompute_saved),
            shard_saved=math.floor(shard_saved),
        )
        return parts, weights + grads + opt + act

    # ------------------------------------------------------------------ communication
    def cut_bytes(self, position: int, microbatch: float) -> float:
        """Bytes a cut at ``position`` sends per microbatch (0 at the graph's ends)."""
        return float(self.cut_per_sample[position]) * microbatch

    def send_time(self, position: int, microbatch: float, *, link: Link, streams: int = 1) -> float:
        """Seconds to send one microbatch's activations across a cut at ``position``; ``streams`` parallel
        transfers share ``link`` (measured send times of a calibrated link, at the bytes all streams move)."""
        nbytes = self.cut_bytes(position, microbatch)
        if nbytes <= 0:
            return 0.0
        if link.calibration is not None:
            # The crossing tensors go out together (the executor posts every isend / irecv of a transfer
            # before waiting on any), so their latencies overlap: one measured transfer of all the bytes.
            # Charging each tensor its own latency priced a 4-tensor Llama cut at 4x the measured p2p wait
            # over gloo (5.1 ms against ~1 ms per transfer, cost_accuracy's "llama 2st 1f1b m4").
            return link.calibration.send_time(streams * nbytes)
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

    def collective_time(self, op: str, nbytes: float, *, world: int, link: Link, streams: int = 1) -> float:
        """Seconds of one ring collective (``all_reduce``, ``all_gather``, ``reduce_scatter``) of ``nbytes``
        payload among ``world`` ranks on ``link``, ``streams`` such rings sharing it: each rank sends
        ``2 (w - 1) / w`` of the payload for an all-reduce and ``(w - 1) / w`` otherwise, with one latency per
        ring step (a calibrated link: its measured collective)."""
        if world <= 1:
            return 0.0
        nbytes = max(0.0, nbytes)  # (an empty collective still pays its latency, as the integer program does)
        if link.calibration is not None:
            t = link.calibration.collective_time(op, streams * nbytes, world)
            if t is not None:
                return t
        steps = (2 if op == "all_reduce" else 1) * (world - 1)
        return steps / world * streams * nbytes / link.bandwidth_bytes_s + steps * link.latency_s

    def collective_times(self, op: str, nbytes: np.ndarray, *, world: int, link: Link) -> np.ndarray:
        """:meth:`collective_time` at every payload of ``nbytes`` (vectorised where the link is priced by its
        datasheet figures)."""
        nbytes = np.maximum(np.asarray(nbytes, dtype=np.float64), 0.0)
        if world <= 1:
            return np.zeros_like(nbytes)
        if link.calibration is not None:
            return np.array([self.collective_time(op, float(x), world=world, link=link) for x in nbytes])
        steps = (2 if op == "all_reduce" else 1) * (world - 1)
        return steps / world * nbytes / link.bandwidth_bytes_s + steps * link.latency_s

    def send_times(self, rows: float, *, link: Link) -> np.ndarray:
        """:meth:`send_time` at every cut position ``0..n`` for ``rows`` rows (vectorised where the link is
        priced by its datasheet figures)."""
        if link.calibration is not None:
            return np.array([self.send_time(p, rows, link=link) for p in range(self.n + 1)])
        nbytes = self.cut_per_sample * rows
        return np.where(nbytes > 0, link.latency_s + nbytes / link.bandwidth_bytes_s, 0.0)

    def optimizer_times(self, param_bytes: np.ndarray, kind: str) -> np.ndarray:
        """:meth:`optimizer_time` at every value of ``param_bytes`` (it is linear in the bytes)."""
        return np.asarray(param_bytes, dtype=np.float64) * self.optimizer_time(1.0, kind)

    def tied_allreduce_time(self, param_bytes: float, *, world: int, link: Link) -> float:
        """Sum of the gradients of ``param_bytes`` traced bytes of shared parameters over the ``world`` ranks
        holding a copy, one ring on ``link`` (the lowering's group of tied parameters)."""
        grad = param_bytes / self.param_elem_bytes * self.grad_bytes_per_param
        return self.collective_time("all_reduce", grad, world=world, link=link)

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
        microbatch: float,
        inflight: int,
        dp: int = 1,
        allreduce_link: Link,
        send_link: Link | None = None,
        send_streams: int = 1,
        config: StageConfig | None = None,
        tp_link: Link | None = None,
        transfer: tuple[float, float] | None = None,
        allreduce_streams: int = 1,
    ) -> StageCost:
        """All predicted costs of one stage over nodes ``[start, end)`` on ``kind``, run as ``config``
        (default: ``dp`` replicas, nothing else), ``microbatch`` rows per replica, holding ``inflight``
        microbatches (see [Note: stage configurations]).

        Links: ``allreduce_link`` carries the data-parallel collectives (``allreduce_streams`` rings share it:
        the tensor-parallel ranks' rings on a shared network), ``tp_link`` the tensor-parallel ones (default:
        ``allreduce_link``). ``transfer``: the seconds to send one microbatch's activations to the next stage
        and their gradients back (see :func:`boundary_rows`); without it, both directions take
        :meth:`send_time` over ``send_link`` (None for the last stage) with ``send_streams``.
        """
        cfg = config or StageConfig(dp=dp)
        dp, tp = cfg.dp, cfg.tp
        tp_link = tp_link or allreduce_link
        f, b = self.compute_time(start, end, kind, microbatch, tp=tp, recompute=cfg.recompute)
        if tp > 1:
            cf, cb = self.tp_comm_prefix(tp_link, microbatch, tp, cfg.recompute)
            f += float(cf[end] - cf[start])
            b += float(cb[end] - cb[start])
        if transfer is not None:
            send, grad_send = transfer
        else:
            send = 0.0
            if send_link is not None:
                send = self.send_time(end, microbatch, link=send_link, streams=send_streams)
            grad_send = send
        pbytes = self.param_bytes(start, end)
        extra = self.shared_extra_bytes(start, end)
        pre = self.param_prefix_tp(tp)
        held = float(pre[end] - pre[start]) + extra
        whole = min(held, float(self.unshardable_prefix[end] - self.unshardable_prefix[start]) + extra)
        part = held - whole
        to_grad = self.grad_bytes_per_param / self.param_elem_bytes
        to_weight = self.weight_bpp / self.param_elem_bytes

        def coll(op: str, nbytes: float, world: int = dp, link: Link = allreduce_link) -> float:
            streams = allreduce_streams if link is allreduce_link else 1
            return self.collective_time(op, nbytes, world=world, link=link, streams=streams)

        # Shared parameters are summed over every rank holding them (``tied_allreduce_time``, priced with
        # the whole layout); the data-parallel collectives carry the stage's own.
        if cfg.shard == "none":
            allreduce = coll("all_reduce", part * to_grad)
        else:
            allreduce = 0.0
            if cfg.shard == "optimizer":
                # Gradients reduce-scattered once, the updated weights gathered once (a ring all-reduce's
                # two halves).
                allreduce += coll("reduce_scatter", part * to_grad) + coll("all_gather", part * to_weight)
            elif cfg.shard == "optimizer+gradients":
                b += coll("reduce_scatter", part * to_grad)  # after every microbatch's backward
                allreduce += coll("all_gather", part * to_weight)
            else:  # full: weights gathered before each forward and backward, gradients scattered after
                f += coll("all_gather", part * to_weight)
                b += coll("all_gather", part * to_weight) + coll("reduce_scatter", part * to_grad)
        if tp > 1:
            reduce = sum(
                nbytes
                for ri, lst in enumerate(self.parallel.grad_reduce)
                if self.parallel.splits(ri, tp)
                for pos, nbytes in lst
                if start <= pos < end
            )
            allreduce += coll("all_reduce", reduce * to_grad, world=tp, link=tp_link)
        sharded = cfg.shard != "none"
        cal = self.cluster.kinds[kind].calibration
        if cal is None:
            optimizer = self.optimizer_time(whole, kind) + self.optimizer_time(part, kind) / (
                dp if sharded else 1
            )
        else:
            # What the runtime does per stage (see [Note: calibrated pricing]), on this rank's share of the
            # tensors (split by tensor parallelism, divided over the replicas by sharding).
            f += cal.microbatch_fwd_s
            b += cal.microbatch_bwd_s
            sides = boundary_sides(start, end, self.n)
            f += cal.boundary_fwd_s * sides
            b += cal.boundary_bwd_s * sides
            opt, passes = self._tensor_prefix(kind)
            extras = self._shared_extra_tensors(start, end)
            ratio = held / pbytes if pbytes > 0 else 1.0
            step_share = (whole + part / dp) / held if sharded and held > 0 else 1.0
            optimizer = (float(opt[end] - opt[start]) + sum(self.optimizer_time(x, kind) for x in extras)) * (
                ratio * step_share
            )
            optimizer += cal.step_s  # the runtime's own per-iteration work, in the same tail
            one_pass = float(passes[end] - passes[start]) * ratio
            elem = cal.ops.get("elementwise")
            if elem is not None and dp > 1:
                # The runner concatenates the gradients, all-reduces the buffer and copies each gradient
                # back (lowering.sharding.coalesced_all_reduce). The last stage's loss is summed over the
                # replicas in that buffer too (Runner._sync_gradients), or on its own where FSDP2
                # reduces the gradients.
                grad = held * to_grad
                one_pass += sum(elem.fwd.time(2 * x) for x in extras)
                allreduce += elem.fwd.time(2 * grad) + one_pass
                if end == self.n and cfg.shard != "none":
                    allreduce += self.allreduce_time(self.param_elem_bytes, dp=dp, link=allreduce_link)
        parts, total = self.memory_parts(
            start, end, microbatch=microbatch, inflight=inflight, kind=kind, config=cfg
        )
        return StageCost(
            fwd_s=f,
            bwd_s=b,
            send_s=send,
            grad_send_s=grad_send,
            allreduce_s=allreduce,
            optimizer_s=optimizer,
            memory_bytes=math.ceil(total),
            param_bytes=pbytes,
            inflight=inflight,
            memory=parts,
            config=cfg,
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
