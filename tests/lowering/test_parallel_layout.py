"""The layout of plans with per-stage (dp, tp) degrees, without processes: chunks, transfers, schedule order.

The executor trusts three properties of :class:`ParallelLayout`, checked here on hand-picked and on random
layouts: every row of a microbatch is computed exactly once per stage, every receiver gets each value it
needs exactly once (and every sender the gradients of what it sent), and the per-rank orders cannot
deadlock when sends do not block and receives do (simulated message by message).
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distplan.errors import LoweringError
from distplan.lowering.parallel import ParallelLayout, StageSpec


def _layout(degrees: list[tuple[int, int]], *, m: int, b: int, schedule: str = "1f1b") -> ParallelLayout:
    stages, rank = [], 0
    for i, (dp, tp) in enumerate(degrees):
        ranks = tuple(tuple(range(rank + r * tp, rank + (r + 1) * tp)) for r in range(dp))
        rank += dp * tp
        stages.append(StageSpec(index=i, start=i, end=i + 1, dp=dp, tp=tp, ranks=ranks))
    return ParallelLayout(tuple(stages), num_microbatches=m, microbatch=b, schedule=schedule, world_size=rank)


def _simulate(lay: ParallelLayout) -> None:
    """Run every rank's program with blocking receives and non-blocking sends; fail on a deadlock."""
    last = lay.num_stages - 1
    programs = {}
    for rank in range(lay.world_size):
        prog = []
        for a in lay.actions(rank):
            if a.kind == "F":
                recv = [
                    m
                    for m in lay.messages
                    if m.kind == "act"
                    and m.boundary == a.stage - 1
                    and m.microbatch == a.microbatch
                    and m.dst == rank
                ]
                send = [
                    m
                    for m in lay.messages
                    if m.kind == "act"
                    and m.boundary == a.stage
                    and m.microbatch == a.microbatch
                    and m.src == rank
                ]
            else:
                recv = [
                    m
                    for m in lay.messages
                    if m.kind == "grad"
                    and m.boundary == a.stage
                    and m.microbatch == a.microbatch
                    and m.dst == rank
                ]
                send = [
                    m
                    for m in lay.messages
                    if m.kind == "grad"
                    and m.boundary == a.stage - 1
                    and m.microbatch == a.microbatch
                    and m.src == rank
                ]
            if (a.stage == 0 and a.kind == "F") or (a.stage == last and a.kind == "B"):
                assert not recv
            prog.append((recv, send))
        programs[rank] = prog
    sent: set[int] = set()
    pos = dict.fromkeys(programs, 0)
    while any(pos[r] < len(programs[r]) for r in programs):
        progressed = False
        for r, prog in programs.items():
            while pos[r] < len(prog) and all(m.seq in sent for m in prog[pos[r]][0]):
                sent |= {m.seq for m in prog[pos[r]][1]}
                pos[r] += 1
                progressed = True
        assert progressed, f"deadlock at {pos}"
    assert sent == {m.seq for m in lay.messages}


def _check(lay: ParallelLayout) -> None:
    m, n_chunks = lay.num_microbatches, lay.chunks
    # Every chunk of every stage is owned by exactly one replica; replicas own their rows.
    for s in lay.stages:
        owned = sorted(c for r in range(s.dp) for c in lay.chunks_of(s.index, r))
        assert owned == list(range(n_chunks))
        rows = sorted(x for r in range(s.dp) for lo, hi in lay.rows_of(s.index, r) for x in range(lo, hi))
        assert rows == list(range(m * lay.microbatch))
        for r in range(s.dp):
            # Replica r of stage s computes rows [r b/dp, (r+1) b/dp) of every microbatch (plan schema 2).
            per = lay.microbatch // s.dp
            assert lay.rows_of(s.index, r)[0] == (r * per, (r + 1) * per)
    # Each receiver tp rank gets every chunk's activations once; each sender tp rank every gradient once.
    for i in range(lay.num_stages - 1):
        a, b = lay.stages[i], lay.stages[i + 1]
        for c in range(n_chunks):
            acts = lay.activation_sends(i, c)
            rb = lay.replica_of_chunk(i + 1, c)
            assert sorted(dst for _, dst in acts) == sorted(b.ranks[rb])
            ra = lay.replica_of_chunk(i, c)
            assert all(src in a.ranks[ra] for src, _ in acts)
            grads = lay.gradient_sends(i, c)
            assert sorted(dst for _, dst in grads) == sorted(a.ranks[ra])
            assert all(src in b.ranks[rb] for src, _ in grads)
    # Each stage runs each microbatch's forward before its backward, each exactly once, in every rank's
    # order; 1F1B keeps at most S - s microbatches in flight on stage s.
    for rank in range(lay.world_size):
        acts = lay.actions(rank)
        for s in lay.stages_of(rank):
            fs = [x.microbatch for x in acts if x.stage == s and x.kind == "F"]
            bs = [x.microbatch for x in acts if x.stage == s and x.kind == "B"]
            assert fs == list(range(m)) and bs == list(range(m))
            flight = 0
            for x in acts:
                if x.stage == s:
                    flight += 1 if x.kind == "F" else -1
                    assert flight >= 0
                    if lay.schedule != "gpipe":
                        assert flight <= lay.num_stages - s
    _simulate(lay)


