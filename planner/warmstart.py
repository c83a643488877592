"""Warm starts for the integer program: a greedy fill (:func:`greedy`) and a local search from it
(:func:`improve`), both on one candidate's integer data and priced by :func:`~distplan.planner.problem.
int_objective`. They give CP-SAT its hint and, on models too large for CP-SAT, the plan itself.

[Note: the greedy fill]
A *shape* is a stage's ``(dp, tp)``; a *recipe* gives every pool one shape, so the pool offers
``devices // (dp * tp)`` groups. For a recipe and an order of the pools (the device kinds fastest first or
slowest first, hosts kept together; or the largest memory first), :func:`greedy` binary-searches the smallest bottleneck
``T`` a left-to-right fill reaches: each group in turn takes the longest range whose time, round trip to the
next group and memory fit, choosing among the group's recomputation and sharding variants the one that
reaches farthest (the fastest where several do). Recipes: for every stage size ``n`` the options offer, each
pool runs its fastest shape of ``n`` devices (of the most it has below ``n`` when it has fewer), so the
greedy tries pipelines of single devices, of pairs, ... up to whole hosts.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .ilp import StageProblem, StageSlot
from .problem import cut_times, int_objective, stage_terms

__all__ = ["WarmStart", "greedy", "improve"]

#: Relative precision of the greedy's binary search on the bottleneck (the local search refines it): first
#: every recipe and order to ``_COARSE_PRECISION``, then the ``_REFINE_TOP`` best to ``_SEARCH_PRECISION``.
_SEARCH_PRECISION = 1e-4
_COARSE_PRECISION = 2e-2
_REFINE_TOP = 2
#: Recipes (the best in the first order) tried in every order of the pools.
_ORDER_TOP = 2


@dataclass(frozen=True, slots=True)
class WarmStart:
    """A feasible solution of one candidate's integer program: its objective (integer time units) and its
    stages in pipeline order."""

    objective: int
    stages: tuple[StageSlot, ...]


class _Fill:
    """Per-option arrays the fill reads, built once per problem."""

    def __init__(self, p: StageProblem) -> None:
        self.p = p
        self.tfb = [
            [f + b for f, b in zip(fp, bp, strict=True)]
            for fp, bp in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
        ]
        self._rooms: dict[tuple[int, int, int, int], list[int]] = {}
        self._trips: dict[tuple[int, int, int], list[int]] = {}
        self._by_option: dict[tuple[int, int], list[int]] = {}

    def room(self, oi: int, v: int) -> list[int]:
        """Prefix of the memory option ``oi`` holds with ``v`` microbatches in flight (inputs and constants
        apart)."""
        hit = self._by_option.get((oi, v))
        if hit is not None:
            return hit
        o = self.p.options[oi]
        key = (o.state, o.act, o.once, v)
        hit = self._rooms.get(key)
        if hit is None:
            p = self.p
            hit = list(p.mem_prefix[o.state])
            if o.act >= 0:
                hit = [x + v * a for x, a in zip(hit, p.act_prefix[o.act], strict=True)]
            if o.once >= 0:
                hit = [x + a for x, a in zip(hit, p.act_prefix[o.once], strict=True)]
            self._rooms[key] = hit
        self._by_option[oi, v] = hit
        return hit

    def reach(self, oi: int, a: int, limit: int, v: int, next_oi: int | None) -> int:
        """The farthest end ``e > a`` (or ``a`` if none) a stage from ``a`` run as ``oi`` reaches with time plus
        round trip to a stage run as ``next_oi`` within ``limit`` and memory within its pool's capacity."""
        p = self.p
        o = p.options[oi]
        nb = p.num_blocks
        pre = self.tfb[o.time]
        const = o.fwd_const + o.bwd_const
        e = bisect.bisect_right(pre, pre[a] + limit - const) - 1
        r = self.room(oi, v)
        cap = p.pools[o.pool].cap_kib - o.extra_kib
        if o.inputs >= 0:
            cap -= v * p.input_kib[o.inputs][a]
        e = min(e, bisect.bisect_right(r, r[a] + cap) - 1, nb)
        # Copies of shared parameters whose first reader lies before the stage (ilp (j)).
        while p.shared and e > a and r[e] - r[a] + _copies_kib(p, a, e) > cap:
            e -= 1
        if p.schedule == "1f1b" and next_oi is not None:
            # Leave room for this stage's round trip to the next one (it rides on the bottleneck).
            rt = self.round_trip(oi, next_oi)
            while a < e < nb and pre[e] - pre[a] + const + rt[e] > limit:
                e -= 1
        return e

    def round_trip(self, oi: int, next_oi: int) -> list[int]:
        """Per boundary, the round trip between a stage run as ``oi`` and the next run as ``next_oi``."""
        p = self.p
        a, b = p.options[oi], p.options[next_oi]
        pa, pb = p.pools[a.pool], p.pools[b.pool]
        lk = pa.link if pa.host == pb.host else p.net_link
        key = (lk, a.comm, b.comm)
        hit = self._trips.get(key)
        if hit is None:
            f = p.transfers[p.comm_fwd[lk][a.comm][b.comm]]
            bw = p.transfers[p.comm_bwd[lk][a.comm][b.comm]]
            hit = [x + y for x, y in zip(f, bw, strict=True)]
            self._trips[key] = hit
        return hit


