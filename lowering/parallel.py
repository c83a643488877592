"""Where every piece of a plan runs: each stage's (data, tensor) split, the microbatch chunks each replica
computes, the transfers between stages and the order of each rank's work. Pure Python (no torch), so the
layout of any plan can be checked and tested without processes.

[Note: chunks]
A plan (schema 2) gives every stage ``s`` its own data-parallel degree ``dp_s``; replica ``r`` of stage ``s``
computes rows ``[r * b/dp_s, (r+1) * b/dp_s)`` of every microbatch of ``b`` rows. Two stages of different
``dp`` cut the microbatch differently, so the transfer between them re-partitions it. The lowering does this
in one uniform way: the microbatch is cut into ``L = lcm(dp_0, ..., dp_{S-1})`` *chunks* of ``g = b / L`` rows
each, and replica ``r`` of stage ``s`` owns the ``L / dp_s`` consecutive chunks ``[r L/dp_s, (r+1) L/dp_s)``,
exactly its rows. Every stage program is captured once, at ``g`` rows, and a replica runs it once per chunk
it owns. The unit of every transfer is one chunk: chunk ``c`` goes from the replica of stage ``s`` that owns
it to the replica of stage ``s+1`` that owns it. So

- re-partitioning needs no knowledge of which values carry the batch dimension (a value without one, such
  as a rotary table or a broadcast mask, is simply sent with each chunk, as the stage computed it for that
  chunk) and works for any pair of degrees;
- one capture serves all stages, whose graphs hard-code the batch size in their reshapes;
- with equal degrees everywhere (``L = dp``) every replica owns one chunk per microbatch and runs the
  stage once per microbatch, as a plain pipeline does.

The price is that a stage with ``dp_s < L`` runs ``L / dp_s`` calls of ``g`` rows instead of one of
``b / dp_s`` rows: the same FLOPs in smaller matrix products (for language models ``g`` rows are ``g * seq``
tokens, large enough that this costs little), and a smaller transient peak.

[Note: tensor-parallel lanes]
Inside a replica of tensor-parallel degree ``tp``, every tensor-parallel rank holds the whole value at a
stage boundary (stage inputs and outputs are replicated across the tensor-parallel group; see
``distplan.lowering.tensor_parallel``). Between a replica of degree ``tp_a`` and one of degree ``tp_b``,
forward values go from sender rank ``t % tp_a`` to receiver rank ``t`` for every ``t < tp_b`` (each receiver
gets one copy), and gradients from receiver rank ``t % tp_b`` to sender rank ``t`` for every ``t < tp_a``
(each sender runs its share of the backward, so each needs the gradient).

[Note: schedule order]
Each rank runs its forward (F) and backward (B) actions in an order derived from one deterministic
unit-time simulation of the whole pipeline, with all replicas of a stage stepping together: at each step
every *actor* (the ranks of one device group; under interleaved 1F1B a group runs several stages) takes at
most one ready action. GPipe: every forward before any backward, microbatches in order. 1F1B (and
interleaved 1F1B): a ready backward first; otherwise the earliest ready forward, provided stage ``s`` then
holds at most ``S - s`` microbatches in flight (the 1F1B memory bound of Narayanan et al. 2021). Because
every rank's order is a subsequence of one global order that respects all data dependencies, and sends do
not block, no rank can wait on a transfer whose sender is itself waiting: the schedule cannot deadlock.
Receives are posted per peer in the order the peer sends (the order of the global simulation), which both
gloo and NCCL need to match messages between a pair of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from distplan.errors import LoweringError

__all__ = [
    "RECOMPUTE",
    "SHARDING",
    "Action",
    "Message",
    "ParallelLayout",
    "Placement",
    "StageSpec",
    "layout_of",
]

RECOMPUTE: tuple[str, ...] = ("none", "selective", "full")
SHARDING: tuple[str, ...] = ("none", "optimizer", "optimizer+gradients", "full")
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage as the lowering runs it.

    Attributes:
        index: stage number in pipeline order.
        start / end: its half-open range of graph node positions.
        dp / tp: data- and tensor-parallel degree.
        ranks: ``ranks[r][t]`` = the rank of replica ``r``, tensor-parallel rank ``t`` (the plan's devices are
            replica-major: ``devices[r * tp + t]``).
        recompute: ``none``, ``selective`` or ``full`` (see ``distplan.lowering.recompute``).
        shard: ``none``, ``optimizer``, ``optimizer+gradients`` or ``full`` over the ``dp`` replicas (ZeRO-1/2/3;
            see ``distplan.lowering.sharding``).
    """

    index: int
    start: int
    end: int
    dp: int
    tp: int
    ranks: tuple[tuple[int, ...], ...]
    recompute: str = "none"
    shard: str = "none"

    def __post_init__(self) -> None:
        p = f"stage {self.index}"
        if self.dp < 1 or self.tp < 1:
            raise LoweringError(f"{p}: dp and tp must be >= 1, got dp={self.dp}, tp={self.tp}")
        if len(self.ranks) != self.dp or any(len(r) != self.tp for r in self.ranks):
            raise LoweringError(
                f"{p}: expected {self.dp} replicas of {self.tp} ranks, got {[len(r) for r in self.ranks]}"
            )
        if self.recompute not in RECOMPUTE:
            raise LoweringError(
                f"{p}: recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}"
            )
        if self.shard not in SHARDING:
            raise LoweringError(f"{p}: shard must be one of {', '.join(SHARDING)}, got {self.shard!r}")

    @property
    def all_ranks(self) -> tuple[int, ...]:
        """Every rank of the stage, replica-major."""
        return tuple(x for rep in self.ranks for x in rep)

    def dp_group(self, t: int) -> tuple[int, ...]:
        """The ranks of tensor-parallel rank ``t`` in every replica (the data-parallel group of ``t``)."""
        return tuple(rep[t] for rep in self.ranks)


