"""Valid lower bounds on one candidate's integer program, from relaxations that pool each device kind's
groups: the smallest bottleneck any layout can have (:func:`min_bottleneck`, walking a :class:`Relaxation`),
an LP relaxation (:func:`lp_bound`) and a fluid relaxation (both in :func:`lower_bound`), and the fill
relaxation that tightens weak bounds where memory forces slow stages (:func:`fill_bound`).

[Note: the relaxations]
Each bound pools the groups of one device kind. :class:`Relaxation` walks stages from the last one
backwards: the ``r``-th stage from the end holds ``min(r, M)`` microbatches under 1F1B whatever the stage
count, so 1F1B's memory (early stages hold more activations) and memory-forced stage counts are exact; cuts
inside a host run pay the host link, others the network. All bounds are checked against exhaustive search
(``tests/planner/test_brute_force.py``), including on raw random integer data.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .ilp import StageProblem

__all__ = ["INFEASIBLE_BOUND", "Relaxation", "fill_bound", "lower_bound", "lp_bound", "min_bottleneck"]

#: Bound of a candidate the relaxations prove infeasible (memory).
INFEASIBLE_BOUND = 2**62


def lower_bound(p: StageProblem, upper: int | None = None) -> int:
    """A bound on the objective from the inputs alone: the larger of the LP relaxation (:func:`lp_bound`)
    and the fluid relaxation described here.

    For a bottleneck ``T`` every non-last stage does at most ``T - 2 c_min`` of work (its round trip of at
    least the cheapest cut on the fastest link rides on the 1F1B critical path), the last at most ``T``;
    kind ``k`` with ``n_k`` groups covers at most ``n_k (T - 2 c_min) / W_k`` of the model (``W_k``: whole
    model on kind ``k``). The fill term is at least the cheapest fractional cover (fastest kinds first), and
    ``T`` at least the largest block on its fastest kind. Minimised over ``T`` on a grid, taking for each
    grid cell the cover at its right end and the steady state at its left end, so the bound stays valid.
    Both start ``T`` at :func:`min_bottleneck` (memory-forced stage counts, 1F1B's early stages holding
    more activations), which also proves a candidate infeasible (``INFEASIBLE_BOUND``).
    """
    tfb = [
        np.array(f, dtype=np.float64) + np.array(b) for f, b in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
    ]
    counts: dict[int, int] = {}
    for g in p.groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.count
    # Work in units of the per-block fastest time ``w`` (``W`` the whole model): kind ``k`` runs any set of
    # blocks at least ``r_k`` times slower, ``r_k`` its smallest ratio to ``w``. Kinds are not exactly
    # proportional (memory-bound ops favour bandwidth), so pricing kind ``k`` at its whole-model time would
    # not be a bound.
    per_block = np.diff(np.array([tfb[k] for k in sorted(counts)]), axis=1)
    w = per_block.min(axis=0)
    whole = float(w.sum())
    pos = w > 0
    work = {
        k: whole * (float(np.min(row[pos] / w[pos])) if pos.any() else 1.0)
        for k, row in zip(sorted(counts), per_block, strict=True)
    }
    kinds = sorted(counts, key=lambda k: (work[k], k))
    block = max(float(min(tfb[k][j + 1] - tfb[k][j] for k in kinds)) for j in range(p.num_blocks))
    m = p.microbatches
    c_min = 0.0
    if p.schedule == "1f1b" and p.num_blocks > 1 and sum(counts.values()) > 1:
        # Two consecutive stages share a host only where a host offers two groups or more.
        per_host: dict[int, int] = {}
        for g in p.groups:
            per_host[g.host] = per_host.get(g.host, 0) + g.count
        links = {g.link for g in p.groups if per_host[g.host] >= 2} | {p.net_link}
        c_min = float(min(min(p.comm_prefix[lk][1 : p.num_blocks]) for lk in links))
    # The fill's round trips: every cut between two stages sends at least the cheapest cut on a usable link
    # (both schedules put 2 x the send on the fill; only 1F1B puts it on the bottleneck too).
    c_fill = c_min
    if p.num_blocks > 1 and sum(counts.values()) > 1 and p.schedule != "1f1b":
        per_host = {}
        for g in p.groups:
            per_host[g.host] = per_host.get(g.host, 0) + g.count
        links = {g.link for g in p.groups if per_host[g.host] >= 2} | {p.net_link}
        c_fill = float(min(min(p.comm_prefix[lk][1 : p.num_blocks]) for lk in links))
    upper_t = None if upper is None else upper // max(1, m) + 1
    t_star = min_bottleneck(p, upper_t)
    if t_star is None:
        return INFEASIBLE_BOUND
    block = max(block, float(t_star))
    lp = lp_bound(p, c_min, c_fill, t_star)
    if lp is not None and not math.isfinite(lp):
        return INFEASIBLE_BOUND
    lp_floor = math.floor(lp) if lp is not None else 0
    if m == 1:
        return max(lp_floor, math.floor(whole))
    hi = max(block, (upper if upper is not None else whole * (m + 1)) / (m - 1)) * 1.0001
    grid = np.geomspace(max(block, 1e-9), max(hi, block * 1.0001 + 1e-9), 256)

    def cover(t: float) -> float:
        """Cheapest fill for bottleneck ``t`` (inf if the groups cannot cover the model)."""
        left, fill = 1.0, 0.0
        for i, k in enumerate(kinds):
            room = counts[k] * max(0.0, t - 2 * c_min) + (2 * c_min if i == 0 else 0.0)
            frac = min(left, room / max(work[k], 1e-12))
            fill += frac * work[k]
            left -= frac
            if left <= 1e-12:
                return fill
        return math.inf

    best = math.inf
    for lo_t, hi_t in itertools.pairwise(grid):
        best = min(best, cover(float(hi_t)) + (m - 1) * float(lo_t))
    best = min(best, whole + (m - 1) * float(grid[-1]))
    fluid = math.floor(best) if math.isfinite(best) else math.floor(whole + (m - 1) * block)
    # Both are valid; neither dominates (the LP prices blocks per kind, the fluid bound gives only one
    # stage the comm-free bonus).
    return max(lp_floor, fluid)


class Relaxation:
    """The stage problem with each kind's groups pooled (see :func:`min_bottleneck`): ``feasible(T)`` and
    ``min_fill(T)`` walk stages from the last one backwards; a state is (stages per kind, kind and length of
    the current host run)."""

    def __init__(self, p: StageProblem) -> None:
        nb, m = p.num_blocks, p.microbatches
        counts: dict[int, int] = {}
        caps: dict[int, int] = {}
        per_host: dict[tuple[int, int], int] = {}
        for g in p.groups:
            counts[g.kind] = counts.get(g.kind, 0) + g.count
            caps[g.kind] = max(caps.get(g.kind, 0), g.cap_kib)  # one per kind in practice
            per_host[g.host, g.kind] = per_host.get((g.host, g.kind), 0) + g.count
        kinds = sorted(counts)
        nk = np.array([counts[k] for k in kinds], dtype=np.int64)
        tfb = [
            np.array(p.fwd_prefix[k], dtype=np.int64) + np.array(p.bwd_prefix[k], dtype=np.int64)
            for k in kinds
        ]
        mem = np.array(p.mem_prefix, dtype=np.int64)
        act = np.array(p.act_prefix, dtype=np.int64)
        gpipe = p.schedule == "gpipe"
        zero = np.zeros(nb + 1, dtype=np.int64)
        # (kind of the left stage, kind of the right stage) -> (longest run, cut price) where a host offers both.
        pair: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
        rt_net = zero
        # Cut prices: on the bottleneck under 1F1B only, on the fill under both schedules.
        if nb > 1 and sum(counts.values()) > 1:
            rt_net = 2 * np.array(p.comm_prefix[p.net_link], dtype=np.int64)
            hosts = sorted({g.host for g in p.groups})
            for h in hosts:
                on_h = {g.kind: 0 for g in p.groups if g.host == h}
                for g in p.groups:
                    if g.host == h:
                        on_h[g.kind] += g.count
                size = sum(on_h.values())
                for ki, kj in itertools.product(on_h, on_h):
                    if ki == kj and on_h[ki] < 2:
                        continue
                    i, j = kinds.index(ki), kinds.index(kj)
                    price = 2 * np.array(
                        p.comm_prefix[next(g.link for g in p.groups if g.host == h)], dtype=np.int64
                    )
                    if (i, j) in pair:
                        old_run, old_price = pair[i, j]
                        pair[i, j] = (max(old_run, size), np.minimum(old_price, price))
                    else:
                        pair[i, j] = (size, price)
        rmax = max([run for run, _ in pair.values()], default=1) + 1
        radix = np.cumprod(np.concatenate(([1], nk[:-1] + 1)))
        span = int(np.prod(nk + 1))

        max_stages = p.max_stages
        self.nb = nb
        self.m = m
        self.kinds = kinds
        self.nk = nk
        self.tfb = tfb
        self.mem = mem
        self.act = act
        self.gpipe = gpipe
        self.zero = zero
        self.pair = pair
        self.rt_net = rt_net
        self.rmax = rmax
        self.radix = radix
        self.span = span
        self.caps = caps
        self.max_stages = max_stages

        # feasible() relies on a stage's earliest start never falling as its end moves right: it prices each
        # cut at the suffix minimum of its price (a relaxation of it).
        def env(x: np.ndarray) -> np.ndarray:
            if nb < 2:
                return x
            e = np.minimum.accumulate(x[:nb][::-1])[::-1]
            return np.append(e, e[-1])

        self.rt_net_env = env(rt_net)
        self.pair_env = {key: (run, env(price)) for key, (run, price) in pair.items()}
        # _feasible_pooled's price of a stage's cut: the cheapest link a stage of that kind can use (its
        # host's, where the host has another group; else the network).
        self.rt_kind = []
        for k in kinds:
            price = rt_net.copy()
            if nb > 1 and sum(counts.values()) > 1:
                for h in sorted({g.host for g in p.groups if g.kind == k}):
                    if sum(g.count for g in p.groups if g.host == h) >= 2:
                        link = next(g.link for g in p.groups if g.host == h)
                        price = np.minimum(price, 2 * np.array(p.comm_prefix[link], dtype=np.int64))
            self.rt_kind.append(env(price))

    def feasible(self, limit: int, *, runs: bool = False) -> bool:
        """Whether some relaxed layout has bottleneck <= ``limit`` (see :func:`min_bottleneck`).

        With ``runs`` a walk from the last stage backwards whose state is (stages per kind, kind and length
        of the current host run) and which keeps, per state, every boundary its suffix can start at;
        without, the cheaper walk of :meth:`_feasible_pooled`."""
        if not runs:
            return self._feasible_pooled(limit)
        nb, m, kinds, nk, tfb = self.nb, self.m, self.kinds, self.nk, self.tfb
        idx = np.arange(nb + 1)
        cnt = np.zeros((1, len(kinds)), dtype=np.int64)
        cur = np.array([-1], dtype=np.int64)
        run = np.array([0], dtype=np.int64)
        reach = np.zeros((1, nb + 1), dtype=bool)
        reach[0, nb] = True
        for r in range(self.max_stages):
            v = m if self.gpipe else min(r + 1, m)
            room = self.mem + v * self.act
            parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
            for i, k in enumerate(kinds):
                ok = cnt[:, i] < nk[i]
                if not ok.any():
                    continue
                a_mem = np.searchsorted(room, room - self.caps[k], side="left")
                # (kind of the stage to the right that a host run continues with, or -1 for a new run; cut
                # price); the last stage sends nothing.
                options = [(-1, self.zero)] if r == 0 else [(-1, self.rt_net_env)]
                if r > 0:
                    options += [
                        (j, self.pair_env[i, j][1]) for j in range(len(kinds)) if (i, j) in self.pair_env
                    ]
                for j, rt in options:
                    sel = ok & ((cur == j) & (run < self.pair_env[i, j][0]) if j >= 0 else True)
                    if not sel.any():
                        continue
                    on_t = self.zero if self.gpipe else rt
                    # Stage [a, f) fits iff a >= a_min[f]; a_min never falls as f grows (prices are suffix
                    # minima), so a is reachable iff the first reachable f above it admits it.
                    a_min = np.maximum(a_mem, np.searchsorted(tfb[i], tfb[i] + on_t - limit, side="left"))
                    marked = np.where(reach[sel], idx, nb + 1)
                    nxt = np.minimum.accumulate(marked[:, ::-1], axis=1)[:, ::-1]
                    above = np.concatenate([nxt[:, 1:], np.full((len(nxt), 1), nb + 1)], axis=1)
                    new = (above <= nb) & (a_min[np.minimum(above, nb)] <= idx)
                    if new[:, 0].any():
                        return True
                    live = new.any(axis=1)
                    if not live.any():
                        continue
                    c2 = cnt[sel][live].copy()
                    c2[:, i] += 1
                    r2 = run[sel][live] + 1 if j >= 0 else np.ones(int(live.sum()), dtype=np.int64)
                    parts.append((c2, np.full(len(r2), i, dtype=np.int64), r2, new[live]))
            if not parts:
                return False
            cnt_all = np.concatenate([x[0] for x in parts])
            cur_all = np.concatenate([x[1] for x in parts])
            run_all = np.concatenate([x[2] for x in parts])
            reach_all = np.concatenate([x[3] for x in parts])
            keys = cnt_all @ self.radix + self.span * (cur_all * self.rmax + run_all)
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            heads = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
            first = order[heads]
            reach = np.logical_or.reduceat(reach_all[order], heads, axis=0)
            cnt, cur, run = cnt_all[first], cur_all[first], run_all[first]
        return False

    def _feasible_pooled(self, limit: int) -> bool:
        """:meth:`feasible` with each stage's cut priced by the stage alone (its kind and position: the
        cheapest link a stage of that kind can reach a neighbour over, as a suffix minimum). Then a state
        is the number of stages per kind and only its smallest start matters: any continuation from a later
        start, cut short at an earlier one, keeps or drops stages with no more time, memory or cut price.
        A relaxation of the host runs (its prices are never higher), so its answer is never above theirs."""
        nb, m, kinds, nk, tfb = self.nb, self.m, self.kinds, self.nk, self.tfb
        cnt = np.zeros((1, len(kinds)), dtype=np.int64)
        start = np.array([nb], dtype=np.int64)
        for r in range(self.max_stages):
            v = m if self.gpipe else min(r + 1, m)
            room = self.mem + v * self.act
            parts: list[tuple[np.ndarray, np.ndarray]] = []
            for i, k in enumerate(kinds):
                ok = cnt[:, i] < nk[i]
                if not ok.any():
                    continue
                f = start[ok]
                a_mem = np.searchsorted(room, room[f] - self.caps[k], side="left")
                on_t = self.zero if (self.gpipe or r == 0) else self.rt_kind[i]
                a_time = np.searchsorted(tfb[i], tfb[i][f] + on_t[f] - limit, side="left")
                a = np.maximum(a_mem, a_time)
                grow = a < f
                if not grow.any():
                    continue
                if (a[grow] == 0).any():
                    return True
                c2 = cnt[ok][grow].copy()
                c2[:, i] += 1
                parts.append((c2, a[grow]))
            if not parts:
                return False
            cnt_all = np.concatenate([x[0] for x in parts])
            st_all = np.concatenate([x[1] for x in parts])
            uniq, inv = np.unique(cnt_all @ self.radix, return_inverse=True)
            best = np.full(len(uniq), nb, dtype=np.int64)
            np.minimum.at(best, inv, st_all)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(inv))[::-1]
            cnt, start = cnt_all[first], best
        return False

    def min_fill(self, limit: int) -> float:
        """The smallest ``sum_s (T_s + 2 c_s)`` of a relaxed layout with bottleneck <= ``limit`` (inf if
        none): the same walk as :meth:`feasible`, keeping per state the cheapest suffix from every boundary
        (a stage ``[a, f)`` fits exactly when ``a`` is at least a bound that depends on ``f`` alone)."""
        nb, m, kinds, nk = self.nb, self.m, self.kinds, self.nk
        inf = math.inf
        fill = np.full((1, nb + 1), inf)
        fill[0, nb] = 0.0
        cnt = np.zeros((1, len(kinds)), dtype=np.int64)
        cur = np.array([-1], dtype=np.int64)
        run = np.array([0], dtype=np.int64)
        best = inf
        idx = np.arange(nb + 1)
        for r in range(self.max_stages):
            v = m if self.gpipe else min(r + 1, m)
            room = self.mem + v * self.act
            parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
            for i, k in enumerate(kinds):
                ok = cnt[:, i] < nk[i]
                if not ok.any():
                    continue
                tk = self.tfb[i].astype(np.float64)
                a_mem = np.searchsorted(room, room - self.caps[k], side="left")
                options = [(-1, self.zero)] if r == 0 else [(-1, self.rt_net)]
                if r > 0:
                    options += [(j, self.pair[i, j][1]) for j in range(len(kinds)) if (i, j) in self.pair]
                for j, rt in options:
                    sel = ok & ((cur == j) & (run < self.pair[i, j][0]) if j >= 0 else True)
                    if not sel.any():
                        continue
                    on_t = self.zero if self.gpipe else rt
                    a_min = np.maximum(
                        a_mem, np.searchsorted(self.tfb[i], self.tfb[i] + on_t - limit, side="left")
                    )
                    w = fill[sel] + (tk + rt)[None, :]
                    new = np.full_like(w, inf)
                    for f in range(1, nb + 1):
                        lo = int(a_min[f])
                        if lo < f:
                            np.minimum(new[:, lo:f], w[:, f : f + 1], out=new[:, lo:f])
                    new -= tk[None, :]
                    new[:, idx == nb] = inf
                    live = np.isfinite(new).any(axis=1)
                    if not live.any():
                        continue
                    best = min(best, float(new[:, 0].min()))
                    c2 = cnt[sel][live].copy()
                    c2[:, i] += 1
                    r2 = run[sel][live] + 1 if j >= 0 else np.ones(int(live.sum()), dtype=np.int64)
                    parts.append((c2, new[live], np.full(len(r2), i, dtype=np.int64), r2))
            if not parts:
                break
            cnt_all = np.concatenate([x[0] for x in parts])
            fill_all = np.concatenate([x[1] for x in parts])
            cur_all = np.concatenate([x[2] for x in parts])
            run_all = np.concatenate([x[3] for x in parts])
            keys = cnt_all @ self.radix + self.span * (cur_all * self.rmax + run_all)
            uniq, inv = np.unique(keys, return_inverse=True)
            merged = np.full((len(uniq), nb + 1), inf)
            np.minimum.at(merged, inv, fill_all)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(inv))[::-1]
            fill, cnt, cur, run = merged, cnt_all[first], cur_all[first], run_all[first]
            # A suffix that cannot reach boundary 0 any more is still needed; one that starts at 0 is done.
            fill[:, 0] = inf
        return best


def fill_bound(p: StageProblem, t_star: int, upper: int, cells: int = 3) -> int:
    """A bound on the objective tighter than :func:`lower_bound`'s where memory forces slow stages: for a
    bottleneck ``T`` in ``[T_i, T_i+1]`` the objective is at least ``min_fill(T_i+1) + (M - 1) T_i + Z``
    (:meth:`Relaxation.min_fill`, nonincreasing in ``T``); a bottleneck above ``T_up`` (where even the
    cheapest fill reaches ``upper``) cannot go below ``upper``. ``t_star``: :func:`min_bottleneck`."""
    rel = Relaxation(p)
    m = p.microbatches
    nb = p.num_blocks
    per_block = [min(int(t[j + 1] - t[j]) for t in rel.tfb) for j in range(nb)]
    fill_lo = sum(per_block)
    ar_min = sum(
        min(p.ar_prefix[g.ar_class][j + 1] - p.ar_prefix[g.ar_class][j] for g in p.groups) for j in range(nb)
    )
    # The slowest stage's all-reduce is at least the average over the (at most all) groups' stages.
    z_lo = min(g.ar_latency for g in p.groups) + (
        ar_min / max(1, sum(g.count for g in p.groups)) if ar_min >= 0 else ar_min
    )
    t_up = (upper - fill_lo - z_lo) / (m - 1) if m > 1 else float(upper)
    if t_up <= t_star:
        return upper
    grid = [int(x) for x in np.geomspace(max(1, t_star), t_up, cells + 1)]
    grid[0] = t_star
    best = float(upper)
    for lo_t, hi_t in itertools.pairwise(grid):
        best = min(best, rel.min_fill(hi_t + 1) + (m - 1) * lo_t + z_lo)
    return min(upper, math.floor(best))


def min_bottleneck(p: StageProblem, upper: int | None = None, *, runs: bool = False) -> int | None:
    """A lower bound on the bottleneck of every layout (1F1B: ``max_s T_s + 2 c_s``; GPipe: ``Fmax + Bmax``
    >= ``max_s T_s``), or None if no layout fits memory.

    Exact feasibility test of a relaxation for a bottleneck ``T``, binary-searched: stages are built from the
    last one backwards; the ``r``-th stage from the end holds ``min(r, M)`` microbatches of activations
    under 1F1B (``M`` under GPipe) whatever the stage count, so memory is checked exactly. Each kind's groups
    are pooled (kind-``k`` stages at most ``n_k``); under 1F1B a cut between two stages of one host (a
    *run*, at most as long as a host offering both kinds has groups) pays the cheapest such host's link,
    any other cut the network, each price replaced by its suffix minimum. A state is (stages per kind, kind
    and length of the current run) and keeps *every* boundary its suffix can start at: keeping only the
    smallest is not safe, because a shorter suffix may have to drop a stage, which changes who neighbours
    whom and so the price of a cut (found by the brute-force test). ``T`` is feasible if some state reaches
    boundary 0. ``upper``: a bottleneck known to be feasible (saves steps). Shared parameters' extra copies
    are left out (more memory only), so the bound stays a bound.
    """
    rel = Relaxation(p)
    tfb = rel.tfb

    def feasible(limit: int) -> bool:
        return rel.feasible(limit, runs=runs)

    hi = int(max(int(t[-1]) for t in tfb) + 2 * int(max(max(c) for c in p.comm_prefix)) + 1)
    if upper is not None and upper < hi and feasible(upper):
        hi = upper
    elif not feasible(hi):
        return None
    # Every layout has a stage holding the largest block (on its fastest kind): no smaller bottleneck is
    # feasible, so the search may start there (same answer, fewer steps); with host runs, no bottleneck
    # below the pooled relaxation's is either.
    lo = min(hi, max(int(min(t[j + 1] - t[j] for t in tfb)) for j in range(p.num_blocks)))
    if runs:
        pooled = min_bottleneck(p, hi)
        lo = max(lo, pooled if pooled is not None else hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def lp_bound(p: StageProblem, c_min: float, c_fill: float = 0.0, t_min: int = 0) -> float | None:
    """The LP relaxation of the stage problem with stages of one kind pooled (GLOP), or None if GLOP fails.

    Variables ``x[j, k]`` (share of block ``j`` run on kind ``k``) and the bottleneck ``T``:

    - cover:    ``sum_k x[j, k] = 1``
    - time:     ``sum_j t[j, k] x[j, k] <= n_k (T - 2 c_min) + 2 c_min`` (kind ``k``'s ``n_k`` groups each
      carry at most ``T`` minus its round trip; the last stage has none)
    - memory:   ``sum_j (state[j] + v act[j]) x[j, k] <= N_k cap_k``, ``N_k <= n_k`` (``N_k``: the number of
      kind-``k`` stages, relaxed; each stage's devices hold its state and ``v`` microbatches of
      activations: ``M`` under GPipe, at least one under 1F1B)
    - cuts:     ``S >= sum_k N_k`` stages have ``S - 1`` cuts, each sending at least ``c_fill`` both ways
    - all-reduce: ``Z >= sum_j ar_k[j] x[j, k] / n_k + lat_min`` (the slowest stage's all-reduce + optimizer
      step is at least the average over kind ``k``'s stages; ``ar_k``: the cheapest class of kind ``k``)
    - ``T >=`` the largest block on its fastest kind and ``t_min`` (:func:`min_bottleneck`)
    - minimise ``sum_jk t[j, k] x[j, k] + (M - 1) T + 2 c_fill (sum_k N_k - 1) + Z``
    """
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:
        return None
    nb, m = p.num_blocks, p.microbatches
    counts: dict[int, int] = {}
    caps: dict[int, int] = {}
    cap_max: dict[int, int] = {}
    for g in p.groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.count
        caps[g.kind] = caps.get(g.kind, 0) + g.count * g.cap_kib
        cap_max[g.kind] = max(cap_max.get(g.kind, 0), g.cap_kib)
    kinds = sorted(counts)
    t = {
        k: [
            p.fwd_prefix[k][j + 1] - p.fwd_prefix[k][j] + p.bwd_prefix[k][j + 1] - p.bwd_prefix[k][j]
            for j in range(nb)
        ]
        for k in kinds
    }
    inflight = m if p.schedule == "gpipe" else 1
    mem = [
        p.mem_prefix[j + 1] - p.mem_prefix[j] + inflight * (p.act_prefix[j + 1] - p.act_prefix[j])
        for j in range(nb)
    ]
    # Per kind, the cheapest all-reduce class block by block (a stage's span on any class is at least the
    # sum of these minima).
    ar = {
        k: [
            min(p.ar_prefix[g.ar_class][j + 1] - p.ar_prefix[g.ar_class][j] for g in p.groups if g.kind == k)
            for j in range(nb)
        ]
        for k in kinds
    }
    lat_min = float(min(g.ar_latency for g in p.groups))
    x = {(j, k): solver.NumVar(0.0, 1.0, f"x[{j},{k}]") for j in range(nb) for k in kinds}
    n = {k: solver.NumVar(0.0, float(counts[k]), f"N[{k}]") for k in kinds}
    big = float(max(sum(v) for v in t.values())) * (m + 2)
    t_lo = float(max(t_min, max(min(t[k][j] for k in kinds) for j in range(nb))))
    bottleneck = solver.NumVar(t_lo, max(big, t_lo), "T")
    z = solver.NumVar(lat_min, solver.infinity(), "Z")
    # Rows are built coefficient by coefficient: the natural (operator) API took most of the planner's
    # preparation time on 160-block models.
    inf = solver.infinity()
    for j in range(nb):
        row = solver.Constraint(1.0, 1.0)
        for k in kinds:
            row.SetCoefficient(x[j, k], 1.0)
    for k in kinds:
        time_row = solver.Constraint(-inf, 2 * c_min * (1 - counts[k]))
        cap_row = solver.Constraint(-inf, float(caps[k]))
        stages_row = solver.Constraint(-inf, 0.0)
        ar_row = solver.Constraint(counts[k] * lat_min, inf)
        for j in range(nb):
            time_row.SetCoefficient(x[j, k], float(t[k][j]))
            cap_row.SetCoefficient(x[j, k], float(mem[j]))
            stages_row.SetCoefficient(x[j, k], float(mem[j]))
            ar_row.SetCoefficient(x[j, k], -float(ar[k][j]))
        time_row.SetCoefficient(bottleneck, -float(counts[k]))
        stages_row.SetCoefficient(n[k], -float(cap_max[k]))
        ar_row.SetCoefficient(z, float(counts[k]))
    obj = solver.Objective()
    for j in range(nb):
        for k in kinds:
            obj.SetCoefficient(x[j, k], float(t[k][j]))
    obj.SetCoefficient(bottleneck, float(m - 1))
    for k in kinds:
        obj.SetCoefficient(n[k], 2 * c_fill)
    obj.SetCoefficient(z, 1.0)
    obj.SetOffset(-2 * c_fill)
    obj.SetMinimization()
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return math.inf
    if status != pywraplp.Solver.OPTIMAL:
        return None
    # GLOP's tolerances are ~1e-9 relative: shave a little so the bound stays a bound.
    return solver.Objective().Value() * (1 - 1e-6)
