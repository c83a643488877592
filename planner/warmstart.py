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
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .ilp import StageOption, StageProblem, StageSlot
from .problem import cut_times, int_objective, stage_terms

__all__ = ["WarmStart", "greedy", "improve"]

#: Relative precision of the greedy's binary search on the bottleneck (the local search refines it): first
#: every recipe and order to ``_COARSE_PRECISION``, then the ``_REFINE_TOP`` best to ``_SEARCH_PRECISION``.
_SEARCH_PRECISION = 1e-4
_COARSE_PRECISION = 2e-2
_REFINE_TOP = 2
#: At most this many fills are refined in all (those whose coarse bracket may still win; see ``greedy``).
_REFINE_MOST = 8
#: Sequences of stage options the local search re-cuts by binary search at its local optima (see ``improve``).
_BALANCE_LIMIT = 48
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

    @property
    def hi0(self) -> int:
        """A bottleneck every fill reaches if any does (the binary search's upper end)."""
        p = self.p
        hi = max(x[-1] for x in self.tfb) * 2 + max(max(t) for t in p.transfers) * 2 + 1
        return hi + max(o.fwd_const + o.bwd_const for o in p.options)

    def fill(self, slots: Sequence[Sequence[int]], limit: int, n_guess: int) -> list[StageSlot] | None:
        """Left to right, each slot's stage takes the longest range within ``limit`` (time plus round trip,
        and memory with ``n_guess`` stages in all), as the slot's option that reaches farthest (the fastest
        where several do); None when the blocks are not all covered."""
        p = self.p
        nb = p.num_blocks
        out: list[StageSlot] = []
        a = 0
        for s, opts in enumerate(slots):
            if a == nb:
                break
            v = p.microbatches if p.schedule == "gpipe" else max(1, min(n_guess - s, p.microbatches))
            nxt = slots[s + 1][0] if s + 1 < len(slots) else None
            best_e, best_oi, best_t = a, -1, 0
            for oi in opts:
                e = self.reach(oi, a, limit, v, nxt)
                if e <= a:
                    continue
                t = self.tfb[p.options[oi].time][e] - self.tfb[p.options[oi].time][a]
                if e > best_e or (e == best_e and t < best_t):
                    best_e, best_oi, best_t = e, oi, t
            if best_oi < 0:
                return None
            out.append(StageSlot(a, best_e, best_oi))
            a = best_e
        return out if a == nb else None

    def search(
        self, slots: Sequence[Sequence[int]], lo: int, hi: int, precision: float
    ) -> tuple[int, int, WarmStart] | None:
        """Binary search on the fill's bottleneck in ``[lo, hi]`` down to ``precision`` (relative): (lo, hi,
        the solution at hi), or None when the fill fails at ``hi``."""
        p = self.p

        def feasible(limit: int) -> list[StageSlot] | None:
            sol = self.fill(slots, limit, len(slots))
            if sol is not None:
                tighter = self.fill(slots, limit, len(sol))
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
        found = fill_data.search(slots, 0, fill_data.hi0, _COARSE_PRECISION)
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
    # The coarse objectives are known only to the bracket's width (2%), while recipes often differ by less
    # (Llama-13B on 4+4 GPUs: tp4 pipelines beat tp2 ones by 1% but lost the coarse ranking to them, so a
    # larger plan space found a worse plan than a smaller one). So besides the best few, every fill whose
    # bracket could still beat the best found so far is refined (at most _REFINE_MOST, the most promising
    # first; its optimistic value scales the objective by lo / hi, the bottleneck's share of it).
    rest = sorted(coarse[_REFINE_TOP:], key=lambda c: (c[0] * c[3] // max(1, c[4]), c[:3]))
    for rank, (obj, _, _, lo, hi, slots, warm) in enumerate(coarse[:_REFINE_TOP] + rest):
        if rank >= _REFINE_MOST:
            break
        if rank >= _REFINE_TOP and best is not None and obj * lo // max(1, hi) >= best.objective:
            break  # (sorted: no later fill can win either)
        fine = fill_data.search(slots, lo, hi, _SEARCH_PRECISION)
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
    stages (as either's option, or one wider shape on the devices they held), run a stage another way on its
    devices (another recomputation or sharding), move a stage to an option with free devices, split a stage
    onto free devices or in place into two narrower shapes. At a local optimum, the current sequence of
    options and those of the structural moves are re-cut by the fill's binary search (at most
    ``_BALANCE_LIMIT`` per call), and the search goes on from the first that improves. ``rounds``: at most
    this many improving steps (a fixed amount of work, so the result does not depend on the machine)."""
    obj, stages = start.objective, list(start.stages)
    key = (obj, _spread(p, stages))
    variants: dict[tuple[int, int, int], list[int]] = {}
    by_pool: dict[int, list[int]] = {}
    same_config: dict[int, dict[tuple[int, int, str, str], list[int]]] = {}
    for oi, o in enumerate(p.options):
        variants.setdefault((o.pool, o.dp, o.tp), []).append(oi)
        by_pool.setdefault(o.pool, []).append(oi)
        same_config.setdefault(o.pool, {}).setdefault((o.dp, o.tp, o.recompute, o.shard), []).append(oi)
    # Per pool, its options by size (the merge and split-in-place moves re-partition a pool's devices).
    wider: dict[int, list[int]] = {
        pi: sorted(ois, key=lambda oi: (p.options[oi].size, oi)) for pi, ois in by_pool.items()
    }
    fill_data = _Fill(p)
    signature: dict[tuple[int, int, int, int], list[int]] = {}
    for pi, q in enumerate(p.pools):
        signature.setdefault((q.kind, q.devices, q.cap_kib, q.link), []).append(pi)
    classes = list(signature.values())

    def shapes(pool: int, like: StageOption) -> list[int]:
        """One option per shape of ``pool``: run as ``like`` where the pool offers that, else its first."""
        out = []
        for (pi, _, _), ois in variants.items():
            if pi == pool:
                same = [
                    oi
                    for oi in ois
                    if (p.options[oi].recompute, p.options[oi].shard) == (like.recompute, like.shard)
                ]
                out.append((same or ois)[0])
        return sorted(out)

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
            # Merge into one wider stage on the devices both held (two tp2 stages of a host become one
            # tp4 stage): a single step, as the merge alone is slower and would never be taken.
            o1, o2 = p.options[g], p.options[g2]
            for pi in sorted({o1.pool, o2.pool}):
                room = free[pi] + sum(o.size for o in (o1, o2) if o.pool == pi)
                for oi in wider[pi]:
                    if max(o1.size, o2.size) < p.options[oi].size <= room:
                        yield [*st[:s], StageSlot(a, e2, oi), *st[s + 2 :]]
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
                        # (Its every variant where this one was dropped there as dominated.)
                        targets += same_config[pi].get(
                            (o.dp, o.tp, o.recompute, o.shard), variants.get((pi, o.dp, o.tp), [])
                        )
                        break
            for oi in targets:
                x = p.options[oi]
                room = free[x.pool] + (o.size if x.pool == o.pool else 0)
                if oi != g and x.size <= room:
                    yield [*st[:s], StageSlot(a, e, oi), *st[s + 1 :]]
                if e - a >= 2 and n < p.max_stages and x.size <= free[x.pool]:
                    mid = (a + e) // 2
                    yield [*st[:s], StageSlot(a, mid, g), StageSlot(mid, e, oi), *st[s + 1 :]]
            # Split in place: the stage's devices (and the pool's free ones) as two narrower stages (of the
            # pool's shapes, run like this stage where they can be), cut where their compute times balance
            # (the reverse of the merge).
            if e - a >= 2 and n < p.max_stages:
                room = free[o.pool] + o.size
                narrow = [oi for oi in shapes(o.pool, o) if p.options[oi].size < o.size]
                for i, oi in enumerate(narrow):
                    for oj in narrow[i:]:
                        x, y = p.options[oi], p.options[oj]
                        if not o.size <= x.size + y.size <= room:
                            continue
                        for first, second in ((oi, oj), (oj, oi)) if oi != oj else ((oi, oj),):
                            pf, ps = (
                                fill_data.tfb[p.options[first].time],
                                fill_data.tfb[p.options[second].time],
                            )
                            # The cut where the first's time from a reaches the second's time to e.
                            lo_, hi_ = a + 1, e - 1
                            while lo_ < hi_:
                                mid = (lo_ + hi_) // 2
                                if pf[mid] - pf[a] < ps[e] - ps[mid]:
                                    lo_ = mid + 1
                                else:
                                    hi_ = mid
                            yield [*st[:s], StageSlot(a, lo_, first), StageSlot(lo_, e, second), *st[s + 1 :]]

    balances = _BALANCE_LIMIT
    tried: set[tuple[int, ...]] = set()
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
        if improved:
            continue
        # A local optimum: a structural move (other options, stages merged or split) is often worse only
        # because its cuts are where the old stages had them. Re-cut each new sequence of options by the
        # fill's binary search (at most _BALANCE_LIMIT of them per call, a fixed amount of work).
        for trial in itertools.chain([stages], moves(stages)):
            seq = tuple(oi for _, _, oi in trial)
            if seq in tried or balances <= 0:
                continue
            tried.add(seq)
            balances -= 1
            found = fill_data.search([[oi] for oi in seq], 0, fill_data.hi0, _SEARCH_PRECISION)
            if found is None:
                continue
            cut = list(found[2].stages)
            k = (found[2].objective, _spread(p, cut))
            if k < key:
                key, stages, improved = k, cut, True
                break
        if not improved:
            break
    return WarmStart(key[0], tuple(stages))