@dataclass(frozen=True, slots=True)
class Placement:
    """What one rank does for one stage: replica ``replica``, tensor-parallel rank ``tp_rank``."""

    stage: int
    replica: int
    tp_rank: int


@dataclass(frozen=True, slots=True)
class Action:
    """One unit of a rank's schedule: the forward (``F``) or backward (``B``) of ``microbatch`` on ``stage``
    (over every chunk the rank's replica owns)."""

    kind: Literal["F", "B"]
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


@dataclass(frozen=True, slots=True, order=True)
class Message:
    """One point-to-point transfer of one chunk's boundary values.

    ``kind`` ``act`` carries the outputs of stage ``boundary`` to stage ``boundary + 1``; ``grad`` carries the
    gradients of those values back. ``seq`` is the message's position in the global send order (what both
    ends use to match messages between a pair of ranks)."""

    seq: int
    kind: str
    boundary: int
    microbatch: int
    chunk: int
    src: int
    dst: int


@dataclass(frozen=True)
class ParallelLayout:
    """The whole run of a plan: stages, chunks, schedule order and transfers (see the module notes).

    Attributes:
        stages: the stages, in pipeline order.
        num_microbatches: ``M``.
        microbatch: ``b``, rows of one microbatch over all replicas of a stage.
        schedule: ``gpipe``, ``1f1b`` or ``interleaved-1f1b``.
        world_size: ranks in the plan.
    """

    stages: tuple[StageSpec, ...]
    num_microbatches: int
    microbatch: int
    schedule: str
    world_size: int

    def __post_init__(self) -> None:
        if not self.stages:
            raise LoweringError("a plan needs at least one stage")
        if self.schedule not in SCHEDULES:
            raise LoweringError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.num_microbatches < 1 or self.microbatch < 1:
            raise LoweringError(
                f"num_microbatches and microbatch size must be >= 1, got {self.num_microbatches}, {self.microbatch}"
            )
        for s in self.stages:
            if self.microbatch % s.dp:
                raise LoweringError(
                    f"stage {s.index} has dp={s.dp}, which does not divide the microbatch of {self.microbatch} "
                    f"rows (remainder {self.microbatch % s.dp})"
                )
        # Every dp_s divides b, so their lcm (the chunk count) does too.
        seen: dict[int, int] = {}
        for s in self.stages:
            for x in s.all_ranks:
                if not 0 <= x < self.world_size:
                    raise LoweringError(
                        f"stage {s.index} uses rank {x}, outside the world of {self.world_size}"
                    )
                if x in seen and self.stages[seen[x]].ranks != s.ranks:
                    raise LoweringError(
                        f"stages {seen[x]} and {s.index} share rank {x} but not all their ranks "
                        f"({list(self.stages[seen[x]].all_ranks)} vs {list(s.all_ranks)}); stages on one device "
                        "group must use the same devices in the same order"
                    )
                if x in seen and self.schedule != "interleaved-1f1b":
                    raise LoweringError(
                        f"schedule {self.schedule!r} needs one device group per stage, but stages {seen[x]} and "
                        f"{s.index} share rank {x}"
                    )
                seen.setdefault(x, s.index)
        for i in range(len(self.stages) - 1):
            if set(self.stages[i].all_ranks) & set(self.stages[i + 1].all_ranks):
                raise LoweringError(
                    f"consecutive stages {i} and {i + 1} share ranks; a stage cannot send to itself"
                )
        missing = sorted(set(range(self.world_size)) - set(seen))
        if missing:
            raise LoweringError(f"ranks {missing} run no stage of the plan")

    # ------------------------------------------------------------------ chunks
    @cached_property
    def chunks(self) -> int:
        """``L``: chunks per microbatch (see [Note: chunks])."""
        return math.lcm(*(s.dp for s in self.stages))

    @property
    def chunk_rows(self) -> int:
        """``g``: rows of one chunk; every stage program runs at this batch size."""
        return self.microbatch // self.chunks

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def chunks_of(self, stage: int, replica: int) -> range:
        """The chunks of every microbatch that replica ``replica`` of ``stage`` computes."""
        per = self.chunks // self.stages[stage].dp
        return range(replica * per, (replica + 1) * per)

    def replica_of_chunk(self, stage: int, chunk: int) -> int:
        return chunk // (self.chunks // self.stages[stage].dp)

    def rows_of(self, stage: int, replica: int) -> list[tuple[int, int]]:
        """The rows of the global batch (``M * b`` rows) the replica computes, as ``[start, stop)`` runs in the
        order it computes them (microbatch-major)."""
        g = self.chunk_rows
        cs = self.chunks_of(stage, replica)
        return [
            (k * self.microbatch + cs.start * g, k * self.microbatch + cs.stop * g)
            for k in range(self.num_microbatches)
        ]

    # ------------------------------------------------------------------ ranks
    @cached_property
    def placements(self) -> dict[int, tuple[Placement, ...]]:
        """``rank -> what it runs``: one placement per stage it holds (several under interleaved 1F1B)."""
        out: dict[int, list[Placement]] = {}
        for s in self.stages:
            for r, rep in enumerate(s.ranks):
                for t, x in enumerate(rep):
                    out.setdefault(x, []).append(Placement(s.index, r, t))
        return {k: tuple(v) for k, v in out.items()}

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(p.stage for p in self.placements.get(rank, ()))

    def placement(self, rank: int, stage: int) -> Placement:
        for p in self.placements.get(rank, ()):
            if p.stage == stage:
                return p
        raise LoweringError(f"rank {rank} does not run stage {stage}")

    @property
    def stage_ranks(self) -> tuple[tuple[int, ...], ...]:
        """``stage_ranks[s]`` = every rank of stage ``s``, replica-major."""
        return tuple(s.all_ranks for s in self.stages)

    @property
    def pipeline_ranks(self) -> tuple[tuple[int, ...], ...]:
        """For each chunk ``c``, the tensor-parallel rank 0 of the replica holding ``c`` at every pipeline
        position (with one dp and tp 1 everywhere: the ranks of each replica's pipeline)."""
        positions = self.positions
        return tuple(
            tuple(self.stages[p].ranks[self.replica_of_chunk(p, c)][0] for p in range(positions))
            for c in range(self.chunks)
        )

    @property
    def positions(self) -> int:
        """Distinct device groups along the pipeline (``num_stages`` unless interleaved)."""
        return len(dict.fromkeys(s.ranks for s in self.stages))

    @property
    def dp(self) -> int:
        """The largest data-parallel degree of any stage."""
        return max(s.dp for s in self.stages)

    # ------------------------------------------------------------------ transfers
    def forward_lanes(self, boundary: int) -> list[tuple[int, int]]:
        """``(sender tp rank, receiver tp rank)`` pairs of activations across ``boundary`` (see [Note:
        tensor-parallel lanes])."""
        a, b = self.stages[boundary].tp, self.stages[boundary + 1].tp
        return [(t % a, t) for t in range(b)]

    def backward_lanes(self, boundary: int) -> list[tuple[int, int]]:
        """``(receiver tp rank, sender tp rank)`` pairs of gradients across ``boundary``: the gradient goes from
        the first (on stage ``boundary + 1``) to the second (on stage ``boundary``)."""
        a, b = self.stages[boundary].tp, self.stages[boundary + 1].tp
        return [(t % b, t) for t in range(a)]

    def activation_sends(self, boundary: int, chunk: int) -> list[tuple[int, int]]:
        """``(src rank, dst rank)`` of chunk ``chunk``'s activations across ``boundary``."""
        s, n = self.stages[boundary], self.stages[boundary + 1]
        ra, rb = self.replica_of_chunk(boundary, chunk), self.replica_of_chunk(boundary + 1, chunk)
        return [(s.ranks[ra][ta], n.ranks[rb][tb]) for ta, tb in self.forward_lanes(boundary)]

    def gradient_sends(self, boundary: int, chunk: int) -> list[tuple[int, int]]:
        """``(src rank, dst rank)`` of chunk ``chunk``'s boundary gradients (from stage ``boundary + 1`` back)."""
        s, n = self.stages[boundary], self.stages[boundary + 1]
        ra, rb = self.replica_of_chunk(boundary, chunk), self.replica_of_chunk(boundary + 1, chunk)
        return [(n.ranks[rb][tb], s.ranks[ra][ta]) for tb, ta in self.backward_lanes(boundary)]

    # ------------------------------------------------------------------ schedule
    @cached_property
    def global_order(self) -> tuple[tuple[Action, ...], ...]:
        """The simulated schedule: the actions taken at each unit time step (see [Note: schedule order])."""
        return tuple(_simulate(self))

    def actions(self, rank: int) -> list[Action]:
        """This rank's actions, in the order it runs them."""
        mine = set(self.stages_of(rank))
        return [a for step in self.global_order for a in step if a.stage in mine]

    @cached_property
    def messages(self) -> tuple[Message, ...]:
        """Every transfer of one iteration, numbered in the global send order."""
        out: list[Message] = []
        last = self.num_stages - 1
        for step in self.global_order:
            for a in step:
                if a.kind == "F" and a.stage < last:
                    for c in range(self.chunks):
                        for src, dst in self.activation_sends(a.stage, c):
                            out.append(Message(len(out), "act", a.stage, a.microbatch, c, src, dst))
                elif a.kind == "B" and a.stage > 0:
                    for c in range(self.chunks):
                        for src, dst in self.gradient_sends(a.stage - 1, c):
                            out.append(Message(len(out), "grad", a.stage - 1, a.microbatch, c, src, dst))
        return tuple(out)

    def incoming(self, rank: int) -> dict[int, list[Message]]:
        """``peer -> messages this rank receives from it``, in the peer's send order."""
        out: dict[int, list[Message]] = {}
        for m in self.messages:
            if m.dst == rank:
                out.setdefault(m.src, []).append(m)
        return out

    def peers(self, rank: int) -> list[int]:
        """The ranks this rank exchanges point-to-point messages with."""
        return sorted(
            {m.dst for m in self.messages if m.src == rank} | {m.src for m in self.messages if m.dst == rank}
        )

    def p2p_pairs(self) -> list[tuple[int, int]]:
        """Every unordered pair of ranks that exchange messages, sorted."""
        return sorted({(min(m.src, m.dst), max(m.src, m.dst)) for m in self.messages})

    def describe(self) -> str:
        """One line per stage: ranks, degrees, chunks and options (for logs and errors)."""
        lines = [
            f"{self.schedule}, {self.num_microbatches} microbatches of {self.microbatch} rows, "
            f"{self.chunks} chunk(s) of {self.chunk_rows} rows"
        ]
        for s in self.stages:
            lines.append(
                f"stage {s.index} [{s.start}:{s.end}) dp{s.dp} tp{s.tp} ranks {[list(r) for r in s.ranks]} "
                f"recompute={s.recompute} shard={s.shard}"
            )
        return "\n".join(lines)


