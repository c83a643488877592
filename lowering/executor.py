"""distplan's own pipeline schedule executor: runs one rank's forward and backward actions with explicit
point-to-point transfers and autograd, for any per-stage (data, tensor) split.

[Note: why our own executor]
``torch.distributed.pipelining`` gives each stage exactly one neighbour on each side (one process group per
pipeline, ``PipelineStage`` talks to group rank ``p - 1`` and ``p + 1``). A plan whose stages have different
data-parallel degrees has no such pipelines: stage 0 with ``dp 2`` feeds stage 1 with ``dp 1`` from two
ranks, and a stage with ``tp 2`` is two ranks that both need every input. Keeping ``pipelining`` where degrees
match and patching the boundaries where they differ would give two runtimes with two sets of traps; so the
lowering runs every plan through this one executor. It is small because the hard parts are delegated:

- the order of actions comes from :class:`~distplan.lowering.parallel.ParallelLayout` (a deterministic
  simulation of GPipe / 1F1B / interleaved 1F1B; see [Note: schedule order] there), so it cannot deadlock;
- a forward is one call of the stage program per chunk (see [Note: chunks]); its inputs are autograd leaves,
  so a backward is one ``torch.autograd.backward(outputs, output_grads)`` per chunk, after which the
  leaves' ``.grad`` are the gradients to send back;
- transfers are ``dist.isend`` / ``dist.irecv`` on the default group (gloo on CPU, NCCL on GPUs); receive
  buffers are shaped from the stage's captured example values, so no shapes are exchanged at run time;
  receives from a peer are posted in the peer's send order (:class:`_Mailbox`), which is how both backends
  match messages between two ranks.

Numerics: every chunk's loss is a mean over its ``g`` rows; it is scaled by ``1 / (M * L)`` before its
backward (``M`` microbatches of ``L`` chunks), so the gradients a replica accumulates summed over the
replicas (the data-parallel *sum*, see ``distplan.lowering.sharding``) are the gradients of the mean loss
over the whole batch, as on one device. Sends keep their tensors alive until completed; every send is
waited for before :meth:`PipelineExecutor.run` returns.

[Note: sends on CPU threads]
gloo moves a posted send on a background thread of the sending process. On a CPU whose cores all compute
(one rank per core), that thread waits for the scheduler to preempt the rank's own compute: measured on a
2-core VM, a 32 KiB activation sent before 5 ms of compute arrived a median 1.9 ms later (up to 5.6 ms),
against 0.12 ms when the sender slept instead, so every pipeline boundary stalled the next stage by a
scheduler time slice. After posting its sends a gloo rank yields its core once (``os.sched_yield``), which
lets that thread write the message first (median arrival 0.10 ms in the same test). A message also waits
for its receive to be posted, so under gloo each peer's next receive is posted as soon as the one before
it is taken (one message ahead, in the peer's send order; its buffers are one chunk's inputs or output
gradients): traced on a 2-stage GPipe BERT, stage 1 then got every activation 0.1-0.15 ms after it was
sent instead of 2-8 ms, and the iteration's median fell from 39 to 32 ms. NCCL runs each pair's transfers
in order on one stream, where a receive posted early would hold up the sends behind it (and can deadlock
two ranks each sending to the other), so NCCL posts receives when needed and needs no yield.

Limits: each stage output is kept whole until its backward (Megatron frees the data of sent outputs; we do
not, to stay on public autograd APIs); a stage with ``dp_s`` smaller than ``lcm(dp)`` runs several chunk
calls per microbatch (see [Note: chunks]); on GPUs receives are posted when needed (no prefetch of the
next action's inputs), so transfers overlap compute only through the asynchronous sends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from distplan.errors import LoweringError
from distplan.lowering.parallel import Action, Message, ParallelLayout

__all__ = ["PipelineExecutor", "StageProgram"]


@dataclass
class StageProgram:
    """One stage as this rank runs it.

    Attributes:
        index: the stage number.
        module: ``module(*inputs)`` -> the stage's outputs (a tuple; the model's output on the last stage).
            Inputs and outputs are plain (whole) tensors at the chunk shape.
        inputs / outputs: ``(shape, dtype)`` of each input and output at the chunk shape (the captured example
            values), used to allocate receive buffers.
        before_backward: called as ``before_backward(last)`` before each chunk's backward, ``last`` being
            whether it is this stage's last backward of the microbatch on this rank (sharded stages decide
            there whether to reduce-scatter gradients).
        context: a context manager factory the backward runs under (a tensor-parallel stage's DTensor
            settings; the forward applies it inside ``module``).
    """

    index: int
    module: Callable[..., Any]
    inputs: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    outputs: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    before_backward: Callable[[bool], None] | None = None
    context: Callable[[], Any] = contextlib.nullcontext

    def float_outputs(self) -> list[int]:
        return [i for i, (_, dt) in enumerate(self.outputs) if dt.is_floating_point]

    def float_inputs(self) -> list[int]:
        return [i for i, (_, dt) in enumerate(self.inputs) if dt.is_floating_point]


@dataclass
class _Saved:
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...] = ()
    loss: torch.Tensor | None = None


def _wait_p2p(work: Any) -> None:
    """Wait for one transfer. The name is how the validation tells, from a stack dump, a rank waiting on
    a peer from a rank that hangs (``_COMM_FRAMES`` in ``distplan.lowering.validation``)."""
    if work is not None:
        work.wait()


@dataclass
class _Mailbox:
    """Receives of one rank, posted per peer in the peer's send order (see [Note: why our own executor]).
    With ``ahead``, each peer's next receive is posted as soon as the one before it is taken (the first at
    :meth:`reset`), see [Note: sends on CPU threads]."""

    layout: ParallelLayout
    rank: int
    tr: Sequence[int]
    device: torch.device
    buffers_for: Callable[[Message], list[torch.Tensor]]
    ahead: bool = False
    queues: dict[int, list[Message]] = field(default_factory=dict)
    next: dict[int, int] = field(default_factory=dict)
    posted: dict[Message, tuple[list[torch.Tensor], list[Any]]] = field(default_factory=dict)

    def reset(self) -> None:
        self.queues = self.layout.incoming(self.rank)
        self.next = {p: 0 for p in self.queues}
        self.posted.clear()
        if self.ahead:
            for peer in self.queues:
                self._post_next(peer)

    def _post_next(self, peer: int) -> bool:
        """Post the receive of ``peer``'s next message of this iteration; False when none is left."""
        q = self.queues.get(peer, [])
        i = self.next.get(peer, 0)
        if i >= len(q):
            return False
        m = q[i]
        bufs = self.buffers_for(m)
        works = [dist.irecv(b, src=self.tr[m.src]) for b in bufs]
        self.posted[m] = (bufs, works)
        self.next[peer] = i + 1
        return True

    def get(self, m: Message) -> list[torch.Tensor]:
        while m not in self.posted:
            if not self._post_next(m.src):
                raise LoweringError(f"rank {self.rank} expects {m} from rank {m.src}, which never sends it")
        bufs, works = self.posted.pop(m)
        if self.ahead:
            self._post_next(m.src)
        for w in works:
            _wait_p2p(w)
        return bufs


