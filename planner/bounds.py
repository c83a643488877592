"""Valid lower bounds on one candidate's integer program, from relaxations that pool each device kind's
devices: the smallest bottleneck any layout can have (:func:`min_bottleneck`, walking a
:class:`Relaxation`), and an LP relaxation (:func:`lp_bound`), combined in :func:`lower_bound`.

[Note: the relaxations]
Each bound pools the devices of one kind (``N_k`` of them, whatever their hosts) and drops what only adds
time or memory in a way it cannot place: shared parameters' copies and gradient sums, a full
recomputation's held inputs, per-stage constants. :class:`Relaxation` walks stages from the last one
backwards: the ``r``-th stage from the end holds ``min(r, M)`` microbatches under 1F1B whatever the stage
count, so 1F1B's memory (early stages hold more activations) and memory-forced stage counts are exact;
stages of one kind and size are pooled into their best option boundary by boundary; a cut pays the cheapest
round trip any two options could have there. The LP prices blocks per option with the kind's devices busy
at most the bottleneck each period (device-time) and its memory at most the kind's total. All bounds are
checked against exhaustive search (``tests/planner/test_brute_force.py``), including on raw random integer
data.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .ilp import StageProblem

__all__ = [
    "INFEASIBLE_BOUND",
    "Relaxation",
    "fill_bound",
    "lagrangian_bound",
    "lower_bound",
    "lp_bound",
    "min_bottleneck",
    "pooled_bound",
]

#: Bound of a candidate the relaxations prove infeasible (memory).
INFEASIBLE_BOUND = 2**62
#: Device-count states the relaxation's walks hold at most (larger clusters count devices in coarser units).
MAX_STATES = 20_000
#: Relative precision of :func:`min_bottleneck`'s binary search (it returns the lower end: still a bound).
BOTTLENECK_PRECISION = 5e-3
#: Blocks x LP columns up to which the LP relaxation is built and solved exactly (GLOP); above, its
#: Lagrangian dual is searched instead (building the LP row by row costs seconds on 160-block models).
LP_CELLS = 4000


def _round_trips(p: StageProblem) -> np.ndarray:
    """Per boundary, the cheapest round trip (activations and gradients) any two options could pay there,
    over every link (0 at the model's ends)."""
    nb = p.num_blocks
    best = np.full(nb + 1, np.inf)
    for lk in range(len(p.comm_fwd)):
        for c1 in range(len(p.comm_classes)):
            for c2 in range(len(p.comm_classes)):
                tf = np.asarray(p.transfers[p.comm_fwd[lk][c1][c2]], dtype=np.float64)
                tb = np.asarray(p.transfers[p.comm_bwd[lk][c1][c2]], dtype=np.float64)
                best = np.minimum(best, tf + tb)
    best[~np.isfinite(best)] = 0.0
    return best


class Relaxation:
    """The stage problem with each kind's devices pooled (see [Note: the relaxations]):
    :meth:`feasible` walks stages from the last one backwards; a state is the devices used per kind, and only
    its smallest start matters (any continuation from a later start, cut short at an earlier one, keeps or
    drops stages with no more time, memory or cut price)."""

    def __init__(self, p: StageProblem) -> None:
        nb = p.num_blocks
        self.p = p
        self.nb = nb
        kinds = sorted({q.kind for q in p.pools})
        self.kinds = kinds
        self.nk = np.array([sum(q.devices for q in p.pools if q.kind == k) for k in kinds], dtype=np.int64)
        self.tfb = [
            np.asarray(f, dtype=np.int64) + np.asarray(b, dtype=np.int64)
            for f, b in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
        ]
        # Options by time class and by memory class (searched once each), then grouped by (kind, size).
        time_keys: dict[tuple[int, int], int] = {}
        mem_keys: dict[tuple[int, int, int, int, int], int] = {}
        opt_time, opt_mem, opt_group = [], [], []
        for o in p.options:
            opt_time.append(time_keys.setdefault((o.time, o.fwd_const + o.bwd_const), len(time_keys)))
            key = (o.state, o.act, o.once, o.extra_kib, p.pools[o.pool].cap_kib)
            opt_mem.append(mem_keys.setdefault(key, len(mem_keys)))
            opt_group.append((kinds.index(p.pools[o.pool].kind), o.size))
        self.time_keys = list(time_keys)
        self.mem_keys = list(mem_keys)
        self.opt_time = np.array(opt_time, dtype=np.int64)
        self.opt_mem = np.array(opt_mem, dtype=np.int64)
        self.group_keys = sorted(set(opt_group))
        gi = np.array([self.group_keys.index(g) for g in opt_group], dtype=np.int64)
        self.order = np.argsort(gi, kind="stable")
        # The fill walk needs one option per (group, time class, memory class): options of one kind on
        # several hosts price alike once the kind's devices are pooled.
        seen: set[tuple[int, int, int]] = set()
        distinct = []
        for x in self.order:
            dkey = (int(gi[x]), int(self.opt_time[x]), int(self.opt_mem[x]))
            if dkey not in seen:
                seen.add(dkey)
                distinct.append(int(x))
        self.order_groups = [[x for x in distinct if gi[x] == g] for g in range(len(self.group_keys))]
        self.group_heads = np.flatnonzero(np.concatenate(([True], gi[self.order][1:] != gi[self.order][:-1])))
        self.zero = np.zeros(nb + 1, dtype=np.int64)
        rt = _round_trips(p).astype(np.int64)
        # A stage's earliest start must never fall as its end moves right: each cut pays the suffix minimum
        # of its price (a relaxation of it).
        env = np.minimum.accumulate(rt[:nb][::-1])[::-1] if nb >= 1 else rt
        self.rt_env = np.append(env, env[-1] if len(env) else 0)
        # Large clusters count devices in units of ``unit`` (a stage of ``n`` devices charges ``n // unit``,
        # a kind holds ``ceil(N_k / unit)``): fewer states, still a relaxation.
        self.unit = 1
        while np.prod(-(-self.nk // self.unit) + 1) > MAX_STATES:
            self.unit *= 2
        self.nk = -(-self.nk // self.unit)
        self.radix = np.cumprod(np.concatenate(([1], self.nk[:-1] + 1)))
        self._mem_start: dict[int, np.ndarray] = {}

    def _a_mem(self, v: int) -> np.ndarray:
        """Per memory class (rows of :attr:`mem_keys`) and end boundary ``f``, the smallest start whose stage
        fits memory with ``v`` microbatches in flight (inputs and shared copies dropped: a relaxation)."""
        hit = self._mem_start.get(v)
        if hit is None:
            p = self.p
            rows = []
            for state, act, once, extra, cap in self.mem_keys:
                room = np.asarray(p.mem_prefix[state], dtype=np.int64)
                if act >= 0:
                    room = room + v * np.asarray(p.act_prefix[act], dtype=np.int64)
                if once >= 0:
                    room = room + np.asarray(p.act_prefix[once], dtype=np.int64)
                rows.append(np.searchsorted(room, room - (cap - extra), side="left"))
            hit = np.array(rows)
            self._mem_start[v] = hit
        return hit

    def _a_time(self, limit: int, last: bool) -> np.ndarray:
        """Per option and end boundary, the smallest start whose stage time (plus, under 1F1B and but for the
        last stage, the cheapest round trip) fits ``limit``."""
        p = self.p
        on_t = self.zero if (p.schedule == "gpipe" or last) else self.rt_env
        rows = np.array(
            [
                np.searchsorted(self.tfb[t], self.tfb[t] + on_t + const - limit, side="left")
                for t, const in self.time_keys
            ]
        )
        return rows[self.opt_time]

    def _starts(self, a_time: np.ndarray, v: int) -> np.ndarray:
        """Per (kind, size) group (rows, as :attr:`group_keys`) and end boundary, the smallest start any of
        its options admits with ``v`` microbatches in flight."""
        a = np.maximum(a_time, self._a_mem(v)[self.opt_mem])
        return np.minimum.reduceat(a[self.order], self.group_heads, axis=0)

    def feasible(self, limit: int, *, runs: bool = False) -> bool:
        """Whether some relaxed layout has bottleneck <= ``limit`` (see :func:`min_bottleneck`; ``runs`` is
        accepted for the finer walk's callers and gives the same answer)."""
        p = self.p
        nb, m = self.nb, p.microbatches
        cnt = np.zeros((1, len(self.kinds)), dtype=np.int64)
        start = np.array([nb], dtype=np.int64)
        a_last, a_other = self._a_time(limit, True), self._a_time(limit, False)
        for r in range(p.max_stages):
            v = m if p.schedule == "gpipe" else min(r + 1, m)
            starts = self._starts(a_last if r == 0 else a_other, v)
            parts: list[tuple[np.ndarray, np.ndarray]] = []
            for (k, size), a_of in zip(self.group_keys, starts, strict=True):
                size //= self.unit
                ok = cnt[:, k] + size <= self.nk[k]
                if not ok.any():
                    continue
                f = start[ok]
                a = a_of[f]
                grow = a < f
                if not grow.any():
                    continue
                if (a[grow] == 0).any():
                    return True
                c2 = cnt[ok][grow].copy()
                c2[:, k] += size
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
        """The smallest ``sum_s (T_s + cf_s + cb_s)`` of a relaxed layout with bottleneck <= ``limit``
        (``inf`` if none): the same walk as :meth:`feasible`, keeping per state the cheapest suffix from every
        boundary. A stage ``[a, f)`` fits exactly when ``a`` is at least a bound that never falls as ``f``
        grows, so the cheapest suffix from ``a`` is a minimum over a window of ends ``f`` (a range-minimum
        query per boundary)."""
        p = self.p
        nb, m = self.nb, p.microbatches
        inf = math.inf
        fill = np.full((1, nb + 1), inf)
        fill[0, nb] = 0.0
        cnt = np.zeros((1, len(self.kinds)), dtype=np.int64)
        best = inf
        a_last, a_other = self._a_time(limit, True), self._a_time(limit, False)
        consts = np.array([o.fwd_const + o.bwd_const for o in p.options], dtype=np.float64)
        groups = self.order_groups
        idx = np.arange(nb + 1)
        for r in range(p.max_stages):
            v = m if p.schedule == "gpipe" else min(r + 1, m)
            a_min = np.maximum(a_last if r == 0 else a_other, self._a_mem(v)[self.opt_mem])
            rt = np.zeros(nb + 1) if r == 0 else self.rt_env.astype(np.float64)
            parts: list[tuple[np.ndarray, np.ndarray]] = []
            for (k, size), members in zip(self.group_keys, groups, strict=True):
                size //= self.unit
                ok = cnt[:, k] + size <= self.nk[k]
                if not ok.any():
                    continue
                rows = fill[ok]
                new = np.full_like(rows, inf)
                tables: dict[int, list[np.ndarray]] = {}  # per time class: options share its range minima
                for oi in members:
                    t_cls = self.p.options[oi].time
                    tk = self.tfb[t_cls].astype(np.float64)
                    amin = a_min[oi]
                    # Suffix from a: min over ends f in (a, F(a)] of fill[f] + tk[f] + rt[f] + const, less tk[a].
                    hi = np.searchsorted(amin, idx, side="right") - 1  # the last f whose stage may start at a
                    lo = idx + 1
                    okq = hi >= lo
                    if not okq.any():
                        continue
                    if t_cls not in tables:
                        tables[t_cls] = _min_table(rows + (tk + rt)[None, :])
                    best_w = _query_min(tables[t_cls], lo[okq], hi[okq]) + consts[oi]
                    cand = np.full_like(rows, inf)
                    cand[:, okq] = best_w - tk[okq][None, :]
                    np.minimum(new, cand, out=new)
                new[:, nb] = inf
                live = np.isfinite(new).any(axis=1)
                if not live.any():
                    continue
                best = min(best, float(new[:, 0].min()))
                c2 = cnt[ok][live].copy()
                c2[:, k] += size
                parts.append((c2, new[live]))
            if not parts:
                break
            cnt_all = np.concatenate([x[0] for x in parts])
            fill_all = np.concatenate([x[1] for x in parts])
            uniq, inv = np.unique(cnt_all @ self.radix, return_inverse=True)
            merged = np.full((len(uniq), nb + 1), inf)
            np.minimum.at(merged, inv, fill_all)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(inv))[::-1]
            fill, cnt = merged, cnt_all[first]
            # A suffix that starts at boundary 0 is a whole layout (counted in best), not a suffix to extend.
            fill[:, 0] = inf
        return best

    def states(self) -> int:
        """How many device-count states the walks may hold (what their cost grows with)."""
        return int(np.prod(self.nk + 1))

    def fill_work(self) -> float:
        """The fill relaxation's work (states x options x stage slots x blocks), for sizing it."""
        return float(self.states()) * sum(map(len, self.order_groups)) * self.p.max_stages * self.nb


def _min_table(w: np.ndarray) -> list[np.ndarray]:
    """A sparse table of ``w`` along its columns: level ``L`` holds the minimum over the ``2**L`` columns
    from each index."""
    n = w.shape[1]
    table = [w]
    span = 1
    while 2 * span <= n:
        prev = table[-1]
        table.append(np.minimum(prev[:, : prev.shape[1] - span], prev[:, span:]))
        span *= 2
    return table


def _query_min(table: list[np.ndarray], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row and query ``q``, the minimum of columns ``lo[q] .. hi[q]`` (both included)."""
    level = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    out = np.empty((table[0].shape[0], len(lo)))
    for lv in np.unique(level):
        q = level == lv
        t = table[lv]
        out[:, q] = np.minimum(t[:, lo[q]], t[:, hi[q] - (1 << lv) + 1])
    return out


def _range_min(w: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row of ``w`` and query ``q``, ``min(w[:, lo[q] .. hi[q]])`` (both ends included; a sparse table)."""
    return _query_min(_min_table(w), lo, hi)


def fill_bound(p: StageProblem, t_star: int, upper: int, cells: int = 3) -> int:
    """A bound on the objective tighter than the LP's where stage structure and memory force slow stages:
    for a bottleneck ``T`` in ``[T_i, T_i+1]`` the objective is at least ``min_fill(T_i+1) + (M - 1) T_i +
    Z_min`` (:meth:`Relaxation.min_fill`, nonincreasing in ``T``); a bottleneck above ``T_up`` (where even
    the cheapest fill reaches ``upper``) cannot go below ``upper``. ``t_star``: :func:`min_bottleneck`."""
    rel = Relaxation(p)
    m = p.microbatches
    nb = p.num_blocks
    fill_lo = sum(min(int(t[j + 1] - t[j]) for t in rel.tfb) for j in range(nb))
    z_lo = min(o.ar_latency for o in p.options)
    t_up = (upper - fill_lo - z_lo) / (m - 1) if m > 1 else float(upper)
    if t_up <= t_star:
        return upper
    grid = [int(x) for x in np.geomspace(max(1, t_star), t_up, cells + 1)]
    grid[0] = t_star
    best = float(upper)
    for lo_t, hi_t in itertools.pairwise(grid):
        best = min(best, rel.min_fill(hi_t + 1) + (m - 1) * lo_t + z_lo)
    return min(upper, math.floor(best))


def pooled_bound(p: StageProblem) -> int:
    """The cheapest bound on the objective, ``M`` times a bottleneck every layout reaches: the largest block
    in its fastest option, and the whole model's device-time (per block, the least ``devices x time`` any
    option gives it) over every device of the cluster (each stage's devices are busy at most the bottleneck
    per microbatch, so ``sum_s n_s T_s <= N T``). Every objective is at least ``M`` times its bottleneck
    (the bottleneck stage runs every microbatch, and the fill holds it once more than the steady state's
    ``M - 1``). A fraction of a second on any model: what a candidate reports when the time limit stops the
    search before its other bounds."""
    nb = p.num_blocks
    if nb == 0 or not p.options:
        return 0
    times = {o.time for o in p.options}
    per = {
        t: np.diff(np.asarray(p.fwd_prefix[t], dtype=np.float64))
        + np.diff(np.asarray(p.bwd_prefix[t], dtype=np.float64))
        for t in times
    }
    fastest = np.min(np.array([per[t] for t in sorted(times)]), axis=0)
    work = np.min(np.array([o.size * per[o.time] for o in p.options]), axis=0)
    devices = sum(q.devices for q in p.pools)
    t = max(float(fastest.max()), float(work.sum()) / max(1, devices))
    return max(0, math.floor(max(1, p.microbatches) * t * (1 - 1e-9)))


def min_bottleneck(p: StageProblem, upper: int | None = None, *, runs: bool = False) -> int | None:
    """A lower bound on the bottleneck of every layout (1F1B: ``max_s T_s + cf_s + cb_s``; GPipe: ``Fmax +
    Bmax >= max_s T_s``), or None if no layout fits memory: the smallest ``T`` the :class:`Relaxation`
    admits, binary-searched. ``upper``: a bottleneck known to be feasible (saves steps)."""
    rel = Relaxation(p)
    tfb = rel.tfb
    hi = int(max(int(t[-1]) for t in tfb) + int(rel.rt_env.max(initial=0)) + 1)
    hi += max(o.fwd_const + o.bwd_const for o in p.options)
    if upper is not None and upper < hi and rel.feasible(upper):
        hi = upper
    elif not rel.feasible(hi):
        return None
    # Every layout has a stage holding each block (in some option): no smaller bottleneck is feasible.
    lo = min(hi, max(int(min(t[j + 1] - t[j] for t in tfb)) for j in range(p.num_blocks)))
    # To a relative precision (the smaller end is always a valid bound): each step walks the relaxation.
    while hi - lo > max(0, int(hi * BOTTLENECK_PRECISION)):
        mid = (lo + hi) // 2
        if rel.feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class _Columns:
    """The LP relaxation's data (see :func:`lp_bound`): options that price alike pooled into one column;
    per column its kind, devices and per-block time, memory and all-reduce (arrays ``columns x blocks``)."""

    def __init__(self, p: StageProblem) -> None:
        nb, m = p.num_blocks, p.microbatches
        self.kinds = sorted({q.kind for q in p.pools})
        self.n_k = np.array([sum(q.devices for q in p.pools if q.kind == k) for k in self.kinds], dtype=float)
        self.cap_k = np.array(
            [max(q.cap_kib for q in p.pools if q.kind == k) for k in self.kinds], dtype=float
        )
        inflight = m if p.schedule == "gpipe" else 1
        cols: dict[tuple[int, ...], int] = {}
        for oi, o in enumerate(p.options):
            cols.setdefault((p.pools[o.pool].kind, o.size, o.time, o.state, o.act, o.once, o.ar), oi)
        self.options = list(cols.values())
        t, mem, ar = [], [], []
        for oi in self.options:
            o = p.options[oi]
            t.append(
                np.diff(np.asarray(p.fwd_prefix[o.time], dtype=float))
                + np.diff(np.asarray(p.bwd_prefix[o.time], dtype=float))
            )
            mm = np.diff(np.asarray(p.mem_prefix[o.state], dtype=float))
            if o.act >= 0:
                mm = mm + inflight * np.diff(np.asarray(p.act_prefix[o.act], dtype=float))
            if o.once >= 0:
                mm = mm + np.diff(np.asarray(p.act_prefix[o.once], dtype=float))
            mem.append(mm)
            ar.append(np.diff(np.asarray(p.ar_prefix[o.ar], dtype=float)))
        self.t = np.array(t).reshape(len(self.options), nb)
        self.mem = np.array(mem).reshape(len(self.options), nb)
        self.ar = np.array(ar).reshape(len(self.options), nb)
        self.kind = np.array([self.kinds.index(p.pools[p.options[oi].pool].kind) for oi in self.options])
        self.size = np.array([float(p.options[oi].size) for oi in self.options])
        self.lat_min = float(min(o.ar_latency for o in p.options))
        rt = _round_trips(p)
        self.rt_min = float(rt[1:nb].min()) if nb > 1 and self.n_k.sum() > 1 else 0.0

    def t_lo(self, t_min: int) -> float:
        """The bottleneck is at least ``t_min`` and the largest block in its fastest column."""
        return float(max(t_min, float(self.t.min(axis=0).max(initial=0.0))))


def lagrangian_bound(
    p: StageProblem, t_min: int = 0, upper: float | None = None, iterations: int = 300
) -> float:
    """A lower bound on :func:`lp_bound`'s relaxation (so on the objective) by Lagrangian duality, for models
    whose LP is too large to build quickly: the device-time, memory, stage-count and all-reduce rows are
    priced into the objective with multipliers ``lambda, mu, nu, rho >= 0`` (with ``sum_k lambda_k N_k <=
    M - 1`` and ``sum_k rho_k N_k <= 1`` so that ``T`` and ``Z`` keep their lower bounds), leaving one cheapest
    column per block; every choice of multipliers gives a valid bound (weak duality), and a projected
    subgradient ascent with Polyak steps towards ``upper`` (a known objective) looks for a good one in a fixed
    number of iterations (deterministic)."""
    c = _Columns(p)
    m = p.microbatches
    nk, capk, kinds = c.n_k, c.cap_k, len(c.kinds)
    t_lo = c.t_lo(t_min)
    cap_total = nk * capk
    col = np.arange(c.t.shape[1])
    lam, mu, nu, rho = (np.zeros(kinds) for _ in range(4))
    best = -math.inf
    target = upper if upper is not None else float(c.t.max(axis=0).sum()) * m
    theta = 1.0
    stall = 0
    for _ in range(iterations):
        coef = (
            c.t * (1.0 + (lam[c.kind] * c.size)[:, None])
            + (mu[c.kind] * c.size + nu[c.kind])[:, None] * c.mem
            + (rho[c.kind] * c.size)[:, None] * c.ar
        )
        arg = coef.argmin(axis=0)
        a_s = c.rt_min - nu * capk
        s_star = np.where(a_s < 0, nk, 0.0)
        if s_star.sum() < 1:
            s_star = np.zeros(kinds)
            s_star[int(np.argmin(a_s))] = 1.0
        value = (
            float(coef[arg, col].sum())
            + t_lo * ((m - 1) - float(lam @ nk))
            - float(mu @ cap_total)
            + float(a_s @ s_star)
            - c.rt_min
            + c.lat_min
        )
        if value > best + 1e-9 * abs(best if math.isfinite(best) else 1.0):
            best, stall = value, 0
        else:
            stall += 1
            if stall >= 10:
                theta, stall = theta / 2, 0
        # Subgradients: each relaxed row's slack at the minimiser.
        by_kind = c.kind[arg]
        g_lam = np.bincount(by_kind, c.size[arg] * c.t[arg, col], minlength=kinds) - nk * t_lo
        g_mu = np.bincount(by_kind, c.size[arg] * c.mem[arg, col], minlength=kinds) - cap_total
        g_nu = np.bincount(by_kind, c.mem[arg, col], minlength=kinds) - capk * s_star
        g_rho = np.bincount(by_kind, c.size[arg] * c.ar[arg, col], minlength=kinds)
        if m == 1:
            g_lam[:] = 0.0
        norm = float(g_lam @ g_lam + g_mu @ g_mu + g_nu @ g_nu + g_rho @ g_rho)
        if norm <= 0 or target <= value:
            break
        step = theta * (target - value) / norm
        lam = np.maximum(0.0, lam + step * g_lam)
        mu = np.maximum(0.0, mu + step * g_mu)
        nu = np.maximum(0.0, nu + step * g_nu)
        rho = np.maximum(0.0, rho + step * g_rho)
        # Keep T and Z bounded below (scaling down keeps the multipliers feasible).
        if lam @ nk > m - 1:
            lam *= (m - 1) / float(lam @ nk) if lam @ nk > 0 else 0.0
        if rho @ nk > 1:
            rho *= 1.0 / float(rho @ nk)
    return best * (1 - 1e-9) if math.isfinite(best) else 0.0


def lp_bound(p: StageProblem, t_min: int = 0) -> float | None:
    """The LP relaxation of the stage problem with each kind's devices pooled (GLOP), or None if GLOP fails
    (``math.inf`` if infeasible).

    Variables ``x[j, o]`` (share of block ``j`` run as option ``o``; options that price alike pooled), the
    bottleneck ``T``, stages per kind ``S_k``, ``Z``:

    - cover:       ``sum_o x[j, o] = 1``
    - device-time: ``sum_{o of k} sum_j n_o t_o[j] x[j, o] <= N_k T`` (every stage's ``n_o`` devices are
      busy at most ``T`` per steady-state period, ``t_o`` its forward + backward per block)
    - memory:      ``sum_{o of k} sum_j n_o m_o[j] x[j, o] <= N_k cap_k``, and ``S_k cap_k >= sum_{o of k}
      sum_j m_o[j] x[j, o]`` (``m_o``: state and the activations of the fewest microbatches any stage holds)
    - cuts:        ``S = sum_k S_k`` stages have ``S - 1`` cuts, each with at least the cheapest round trip
    - all-reduce:  ``Z >= sum_{o of k} n_o sum_j ar_o[j] x[j, o] / N_k + latency_min`` (the stages of kind
      ``k`` use at most its ``N_k`` devices, so their all-reduces weighted by their devices add up to at most
      ``N_k Z``)
    - ``T >=`` the largest block in its fastest option and ``t_min``
    - minimise ``sum_jo t_o[j] x[j, o] + (M - 1) T + rt_min (S - 1) + Z``
    """
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:
        return None
    nb, m = p.num_blocks, p.microbatches
    kinds = sorted({q.kind for q in p.pools})
    n_k = {k: sum(q.devices for q in p.pools if q.kind == k) for k in kinds}
    cap_k = {k: max(q.cap_kib for q in p.pools if q.kind == k) for k in kinds}
    inflight = m if p.schedule == "gpipe" else 1
    # Options that price alike (on identical hosts) are one LP column.
    cols: dict[tuple[int, ...], int] = {}
    for oi, o in enumerate(p.options):
        k = p.pools[o.pool].kind
        cols.setdefault((k, o.size, o.time, o.state, o.act, o.once, o.ar), oi)
    t: dict[int, np.ndarray] = {}
    mem: dict[int, np.ndarray] = {}
    ar: dict[int, np.ndarray] = {}
    for oi in cols.values():
        o = p.options[oi]
        t[oi] = np.diff(np.asarray(p.fwd_prefix[o.time], dtype=np.float64)) + np.diff(
            np.asarray(p.bwd_prefix[o.time], dtype=np.float64)
        )
        mm = np.diff(np.asarray(p.mem_prefix[o.state], dtype=np.float64))
        if o.act >= 0:
            mm = mm + inflight * np.diff(np.asarray(p.act_prefix[o.act], dtype=np.float64))
        if o.once >= 0:
            mm = mm + np.diff(np.asarray(p.act_prefix[o.once], dtype=np.float64))
        mem[oi] = mm
        ar[oi] = np.diff(np.asarray(p.ar_prefix[o.ar], dtype=np.float64))
    opts = list(cols.values())
    kind_of = {oi: p.pools[p.options[oi].pool].kind for oi in opts}
    lat_min = float(min(o.ar_latency for o in p.options))
    rt = _round_trips(p)
    rt_min = float(rt[1:nb].min()) if nb > 1 and sum(n_k.values()) > 1 else 0.0
    x = {(j, oi): solver.NumVar(0.0, 1.0, f"x[{j},{oi}]") for j in range(nb) for oi in opts}
    stages = {k: solver.NumVar(0.0, float(n_k[k]), f"S[{k}]") for k in kinds}
    at_least_one = solver.Constraint(1.0, solver.infinity())
    for k in kinds:
        at_least_one.SetCoefficient(stages[k], 1.0)
    fastest = [min(float(t[oi][j]) for oi in opts) for j in range(nb)]
    t_lo = float(max(t_min, max(fastest)))
    big = max(float(sum(v)) for v in t.values()) * (m + 2) + t_lo
    bottleneck = solver.NumVar(t_lo, max(big, t_lo), "T")
    z = solver.NumVar(lat_min, solver.infinity(), "Z")
    inf = solver.infinity()
    # Rows are built coefficient by coefficient: the natural (operator) API is slow on large models.
    for j in range(nb):
        row = solver.Constraint(1.0, 1.0)
        for oi in opts:
            row.SetCoefficient(x[j, oi], 1.0)
    for k in kinds:
        time_row = solver.Constraint(-inf, 0.0)
        cap_row = solver.Constraint(-inf, float(n_k[k] * cap_k[k]))
        stages_row = solver.Constraint(-inf, 0.0)
        ar_row = solver.Constraint(-inf, -lat_min * n_k[k])
        for oi in opts:
            if kind_of[oi] != k:
                continue
            size = float(p.options[oi].size)
            for j in range(nb):
                time_row.SetCoefficient(x[j, oi], size * float(t[oi][j]))
                cap_row.SetCoefficient(x[j, oi], size * float(mem[oi][j]))
                stages_row.SetCoefficient(x[j, oi], float(mem[oi][j]))
                ar_row.SetCoefficient(x[j, oi], size * float(ar[oi][j]))
        time_row.SetCoefficient(bottleneck, -float(n_k[k]))
        stages_row.SetCoefficient(stages[k], -float(cap_k[k]))
        ar_row.SetCoefficient(z, -float(n_k[k]))
    obj = solver.Objective()
    for j in range(nb):
        for oi in opts:
            obj.SetCoefficient(x[j, oi], float(t[oi][j]))
    obj.SetCoefficient(bottleneck, float(m - 1))
    for k in kinds:
        obj.SetCoefficient(stages[k], rt_min)
    obj.SetCoefficient(z, 1.0)
    obj.SetOffset(-rt_min)
    obj.SetMinimization()
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return math.inf
    if status != pywraplp.Solver.OPTIMAL:
        return None
    # GLOP's tolerances are ~1e-9 relative: shave a little so the bound stays a bound.
    return solver.Objective().Value() * (1 - 1e-6)


def _relaxed(p: StageProblem, t_min: int, upper: int | None) -> float | None:
    """The LP relaxation's bound, exact (GLOP) on small models and by its Lagrangian dual on large ones
    (see ``LP_CELLS``); ``math.inf`` when the LP proves memory short, None if GLOP fails."""
    cells = p.num_blocks * len({(o.time, o.state, o.act, o.once, o.ar, o.size) for o in p.options})
    return lp_bound(p, t_min) if cells <= LP_CELLS else lagrangian_bound(p, t_min, upper)


def lower_bound(p: StageProblem, upper: int | None = None, *, prune_at: int | None = None) -> int:
    """A bound on the objective from the inputs alone: the LP relaxation (:func:`lp_bound`) with the
    bottleneck at least :func:`min_bottleneck`'s, which also proves a candidate infeasible
    (:data:`INFEASIBLE_BOUND`); ``upper``: an objective some layout of this candidate reaches (saves steps).
    ``prune_at``: an objective another candidate reaches; once a cheaper bound (the LP with the bottleneck
    at least the largest block) reaches it, that bound is returned (the candidate cannot win, and the walk
    of the relaxation is saved)."""
    m = max(1, p.microbatches)
    if prune_at is not None:
        rel = Relaxation(p)
        t_block = max(int(min(t[j + 1] - t[j] for t in rel.tfb)) for j in range(p.num_blocks))
        first = _relaxed(p, t_block, upper)
        if first is not None and not math.isfinite(first):
            return INFEASIBLE_BOUND
        cheap = max(math.floor(first) if first is not None else 0, m * t_block)
        if cheap >= prune_at:
            return cheap
    upper_t = None if upper is None else upper // m + 1
    t_star = min_bottleneck(p, upper_t)
    if t_star is None:
        return INFEASIBLE_BOUND
    if prune_at is not None and t_star <= t_block:
        return cheap  # the same relaxation again
    lp = _relaxed(p, t_star, upper)
    if lp is not None and not math.isfinite(lp):
        return INFEASIBLE_BOUND
    # The bottleneck stage runs every microbatch: at least M t* whatever the LP says.
    return max(math.floor(lp) if lp is not None else 0, m * t_star)