def _simulate(layout: ParallelLayout) -> Iterator[tuple[Action, ...]]:
    """Unit-time simulation of the schedule (see [Note: schedule order])."""
    n, m = layout.num_stages, layout.num_microbatches
    actors: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for spec in layout.stages:
        actors.setdefault(spec.ranks, []).append(spec.index)
    fwd = [0] * n  # next microbatch to forward, per stage
    bwd = [0] * n  # next microbatch to backward, per stage
    done_f: set[tuple[int, int]] = set()
    done_b: set[tuple[int, int]] = set()
    gpipe = layout.schedule == "gpipe"

    def f_ready(s: int) -> bool:
        k = fwd[s]
        if k >= m or (s > 0 and (s - 1, k) not in done_f):
            return False
        return gpipe or fwd[s] - bwd[s] < n - s

    def b_ready(s: int) -> bool:
        k = bwd[s]
        if k >= m or (s, k) not in done_f:
            return False
        if s < n - 1 and (s + 1, k) not in done_b:
            return False
        if gpipe:
            # Every forward of this actor first.
            return all(fwd[x] >= m for x in actors[layout.stages[s].ranks])
        return True

    total = 2 * n * m
    taken = 0
    while taken < total:
        step: list[Action] = []
        for stages in actors.values():
            b_cands = [s for s in stages if b_ready(s)]
            f_cands = [s for s in stages if f_ready(s)]
            act: Action | None = None
            if b_cands and not gpipe:
                i = max(b_cands, key=lambda x: (-bwd[x], x))  # earliest microbatch, deeper stage first
                act = Action("B", i, bwd[i])
            elif f_cands:
                i = min(f_cands, key=lambda x: (fwd[x], -x))  # earliest microbatch, deeper stage first
                act = Action("F", i, fwd[i])
            elif b_cands:
                i = max(b_cands, key=lambda x: (-bwd[x], x))
                act = Action("B", i, bwd[i])
            if act is not None:
                step.append(act)
        if not step:
            raise LoweringError(
                f"the {layout.schedule} schedule stalls after {taken} of {total} actions "
                f"(forwards done per stage {fwd}, backwards {bwd}); this is a bug in the schedule simulation"
            )
        for a in step:
            if a.kind == "F":
                done_f.add((a.stage, a.microbatch))
                fwd[a.stage] += 1
            else:
                done_b.add((a.stage, a.microbatch))
                bwd[a.stage] += 1
        taken += len(step)
        yield tuple(step)