class PipelineExecutor:
    """Runs this rank's part of one training iteration (see [Note: why our own executor]).

    Args:
        layout: the plan's :class:`ParallelLayout`.
        rank: this process's plan rank; ``tr[plan rank]`` is the torch rank.
        programs: the stages this rank runs, by index.
        device: where the stage programs compute.
        loss_fn: ``loss_fn(output, target) -> scalar`` (a mean over the chunk's rows).
        region: ``region(name)`` -> a context manager timing the enclosed code (``fwd:<s>``, ``bwd:<s>``,
            ``loss``, ``p2p``); see ``distplan.lowering.timing``.
    """

    def __init__(
        self,
        layout: ParallelLayout,
        rank: int,
        tr: Sequence[int],
        programs: dict[int, StageProgram],
        device: torch.device,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        region: Callable[[str], Any] | None = None,
    ) -> None:
        self.layout = layout
        self.rank = rank
        self.tr = tr
        self.programs = programs
        self.device = device
        self.loss_fn = loss_fn
        self.region = region or (lambda _n: contextlib.nullcontext())
        self.actions: list[Action] = layout.actions(rank)
        self.placement = {s: layout.placement(rank, s) for s in programs}
        # See [Note: sends on CPU threads].
        self._cpu_transport = dist.is_initialized() and dist.get_backend() == "gloo"
        self._mailbox = _Mailbox(layout, rank, tr, device, self._buffers_for, ahead=self._cpu_transport)
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self._seq = {
            (m.kind, m.boundary, m.microbatch, m.chunk, m.src, m.dst): m
            for m in layout.messages
            if rank in (m.src, m.dst)
        }
        self.last_chunk_losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------ transfers
    def _buffers_for(self, m: Message) -> list[torch.Tensor]:
        if m.kind == "act":
            specs = self.programs[m.boundary + 1].inputs
            return [torch.empty(shape, dtype=dt, device=self.device) for shape, dt in specs]
        prog = self.programs[m.boundary]
        return [
            torch.empty(prog.outputs[i][0], dtype=prog.outputs[i][1], device=self.device)
            for i in prog.float_outputs()
        ]

    def _send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        for t in tensors:
            t = t.detach().contiguous()
            self._sends.append((dist.isend(t, dst=self.tr[dst]), t))
        if self._cpu_transport:
            os.sched_yield()

    def _recv(self, m: Message) -> list[torch.Tensor]:
        with self.region("p2p"):
            return self._mailbox.get(m)

    def _message(self, kind: str, boundary: int, k: int, c: int, src: int, dst: int) -> Message:
        """The layout's message (with its global send number) for these fields."""
        return self._seq[(kind, boundary, k, c, src, dst)]

    def _drain_sends(self, *, all_: bool) -> None:
        if all_:
            with self.region("p2p"):
                for w, _ in self._sends:
                    _wait_p2p(w)
            self._sends.clear()
            return
        self._sends = [(w, t) for w, t in self._sends if w is not None and not w.is_completed()]

    # ------------------------------------------------------------------ run
    def run(
        self,
        stage0_inputs: Callable[[int, int], list[Any]] | None,
        targets: Callable[[int, int], Any] | None,
    ) -> list[torch.Tensor]:
        """One iteration: every action of this rank, in order. ``stage0_inputs(k, c)`` gives the model
        inputs of chunk ``c`` of microbatch ``k`` (ranks of stage 0), ``targets(k, c)`` its target (ranks of
        the last stage). Returns the (unscaled) loss of every chunk this rank computed, in order."""
        lay = self.layout
        scale = 1.0 / (lay.num_microbatches * lay.chunks)
        saved: dict[tuple[int, int, int], _Saved] = {}
        losses: list[torch.Tensor] = []
        self._mailbox.reset()
        for a in self.actions:
            # A profiler label per action (see [Note: measuring activation memory] in lowering.memory).
            with torch.profiler.record_function(f"distplan.{a}"):
                if a.kind == "F":
                    self._forward(a, stage0_inputs, targets, saved, losses)
                else:
                    self._backward(a, saved, scale)
            self._drain_sends(all_=False)
        self._drain_sends(all_=True)
        if saved:
            raise LoweringError(f"rank {self.rank}: {len(saved)} forward(s) got no backward (schedule bug)")
        self.last_chunk_losses = losses
        return losses

    def _forward(
        self,
        a: Action,
        stage0_inputs: Callable[[int, int], list[Any]] | None,
        targets: Callable[[int, int], Any] | None,
        saved: dict[tuple[int, int, int], _Saved],
        losses: list[torch.Tensor],
    ) -> None:
        """The forward of microbatch ``a.microbatch`` on every chunk this rank's replica owns: receive all
        chunks' inputs, then compute (one timed region per action, as the timing reports per microbatch),
        sending each chunk's outputs as soon as they exist."""
        lay = self.layout
        prog = self.programs[a.stage]
        pl = self.placement[a.stage]
        k, last = a.microbatch, a.stage == lay.num_stages - 1
        chunk_inputs: list[tuple[int, list[Any]]] = []
        for c in lay.chunks_of(a.stage, pl.replica):
            if a.stage == 0:
                if stage0_inputs is None:
                    raise LoweringError(f"rank {self.rank} runs stage 0 and needs the inputs")
                chunk_inputs.append((c, list(stage0_inputs(k, c))))
            else:
                src = self._source(a.stage - 1, c, kind="act")
                got = self._recv(self._message("act", a.stage - 1, k, c, src, self.rank))
                chunk_inputs.append((c, [t.requires_grad_() if t.is_floating_point() else t for t in got]))
        if last and targets is None:
            raise LoweringError(f"rank {self.rank} runs the last stage and needs the targets")
        for c, xs in chunk_inputs:
            with self.region(f"fwd:{a.stage}"):
                out = prog.module(*xs)
            if last:
                assert targets is not None
                with self.region("loss"):
                    loss = self.loss_fn(out, targets(k, c))
                losses.append(loss.detach())
                saved[(a.stage, k, c)] = _Saved(xs, loss=loss)
                continue
            outs = out if isinstance(out, tuple) else (out,)
            if len(outs) != len(prog.outputs):
                raise LoweringError(
                    f"stage {a.stage} returned {len(outs)} values but {len(prog.outputs)} cross the cut behind it"
                )
            saved[(a.stage, k, c)] = _Saved(xs, outputs=outs)
            for src, dst in lay.activation_sends(a.stage, c):
                if src == self.rank:
                    self._send(outs, dst)

    def _backward(self, a: Action, saved: dict[tuple[int, int, int], _Saved], scale: float) -> None:
        """The backward of microbatch ``a.microbatch`` on every chunk this rank's replica owns."""
        lay = self.layout
        prog = self.programs[a.stage]
        pl = self.placement[a.stage]
        k, last = a.microbatch, a.stage == lay.num_stages - 1
        chunks = list(lay.chunks_of(a.stage, pl.replica))
        grads: dict[int, list[torch.Tensor]] = {}
        if not last:
            for c in chunks:
                src = self._source(a.stage, c, kind="grad")
                grads[c] = self._recv(self._message("grad", a.stage, k, c, src, self.rank))
        for i, c in enumerate(chunks):
            st = saved.pop((a.stage, k, c))
            if prog.before_backward is not None:
                prog.before_backward(i == len(chunks) - 1)
            with self.region(f"bwd:{a.stage}"), prog.context():
                if last:
                    assert st.loss is not None
                    (st.loss * scale).backward()
                else:
                    outs, gs = [], []
                    for j, g in zip(prog.float_outputs(), grads.pop(c), strict=True):
                        if st.outputs[j].requires_grad:
                            outs.append(st.outputs[j])
                            gs.append(g)
                    if outs:
                        torch.autograd.backward(outs, gs)
            if a.stage > 0:
                gin: list[torch.Tensor] = []
                for j in prog.float_inputs():
                    gj = st.inputs[j].grad
                    gin.append(gj if gj is not None else torch.zeros_like(st.inputs[j]))
                for src, dst in lay.gradient_sends(a.stage - 1, c):
                    if src == self.rank:
                        self._send(gin, dst)

    def _source(self, boundary: int, c: int, *, kind: str) -> int:
        """The rank that sends this rank chunk ``c``'s activations (``act``) or gradients (``grad``) across
        ``boundary``."""
        lay = self.layout
        pairs = lay.activation_sends(boundary, c) if kind == "act" else lay.gradient_sends(boundary, c)
        for src, dst in pairs:
            if dst == self.rank:
                return src
        raise LoweringError(f"rank {self.rank} receives no {kind} of chunk {c} across boundary {boundary}")

    def warm_up_links(self, timeout_pairs: Sequence[tuple[int, int]] | None = None) -> None:
        """Exchange one small message with every peer, pair by pair in one global order: NCCL creates a
        communicator per pair on first use, which blocks both ends; doing it here, in an order every rank
        agrees on, keeps that blocking out of the schedule."""
        pairs = self.layout.p2p_pairs() if timeout_pairs is None else list(timeout_pairs)
        for a, b in pairs:
            if self.rank not in (a, b):
                continue
            peer = b if self.rank == a else a
            t = torch.zeros(1, device=self.device)
            if self.rank == a:
                dist.send(t, dst=self.tr[peer])
                dist.recv(t, src=self.tr[peer])
            else:
                dist.recv(t, src=self.tr[peer])
                dist.send(t, dst=self.tr[peer])