def _copies_kib(p: StageProblem, a: int, e: int) -> int:
    """KiB of shared-parameter copies a stage over blocks ``[a, e)`` holds beyond ``mem_prefix``."""
    return sum(sh.mem_kib for sh in p.shared if sh.blocks[0] < a and any(a <= b < e for b in sh.blocks))


def _recipes(p: StageProblem) -> list[dict[int, tuple[int, int]]]:
    """Shapes per pool to try (see [Note: the greedy fill])."""
    shapes: dict[int, dict[tuple[int, int], int]] = {}
    for o in p.options:
        # The shape's speed: its fastest variant's whole-model time.
        t = p.fwd_prefix[o.time][-1] + p.bwd_prefix[o.time][-1] + o.fwd_const + o.bwd_const
        cur = shapes.setdefault(o.pool, {})
        key = (o.dp, o.tp)
        cur[key] = min(cur.get(key, t), t)
    sizes = sorted({dp * tp for sh in shapes.values() for dp, tp in sh})
    out = []
    for n in sizes:
        recipe = {}
        for pool, sh in shapes.items():
            fit = [s for s in sh if s[0] * s[1] <= n]
            if not fit:
                continue
            most = max(s[0] * s[1] for s in fit)
            recipe[pool] = min((s for s in fit if s[0] * s[1] == most), key=lambda s: (sh[s], s))
        if recipe and recipe not in out:
            out.append(recipe)
    return out


def greedy(p: StageProblem) -> WarmStart | None:
    """A quick feasible solution (see [Note: the greedy fill]), the best over every recipe and order of the
    pools; None when no fill fits memory."""
    nb = p.num_blocks
    fill_data = _Fill(p)
    variants: dict[tuple[int, int, int], list[int]] = {}
    for oi, o in enumerate(p.options):
        variants.setdefault((o.pool, o.dp, o.tp), []).append(oi)
    # Pools by speed of their kind (the whole model on the pool's fastest single-device option).
    speed: dict[int, int] = {}
    for o in p.options:
        t = p.fwd_prefix[o.time][-1] + p.bwd_prefix[o.time][-1]
        speed[p.pools[o.pool].kind] = min(speed.get(p.pools[o.pool].kind, t), t)
    kinds = sorted(speed, key=lambda k: (speed[k], k))
    # Kinds fastest first and slowest first (every order of two kinds); and the largest memory first.
    perms = [tuple(kinds), tuple(reversed(kinds))] if len(kinds) > 1 else [tuple(kinds)]
    pools = range(len(p.pools))
    orders = [
        sorted(pools, key=lambda pi, pm=pm: (pm.index(p.pools[pi].kind), p.pools[pi].host, pi))  # type: ignore[misc]
        for pm in perms
    ]
    orders.append(sorted(pools, key=lambda pi: (-p.pools[pi].cap_kib, kinds.index(p.pools[pi].kind), pi)))

    def fill(slots: list[list[int]], limit: int, n_guess: int) -> list[StageSlot] | None:
        out: list[StageSlot] = []
        a = 0
        for s, opts in enumerate(slots):
            if a == nb:
                break
            v = p.microbatches if p.schedule == "gpipe" else max(1, min(n_guess - s, p.microbatches))
            nxt = slots[s + 1][0] if s + 1 < len(slots) else None
            best_e, best_oi, best_t = a, -1, 0
            for oi in opts:
                e = fill_data.reach(oi, a, limit, v, nxt)
                if e <= a:
                    continue
                t = fill_data.tfb[p.options[oi].time][e] - fill_data.tfb[p.options[oi].time][a]
                if e > best_e or (e == best_e and t < best_t):
                    best_e, best_oi, best_t = e, oi, t
            if best_oi < 0:
                return None
            out.append(StageSlot(a, best_e, best_oi))
            a = best_e
        return out if a == nb else None

    hi0 = max(x[-1] for x in fill_data.tfb) * 2 + max(max(t) for t in p.transfers) * 2 + 1
    hi0 += max(o.fwd_const + o.bwd_const for o in p.options)

    def search(
        slots: list[list[int]], lo: int, hi: int, precision: float
    ) -> tuple[int, int, WarmStart] | None:
        """Binary search on the bottleneck down to ``precision``: (lo, hi, the solution at hi)."""

        def feasible(limit: int) -> list[StageSlot] | None:
            sol = fill(slots, limit, len(slots))
            if sol is not None:
                tighter = fill(slots, limit, len(sol))
                for c in (tighter, sol):
                    if c is not None and int_objective(p, c) is not None:
                        return c
            return None

        if feasible(hi) is None:
            return None
        while hi - lo > max(1, int(hi * precision)):
            mid = (lo + hi) // 2
            if feasible(mid) is not None:
                hi = mid
            else:
                lo = mid + 1
        sol = feasible(hi)
        obj = int_objective(p, sol) if sol is not None else None
        if sol is None or obj is None:
            return None
        return lo, hi, WarmStart(obj, tuple(sol))

    # Every recipe and order coarsely, then the most promising few finely (the same answer for far less
    # work: the fill's objective hardly moves within the coarse bracket).
    coarse: list[tuple[int, int, int, int, int, list[list[int]], WarmStart]] = []

    def try_recipe(ri: int, recipe: dict[int, tuple[int, int]], oi: int) -> None:
        slots: list[list[int]] = []
        for pi in orders[oi]:
            if pi not in recipe:
                continue
            dp, tp = recipe[pi]
            count = p.pools[pi].devices // (dp * tp)
            slots += [variants[pi, dp, tp]] * count
        slots = slots[: p.max_stages]
        if not slots:
            return
        found = search(slots, 0, hi0, _COARSE_PRECISION)
        if found is not None:
            lo, hi, warm = found
            coarse.append((warm.objective, ri, oi, lo, hi, slots, warm))

    # Every recipe in the first order, then every order for the recipes that did best (each order alone
    # rarely changes which recipe wins, and the orders cost as much as the recipes).
    recipes = _recipes(p)
    for ri, recipe in enumerate(recipes):
        try_recipe(ri, recipe, 0)
    for ri in sorted({c[1] for c in sorted(coarse, key=lambda c: c[:3])[:_ORDER_TOP]}):
        for oi in range(1, len(orders)):
            try_recipe(ri, recipes[ri], oi)
    coarse.sort(key=lambda c: c[:3])
    best: WarmStart | None = None
    for _, _, _, lo, hi, slots, warm in coarse[:_REFINE_TOP]:
        fine = search(slots, lo, hi, _SEARCH_PRECISION)
        for w in (warm, fine[2] if fine else None):
            if w is not None and (best is None or w.objective < best.objective):
                best = w
    return best