@pytest.mark.parametrize(
    ("degrees", "m", "b", "schedule"),
    [
        ([(2, 1), (1, 2)], 2, 2, "1f1b"),  # the example: dp2 x tp1 then dp1 x tp2
        ([(1, 2), (1, 1), (1, 2)], 3, 1, "1f1b"),  # tp 2/1/2
        ([(2, 1), (3, 1), (1, 2)], 2, 6, "gpipe"),  # lcm(2, 3, 1) = 6 chunks
        ([(1, 1)], 4, 3, "gpipe"),  # one stage: no transfers at all
        ([(4, 1), (2, 2)], 4, 4, "1f1b"),
    ],
)
def test_layouts_cover_every_row_and_cannot_deadlock(
    degrees: list[tuple[int, int]], m: int, b: int, schedule: str
) -> None:
    lay = _layout(degrees, m=m, b=b, schedule=schedule)
    assert lay.chunks == math.lcm(*(dp for dp, _ in degrees))
    assert lay.chunk_rows * lay.chunks == b
    _check(lay)


def test_the_mixed_example_in_numbers() -> None:
    """Stage 0 dp2 x tp1 on ranks 0, 1; stage 1 dp1 x tp2 on ranks 2, 3; microbatch of 2 rows."""
    lay = _layout([(2, 1), (1, 2)], m=2, b=2)
    assert (lay.chunks, lay.chunk_rows) == (2, 1)
    # Chunk 0 (row 0) is computed by rank 0, chunk 1 by rank 1; both tensor-parallel ranks of stage 1 get
    # both chunks, and each sender gets its chunk's gradient from one of them.
    assert lay.activation_sends(0, 0) == [(0, 2), (0, 3)]
    assert lay.activation_sends(0, 1) == [(1, 2), (1, 3)]
    assert lay.gradient_sends(0, 0) == [(2, 0)]
    assert lay.gradient_sends(0, 1) == [(2, 1)]
    assert lay.pipeline_ranks == ((0, 2), (1, 2))
    assert lay.p2p_pairs() == [(0, 2), (0, 3), (1, 2), (1, 3)]


def test_interleaved_ranks_run_their_stages_in_one_order() -> None:
    stages = tuple(StageSpec(index=i, start=i, end=i + 1, dp=1, tp=1, ranks=((i % 2,),)) for i in range(4))
    lay = ParallelLayout(stages, num_microbatches=4, microbatch=1, schedule="interleaved-1f1b", world_size=2)
    assert lay.stages_of(0) == (0, 2) and lay.positions == 2
    _check(lay)


def test_bad_layouts_say_what_is_wrong() -> None:
    with pytest.raises(LoweringError, match=r"stage 1 has dp=3, which does not divide the microbatch of 2"):
        _layout([(1, 1), (3, 1)], m=1, b=2)
    a = StageSpec(index=0, start=0, end=1, dp=1, tp=2, ranks=((0, 1),))
    b = StageSpec(index=1, start=1, end=2, dp=1, tp=2, ranks=((1, 2),))
    with pytest.raises(LoweringError, match="share rank 1 but not all their ranks"):
        ParallelLayout((a, b), num_microbatches=1, microbatch=1, schedule="gpipe", world_size=3)
    with pytest.raises(LoweringError, match="recompute must be one of none, selective, full, got 'some'"):
        StageSpec(index=0, start=0, end=1, dp=1, tp=1, ranks=((0,),), recompute="some")
    with pytest.raises(LoweringError, match="expected 2 replicas of 1 ranks"):
        StageSpec(index=0, start=0, end=1, dp=2, tp=1, ranks=((0,),))
    with pytest.raises(LoweringError, match="ranks \\[2\\] run no stage"):
        ParallelLayout(
            (StageSpec(index=0, start=0, end=1, dp=1, tp=2, ranks=((0, 1),)),),
            num_microbatches=1,
            microbatch=1,
            schedule="gpipe",
            world_size=3,
        )


@settings(max_examples=40, deadline=None)
@given(
    degrees=st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 4]), st.sampled_from([1, 2, 3])), min_size=1, max_size=4
    ),
    m=st.integers(1, 5),
    rows=st.integers(1, 2),
    schedule=st.sampled_from(["gpipe", "1f1b"]),
)
def test_random_layouts(degrees: list[tuple[int, int]], m: int, rows: int, schedule: str) -> None:
    chunks = math.lcm(*(dp for dp, _ in degrees))
    lay = _layout(degrees, m=m, b=rows * chunks, schedule=schedule)
    _check(lay)
    # Messages between a pair of ranks are numbered in the order the sender's program sends them.
    for rank in range(lay.world_size):
        order = [a for a in lay.actions(rank)]
        sends = [msg for msg in lay.messages if msg.src == rank]
        by_action = sorted(
            sends,
            key=lambda msg: order.index(
                next(
                    a
                    for a in order
                    if a.microbatch == msg.microbatch
                    and (
                        (msg.kind == "act" and a.kind == "F" and a.stage == msg.boundary)
                        or (msg.kind == "grad" and a.kind == "B" and a.stage == msg.boundary + 1)
                    )
                )
            ),
        )
        for peer, grp in itertools.groupby(sorted(by_action, key=lambda x: x.dst), key=lambda x: x.dst):
            seqs = [x.seq for x in grp]
            assert seqs == sorted(seqs), (rank, peer)