def _global_microbatch(plan: Any) -> int:
    """``b``, rows of one microbatch over all replicas of a stage (plan schema 2's ``microbatch_size``)."""
    return int(plan.microbatch_size)


def _recompute_of(stage: Any) -> str:
    v = getattr(stage, "recompute", "none")
    if isinstance(v, bool):  # schema 1
        return "full" if v else "none"
    return str(v)


def layout_of(plan: Any) -> ParallelLayout:
    """The :class:`ParallelLayout` of a :class:`~distplan.plan.Plan` (schema 1 or 2).

    Raises:
        LoweringError: a device without a rank, degrees that do not divide the microbatch, stages that share
            some but not all devices, an unknown schedule or option.
    """
    rank_of_device = {r.device: r.rank for r in plan.rank_map}
    specs = []
    for s in plan.stages:
        dp, tp = int(s.dp), int(getattr(s, "tp", 1))
        if len(s.devices) != dp * tp:
            raise LoweringError(f"stage {s.index} has {len(s.devices)} devices but dp*tp = {dp * tp}")
        try:
            ranks = tuple(tuple(rank_of_device[s.devices[r * tp + t]] for t in range(tp)) for r in range(dp))
        except KeyError as e:
            raise LoweringError(
                f"stage {s.index} uses device {e.args[0]}, which has no rank in the plan's rank map"
            ) from None
        specs.append(
            StageSpec(
                index=int(s.index),
                start=int(s.start),
                end=int(s.end),
                dp=dp,
                tp=tp,
                ranks=ranks,
                recompute=_recompute_of(s),
                shard=str(getattr(s, "shard", "none")),
            )
        )
    return ParallelLayout(
        stages=tuple(specs),
        num_microbatches=int(plan.num_microbatches),
        microbatch=_global_microbatch(plan),
        schedule=str(plan.schedule),
        world_size=len(plan.rank_map),
    )


def lcm(values: Sequence[int]) -> int:
    """Least common multiple of positive integers."""
    return math.lcm(*values)