def _spread(p: StageProblem, stages: Sequence[StageSlot]) -> int:
    """Sum of squared per-stage loads (compute + round trip): the local search's tie-breaker, so it can walk
    across plateaus of the bottleneck (several stages at the maximum) towards a lower maximum."""
    out = 0
    for s, (a, e, oi) in enumerate(stages):
        t = stage_terms(p, a, e, oi, 1)
        load = t.fwd + t.bwd
        if s + 1 < len(stages):
            load += sum(cut_times(p, e, oi, stages[s + 1][2]))
        out += load * load
    return out


def improve(p: StageProblem, start: WarmStart, rounds: int = 200) -> WarmStart:
    """Local search from a feasible solution, first improvement of (objective, :func:`_spread`): move a
    stage boundary by up to 3 blocks, swap the options of two neighbouring stages, merge two neighbouring
    stages, run a stage another way on its devices (another recomputation or sharding), move a stage to an
    option with free devices, or split a stage onto free devices."""
    obj, stages = start.objective, list(start.stages)
    key = (obj, _spread(p, stages))
    variants: dict[tuple[int, int, int], list[int]] = {}
    by_pool: dict[int, list[int]] = {}
    same_config: dict[int, dict[tuple[int, int, str, str], list[int]]] = {}
    for oi, o in enumerate(p.options):
        variants.setdefault((o.pool, o.dp, o.tp), []).append(oi)
        by_pool.setdefault(o.pool, []).append(oi)
        same_config.setdefault(o.pool, {}).setdefault((o.dp, o.tp, o.recompute, o.shard), []).append(oi)
    signature: dict[tuple[int, int, int, int], list[int]] = {}
    for pi, q in enumerate(p.pools):
        signature.setdefault((q.kind, q.devices, q.cap_kib, q.link), []).append(pi)
    classes = list(signature.values())

    def moves(st: list[StageSlot]) -> Iterator[list[StageSlot]]:
        n = len(st)
        free = [q.devices for q in p.pools]
        for _, _, oi in st:
            free[p.options[oi].pool] -= p.options[oi].size
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
            o = p.options[g]
            for oi in variants[o.pool, o.dp, o.tp]:
                if oi != g:
                    yield [*st[:s], StageSlot(a, e, oi), *st[s + 1 :]]
        for s in range(n):
            a, e, g = st[s]
            o = p.options[g]
            # Other shapes on the stage's own pool; the same way to run on another pool (one per class of
            # interchangeable pools, the first with room: the others price alike).
            targets = [oi for oi in by_pool[o.pool] if (p.options[oi].dp, p.options[oi].tp) != (o.dp, o.tp)]
            for pools in classes:
                for pi in pools:
                    if pi != o.pool and free[pi] >= o.size:
                        targets += same_config[pi].get((o.dp, o.tp, o.recompute, o.shard), [])
                        break
            for oi in targets:
                x = p.options[oi]
                room = free[x.pool] + (o.size if x.pool == o.pool else 0)
                if oi != g and x.size <= room:
                    yield [*st[:s], StageSlot(a, e, oi), *st[s + 1 :]]
                if e - a >= 2 and n < p.max_stages and x.size <= free[x.pool]:
                    mid = (a + e) // 2
                    yield [*st[:s], StageSlot(a, mid, g), StageSlot(mid, e, oi), *st[s + 1 :]]

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
