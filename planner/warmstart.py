"""Warm starts for the integer program: a greedy fill (:func:`greedy`) and a local search from it
(:func:`improve`), both on one candidate's integer data and priced by :func:`~distplan.planner.problem.
int_objective`. They give CP-SAT its hint and, on models too large for CP-SAT, the plan itself.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .ilp import StageProblem, StageSlot
from .problem import int_objective

__all__ = ["WarmStart", "greedy", "improve"]


@dataclass(frozen=True, slots=True)
class WarmStart:
    """A feasible solution of one candidate's integer program: its objective (integer time units) and its
    stages in pipeline order."""

    objective: int
    stages: tuple[StageSlot, ...]


def _copies_kib(p: StageProblem, a: int, e: int) -> int:
    """KiB of shared-parameter copies a stage over blocks ``[a, e)`` holds beyond ``mem_prefix``."""
    return sum(sh.mem_kib for sh in p.shared if sh.blocks[0] < a and any(a <= b < e for b in sh.blocks))


def greedy(p: StageProblem) -> WarmStart | None:
    """A quick feasible solution: order the groups (kinds in every order, hosts kept together; or largest
    memory first), binary-search the smallest bottleneck a left-to-right fill achieves, keep the order with
    the best objective (None when no order fits memory)."""
    nb = p.num_blocks
    tfb = [
        [f + b for f, b in zip(fp, bp, strict=True)]
        for fp, bp in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
    ]
    rooms: dict[int, list[int]] = {}

    def room(v: int) -> list[int]:
        if v not in rooms:
            rooms[v] = [m + v * a for m, a in zip(p.mem_prefix, p.act_prefix, strict=True)]
        return rooms[v]

    speed_rank = {k: i for i, k in enumerate(sorted(range(len(tfb)), key=lambda k: (tfb[k][-1], k)))}
    kinds = sorted({g.kind for g in p.groups}, key=lambda k: speed_rank[k])
    perms = list(itertools.permutations(kinds)) if len(kinds) <= 4 else [tuple(kinds)]
    orders = [
        sorted(
            range(len(p.groups)),
            key=lambda gi, pm=pm: (pm.index(p.groups[gi].kind), p.groups[gi].host, gi),  # type: ignore[misc]
        )
        for pm in perms
    ]
    orders.append(
        sorted(
            range(len(p.groups)), key=lambda gi: (-p.groups[gi].cap_kib, speed_rank[p.groups[gi].kind], gi)
        )
    )

    def fill(slots: list[int], limit: int, n_guess: int) -> list[StageSlot] | None:
        out: list[StageSlot] = []
        a = 0
        for s, gi in enumerate(slots):
            if a == nb:
                break
            g = p.groups[gi]
            pre = tfb[g.kind]
            e = bisect.bisect_right(pre, pre[a] + limit) - 1
            v = p.microbatches if p.schedule == "gpipe" else max(1, min(n_guess - s, p.microbatches))
            r = room(v)
            e = min(e, bisect.bisect_right(r, r[a] + g.cap_kib) - 1, nb)
            # Copies of shared parameters whose first reader lies before the stage (ilp (j)).
            while p.shared and e > a and r[e] - r[a] + _copies_kib(p, a, e) > g.cap_kib:
                e -= 1
            if p.schedule == "1f1b" and s + 1 < len(slots):
                # Leave room for this stage's round trip to the next one (it rides on the bottleneck).
                lk = g.link if p.groups[slots[s + 1]].host == g.host else p.net_link
                while a < e < nb and pre[e] - pre[a] + 2 * p.comm_prefix[lk][e] > limit:
                    e -= 1
            if e <= a:
                return None
            out.append(StageSlot(a, e, gi))
            a = e
        return out if a == nb else None

    best: WarmStart | None = None
    for order in orders:
        slots = [gi for gi in order for _ in range(p.groups[gi].count)][: p.max_stages]

        def feasible(limit: int, slots: list[int] = slots) -> list[StageSlot] | None:
            sol = fill(slots, limit, len(slots))
            if sol is not None:
                tighter = fill(slots, limit, len(sol))
                for c in (tighter, sol):
                    if c is not None and int_objective(p, c) is not None:
                        return c
            return None

        lo, hi = 0, int(max(x[-1] for x in tfb)) * 2 + 1
        if feasible(hi) is None:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if feasible(mid) is not None:
                hi = mid
            else:
                lo = mid + 1
        sol = feasible(hi)
        if sol is not None:
            obj = int_objective(p, sol)
            if obj is not None and (best is None or obj < best.objective):
                best = WarmStart(obj, tuple(sol))
    return best


def _spread(p: StageProblem, stages: Sequence[StageSlot]) -> int:
    """Sum of squared per-stage loads (compute + round trip): the local search's tie-breaker, so it can walk
    across plateaus of the bottleneck (several stages at the maximum) towards a lower maximum."""
    out = 0
    for s, (a, e, gi) in enumerate(stages):
        g = p.groups[gi]
        load = (
            p.fwd_prefix[g.kind][e]
            - p.fwd_prefix[g.kind][a]
            + p.bwd_prefix[g.kind][e]
            - p.bwd_prefix[g.kind][a]
        )
        if s + 1 < len(stages):
            lk = g.link if p.groups[stages[s + 1][2]].host == g.host else p.net_link
            load += 2 * p.comm_prefix[lk][e]
        out += load * load
    return out


def improve(p: StageProblem, start: WarmStart, rounds: int = 200) -> WarmStart:
    """Local search from a feasible solution, first improvement of (objective, :func:`_spread`): move a
    stage boundary by up to 3 blocks, swap the groups of two neighbouring stages, move a stage to another
    group type with a free group, split a stage onto a free group, or merge two neighbouring stages."""
    obj, stages = start.objective, list(start.stages)
    key = (obj, _spread(p, stages))

    def moves(st: list[StageSlot]) -> Iterator[list[StageSlot]]:
        n = len(st)
        used: dict[int, int] = {}
        for _, _, g in st:
            used[g] = used.get(g, 0) + 1
        free = [gi for gi, grp in enumerate(p.groups) if used.get(gi, 0) < grp.count]
        for s in range(n - 1):
            (a, e, g), (_, e2, g2) = st[s], st[s + 1]
            for delta in (-1, 1, -2, 2, -3, 3):
                if a < e + delta < e2:
                    yield [*st[:s], StageSlot(a, e + delta, g), StageSlot(e + delta, e2, g2), *st[s + 2 :]]
            if g != g2:
                yield [*st[:s], StageSlot(a, e, g2), StageSlot(e, e2, g), *st[s + 2 :]]
            for keep in (g, g2):
                yield [*st[:s], StageSlot(a, e2, keep), *st[s + 2 :]]
        for s in range(n):
            a, e, g = st[s]
            for gi in free:
                if gi != g:
                    yield [*st[:s], StageSlot(a, e, gi), *st[s + 1 :]]
                if e - a >= 2 and n < p.max_stages:
                    mid = (a + e) // 2
                    yield [*st[:s], StageSlot(a, mid, g), StageSlot(mid, e, gi), *st[s + 1 :]]

    for _ in range(rounds):
        improved = False
        for trial in moves(stages):
            val = int_objective(p, trial)
            if val is None or val > key[0]:
                continue
            k = (val, _spread(p, trial))
            if k < key:
                key, stages, improved = k, trial, True
                break
        if not improved:
            break
    return WarmStart(key[0], tuple(stages))
