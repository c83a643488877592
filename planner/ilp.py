"""The stage-partition-and-placement integer program, solved with OR-Tools CP-SAT.

One model per candidate (microbatch count ``M``, microbatch ``b``, schedule); the caller enumerates those
(``distplan.planner.candidates``) and builds each model's data (``distplan.planner.problem``). All
quantities arrive as integers in :class:`StageProblem`: times in ``time_unit_s`` units, memory in KiB, every
per-block quantity as a *prefix array* over block boundaries ``0..B`` so that a stage ``[end[s-1], end[s])``
costs ``A[end[s]] - A[end[s-1]]`` (one element constraint per stage slot and array, no products).

Sets: blocks ``j = 0..B-1``, stage slots ``s = 0..S-1`` (used slots come first), pools ``p`` (the ``N_p``
devices of one kind on one host ``h``), options ``o`` (a way to run a stage: ``n_o = dp_o * tp_o`` devices of
pool ``p_o``, a recomputation mode and a sharding level; :class:`StageOption`), communication classes ``c``
(an option's ``(dp, tp)``).

Variables: ``end[s]`` (boundary where stage ``s`` ends; ``end[-1] = 0``), ``used[s]``, ``y[s, o]`` (stage ``s``
runs option ``o``), ``T[s]`` (forward + backward per microbatch), ``Tmax``, ``cf[s]`` / ``cb[s]`` (activations
to stage ``s + 1`` and their gradients back), ``same[s, h]`` / ``net[s]`` (which link that cut uses), ``Z``
(the slowest stage's all-reduces + optimizer step).

Constraints:
  (a) contiguous, ordered stages:  ``end[s-1] + used[s] <= end[s] <= end[s-1] + B * used[s]``,
      ``used[s] >= used[s+1]``, ``used[0] = 1``, ``end[S-1] = B``
  (b) one option per used stage:   ``sum_o y[s, o] = used[s]``
  (c) pool supply:                 ``sum_s sum_{o in p} n_o y[s, o] <= N_p``
  (d) stage compute time:          ``T[s] >= F_o[end[s]] - F_o[end[s-1]] + B_o[...] - B_o[...] + const_o`` if
      ``y[s, o]`` (the option's time class: kind, per-replica rows, tensor-parallel split and collectives,
      recomputation, per-microbatch sharding collectives)
  (e) bottleneck:                  ``Tmax >= T[s] + cf[s] + cb[s]`` (1F1B); ``Fmax >= F[s]``, ``Bmax >= B[s]``
      (GPipe)
  (f) communication:               ``cf[s] >= X^fwd_{l, c(s), c(s+1)}[end[s]]`` and ``cb[s] >= X^bwd_{...}[end[s]]``
      where ``l`` is host ``h``'s link if ``same[s, h]`` (both stages on ``h``) and the network if ``net[s]``;
      ``X`` the transfer tables of ``boundary_rows`` (``distplan.planner.cost``) for the two stages' classes;
      ``same[s, h] = on[s, h] and on[s+1, h]``; ``net[s] + sum_h same[s, h] = used[s+1]``
  (g) all-reduce + optimizer:      ``Z >= AR_o[end[s]] - AR_o[end[s-1]] + latency_o`` if ``y[s, o]``
  (h) memory per device:           ``P_o[...] + v * A_o[...] + H_o[...] + v * I_o[end[s-1]] + E_o <= cap_p``
      if ``y[s, o]`` and ``used[s + v - 1]``, for ``v = 1..min(M, S - s)`` (1F1B: stage ``s`` of ``S`` holds
      ``min(S - s, M)`` microbatches; the constraint for ``v`` is live exactly when at least ``s + v`` stages
      are used); GPipe: ``v = M``. ``P`` state (sharding divides part of it), ``A`` activations per in-flight
      microbatch, ``H`` activations held once (full recomputation's recomputed forward), ``I`` the stage's
      input per in-flight microbatch (full recomputation keeps only it), ``E`` a constant (selective
      recomputation's one attention core)
  (i) symmetry: of two identical hosts, the first has at least as many devices used.
  (j) shared parameters (:class:`SharedGroup` ``q``, read in blocks ``R_q``, first ``f_q``; see
      [Note: shared parameters] in ``distplan.graph``):
      ``hold[s, q]`` iff stage ``s`` covers a block of ``R_q``; ``extra[s, q] = hold[s, q] and end[s-1] >
      f_q`` (a copy beyond the first holder, which ``P`` / ``AR`` already charge): memory (h) gains ``mem_q
      extra[s, q]``, the all-reduce term (g) the copy's optimizer step ``AR_q,o extra[s, q]``; the gradient sum
      over every rank holding a copy takes ``G_q[l][W_q]``, ``W_q = sum_s hold[s, q] n(s)`` ranks, on the
      network ``l`` if the holders sit on two hosts or more (``cross_q``), else on their host's link, and (g)
      gains it for every holder.

Objective (the cost model's closed form, see ``distplan.planner.cost``):
  1F1B:  ``sum_s (T[s] + cf[s] + cb[s]) + (M - 1) Tmax + Z``
  GPipe: ``sum_s (T[s] + cf[s] + cb[s]) + (M - 1) (Fmax + Bmax) + Z`` with ``F``/``B`` split like (d)-(e).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ortools.sat.python import cp_model

__all__ = [
    "PoolSupply",
    "SharedGroup",
    "SolverProgress",
    "StageOption",
    "StageProblem",
    "StageSlot",
    "StageSolution",
    "solve_stage_problem",
]


@dataclass(frozen=True, slots=True)
class PoolSupply:
    """The ``devices`` of kind ``kind`` on host ``host``: ``cap_kib`` usable memory each, ``link`` the index
    (into ``StageProblem.comm_fwd``) of the host's own link."""

    host: int
    kind: int
    devices: int
    cap_kib: int
    link: int


@dataclass(frozen=True, slots=True)
class StageOption:
    """One way to run a stage: ``size = dp * tp`` devices of pool ``pool``.

    Indices point into :class:`StageProblem`'s arrays (``-1``: the term is absent): ``time`` into
    ``fwd_prefix`` / ``bwd_prefix`` (plus ``fwd_const`` / ``bwd_const`` per microbatch), ``state`` into
    ``mem_prefix``, ``act`` (per in-flight microbatch) and ``once`` (held once) into ``act_prefix``,
    ``inputs`` into ``input_kib`` (per in-flight microbatch, at the stage's first boundary), ``ar`` into
    ``ar_prefix`` (plus ``ar_latency``), ``comm`` into ``comm_classes``; ``extra_kib`` is held whatever the
    range; ``edge_fwd`` / ``edge_bwd`` are added per microbatch for each pipeline boundary of the stage (one
    for the first or last stage of several, two for a middle one; ``planner.cost.boundary_sides``).
    ``label``: the configuration, for notes and layouts (``dp2tp4 rc=full``).
    """

    pool: int
    size: int
    dp: int
    tp: int
    time: int
    state: int
    ar: int
    comm: int
    act: int = -1
    once: int = -1
    inputs: int = -1
    extra_kib: int = 0
    fwd_const: int = 0
    bwd_const: int = 0
    ar_latency: int = 0
    edge_fwd: int = 0
    edge_bwd: int = 0
    recompute: str = "none"
    shard: str = "none"


@dataclass(frozen=True, slots=True)
class SharedGroup:
    """Parameters read in several blocks (a tied embedding and output projection): every stage covering one
    of ``blocks`` holds a copy; ``blocks[0]``'s stage is already charged in ``mem_prefix``/``ar_prefix``.

    ``mem_kib``: one copy's weights, gradients and optimizer state; ``ar``: per all-reduce class (as
    ``ar_prefix``), one more copy's optimizer step; ``tied``: per link (as ``comm_fwd``), the sum of their
    gradients over ``W`` ranks, ``W = 0..`` the cluster's devices (0 below two).
    """

    blocks: tuple[int, ...]
    mem_kib: int
    ar: tuple[int, ...]
    tied: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class StageProblem:
    """Integer data of one candidate; prefix arrays have ``num_blocks + 1`` entries.

    ``comm_fwd[l][c][c2]`` / ``comm_bwd[l][c][c2]``: the index into ``transfers`` of the time to send a
    microbatch's activations (gradients) across a cut on link ``l`` from a stage of class ``c`` to one of
    class ``c2`` (value at the cut's boundary); ``net_link``: the network's ``l``.
    """

    num_blocks: int
    max_stages: int
    microbatches: int
    schedule: str
    pools: tuple[PoolSupply, ...]
    options: tuple[StageOption, ...]
    fwd_prefix: tuple[tuple[int, ...], ...]
    bwd_prefix: tuple[tuple[int, ...], ...]
    mem_prefix: tuple[tuple[int, ...], ...]
    act_prefix: tuple[tuple[int, ...], ...]
    input_kib: tuple[tuple[int, ...], ...]
    ar_prefix: tuple[tuple[int, ...], ...]
    comm_classes: tuple[tuple[int, int], ...]
    transfers: tuple[tuple[int, ...], ...]
    comm_fwd: tuple[tuple[tuple[int, ...], ...], ...]
    comm_bwd: tuple[tuple[tuple[int, ...], ...], ...]
    net_link: int
    identical_hosts: tuple[tuple[int, int], ...] = ()
    time_unit_s: float = 1e-6
    shared: tuple[SharedGroup, ...] = ()

    def host_of(self, option: int) -> int:
        return self.pools[self.options[option].pool].host


@dataclass(frozen=True, slots=True)
class SolverProgress:
    """A progress report: best objective and bound so far (seconds), elapsed wall time, which model."""

    objective_s: float
    bound_s: float
    elapsed_s: float
    label: str = ""


class StageSlot(NamedTuple):
    """One stage of a solution: blocks ``[first, end)`` run as option ``group`` (an index into
    ``StageProblem.options``). A named tuple, so ``(first, end, option)`` literals read as one."""

    first: int
    end: int
    group: int


@dataclass(frozen=True, slots=True)
class StageSolution:
    """Status, objective and bound (integer units), wall seconds, and the stages in pipeline order; empty
    when no solution was found."""

    status: str
    objective: int
    bound: int
    seconds: float
    stages: tuple[StageSlot, ...]


class _Progress(cp_model.CpSolverSolutionCallback):
    def __init__(self, fn: Callable[[SolverProgress], None], unit: float, label: str) -> None:
        super().__init__()
        self._fn, self._unit, self._label = fn, unit, label
        self._t0 = time.perf_counter()

    def on_solution_callback(self) -> None:
        self._fn(
            SolverProgress(
                self.objective_value * self._unit,
                self.best_objective_bound * self._unit,
                time.perf_counter() - self._t0,
                self._label,
            )
        )


def solve_stage_problem(
    p: StageProblem,
    *,
    hint: Sequence[StageSlot] | None = None,
    workers: int = 2,
    deterministic_time: float = 5.0,
    time_limit_s: float = 30.0,
    progress: Callable[[SolverProgress], None] | None = None,
    label: str = "",
    log: bool = False,
) -> StageSolution:
    """Build and solve the model; ``hint`` is a solution in the same form as ``StageSolution.stages``.

    ``deterministic_time`` is CP-SAT's deterministic work limit (the answer depends on it alone) and
    ``time_limit_s`` a wall-clock cap (see [Note: determinism] in ``distplan.planner.search``)."""
    model = cp_model.CpModel()
    nb, ns, m = p.num_blocks, p.max_stages, p.microbatches
    opts = p.options
    pools = p.pools
    hosts = sorted({q.host for q in pools})
    gpipe = p.schedule == "gpipe"
    t_hi = max(f[-1] + b[-1] for f, b in zip(p.fwd_prefix, p.bwd_prefix, strict=True))
    edge_hi = 2 * max((o.edge_fwd + o.edge_bwd for o in opts), default=0)
    t_hi += max((o.fwd_const + o.bwd_const for o in opts), default=0) + edge_hi + 1

    # Variables ----------------------------------------------------------------------------------------
    end = [model.new_int_var(1, nb, f"end[{s}]") for s in range(ns)]
    used = [model.new_bool_var(f"used[{s}]") for s in range(ns)]
    y = {(s, oi): model.new_bool_var(f"y[{s},{oi}]") for s in range(ns) for oi in range(len(opts))}
    stage_t = [model.new_int_var(0, t_hi, f"T[{s}]") for s in range(ns)]
    c_hi = max((max(x) for x in p.transfers), default=0) + 1
    cf = [model.new_int_var(0, c_hi, f"cf[{s}]") for s in range(ns - 1)]
    cb = [model.new_int_var(0, c_hi, f"cb[{s}]") for s in range(ns - 1)]
    t_max = model.new_int_var(0, t_hi + 2 * c_hi, "Tmax")
    z_hi = (
        max((max(a) for a in p.ar_prefix), default=0)
        + max((o.ar_latency for o in opts), default=0)
        + sum(max(sh.ar, default=0) * ns + max((max(t) for t in sh.tied), default=0) for sh in p.shared)
        + 1
    )
    z = model.new_int_var(0, z_hi, "Z")

    # Constraints --------------------------------------------------------------------------------------
    # (a) contiguous, ordered stages; unused slots sit at the end and take no blocks.
    model.add(used[0] == 1)
    model.add(end[ns - 1] == nb)
    for s in range(ns):
        prev = end[s - 1] if s else 0
        model.add(end[s] >= prev + used[s])
        model.add(end[s] <= prev + nb * used[s])
        if s + 1 < ns:
            model.add(used[s] >= used[s + 1])

    # (b) one option per used stage, (c) pool supply.
    for s in range(ns):
        model.add(sum(y[s, oi] for oi in range(len(opts))) == used[s])
    for pi, q in enumerate(pools):
        model.add(
            sum(o.size * y[s, oi] for s in range(ns) for oi, o in enumerate(opts) if o.pool == pi)
            <= q.devices
        )

    elements: dict[tuple[str, int, int], cp_model.IntVar] = {}

    def element(arr: Sequence[int], name: str, idx: int, s: int, at: Any) -> cp_model.IntVar:
        key = (name, idx, s)
        if key not in elements:
            v = model.new_int_var(min(arr), max(arr), f"{name}{idx}[{s}]")
            model.add_element(at, list(arr), v)
            elements[key] = v
        return elements[key]

    def span(arr: Sequence[int], name: str, idx: int, s: int) -> Any:
        hi = element(arr, name, idx, s, end[s])
        return hi - element(arr, name, idx, s - 1, end[s - 1]) if s else hi - arr[0]

    # (d) stage compute time by the option's time class, (e) bottleneck.
    f_max = b_max = None
    if gpipe:
        f_hi = max(x[-1] for x in p.fwd_prefix) + max((o.fwd_const for o in opts), default=0) + edge_hi + 1
        b_hi = max(x[-1] for x in p.bwd_prefix) + max((o.bwd_const for o in opts), default=0) + edge_hi + 1
        f_max, b_max = model.new_int_var(0, f_hi, "Fmax"), model.new_int_var(0, b_hi, "Bmax")
        stage_f = [model.new_int_var(0, f_hi, f"F[{s}]") for s in range(ns)]
        stage_b = [model.new_int_var(0, b_hi, f"B[{s}]") for s in range(ns)]
    tfb = [
        tuple(a + b for a, b in zip(f, bw, strict=True))
        for f, bw in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
    ]
    for s in range(ns):
        # Pipeline boundaries of slot s: the one before it (s > 0) and the one after it (slot s + 1 used).
        sides = int(s > 0) + (used[s + 1] if s + 1 < ns else 0)
        for oi, o in enumerate(opts):
            if gpipe:
                ff = span(p.fwd_prefix[o.time], "fwd", o.time, s) + o.fwd_const + o.edge_fwd * sides
                bb = span(p.bwd_prefix[o.time], "bwd", o.time, s) + o.bwd_const + o.edge_bwd * sides
                model.add(stage_f[s] >= ff).only_enforce_if(y[s, oi])
                model.add(stage_b[s] >= bb).only_enforce_if(y[s, oi])
            else:
                tt = (
                    span(tfb[o.time], "tfb", o.time, s)
                    + o.fwd_const
                    + o.bwd_const
                    + (o.edge_fwd + o.edge_bwd) * sides
                )
                model.add(stage_t[s] >= tt).only_enforce_if(y[s, oi])
    for s in range(ns):
        rt = cf[s] + cb[s] if s + 1 < ns else 0
        if gpipe:
            model.add(stage_t[s] == stage_f[s] + stage_b[s])
            model.add(f_max >= stage_f[s])  # type: ignore[operator]
            model.add(b_max >= stage_b[s])  # type: ignore[operator]
        else:
            # Under 1F1B each stage is one microbatch ahead of the next, so the round trip of a cut is on
            # the steady state's critical path: the period is at most max_s (T_s + cf_s + cb_s) (see cost.py).
            model.add(t_max >= stage_t[s] + rt)

    # (f) communication between consecutive stages over the link they share, by the two stages' classes.
    on = {
        (s, h): sum(y[s, oi] for oi, o in enumerate(opts) if pools[o.pool].host == h)
        for s in range(ns)
        for h in hosts
    }
    classes = range(len(p.comm_classes))
    cls = {}
    for s in range(ns):
        for c in classes:
            b = model.new_bool_var(f"class[{s},{c}]")
            model.add(sum(y[s, oi] for oi, o in enumerate(opts) if o.comm == c) == b)
            cls[s, c] = b
    host_link = {q.host: q.link for q in pools}
    for s in range(ns - 1):
        link_lits: list[tuple[int, Any]] = []
        if len(hosts) == 1:
            link_lits.append((host_link[hosts[0]], used[s + 1]))
        else:
            same = []
            for h in hosts:
                # Exactly "both stages on host h": two stages of one host talk over its link even where the
                # network would be cheaper at this cut (the cost model prices it so).
                b = model.new_bool_var(f"same[{s},{h}]")
                model.add(b <= on[s, h])
                model.add(b <= on[s + 1, h])
                model.add(b >= on[s, h] + on[s + 1, h] - 1)
                same.append(b)
                link_lits.append((host_link[h], b))
            net = model.new_bool_var(f"net[{s}]")
            model.add(net + sum(same) == used[s + 1])
            link_lits.append((p.net_link, net))
        for lk, lit in link_lits:
            for c1 in classes:
                for c2 in classes:
                    tf, tb = p.comm_fwd[lk][c1][c2], p.comm_bwd[lk][c1][c2]
                    vf = element(p.transfers[tf], "x", tf, s, end[s])
                    vb = element(p.transfers[tb], "x", tb, s, end[s])
                    cond = [lit, cls[s, c1], cls[s + 1, c2]]
                    model.add(cf[s] >= vf).only_enforce_if(cond)
                    model.add(cb[s] >= vb).only_enforce_if(cond)

    # (j) shared parameters: who holds a copy, the copies beyond the first, the holders' gradient sum.
    extra_mem: list[Any] = [0] * ns
    extra_ar: dict[tuple[int, int], Any] = {}
    tied_s: list[Any] = [0] * ns
    size = [sum(o.size * y[s, oi] for oi, o in enumerate(opts)) for s in range(ns)]
    max_size = max((o.size for o in opts), default=1)
    for qi, sh in enumerate(p.shared):
        readers = [sum(1 for b in sh.blocks if b < j) for j in range(nb + 1)]
        hold = []
        for s in range(ns):
            holds = model.new_bool_var(f"hold[{s},{qi}]")
            n_read = span(readers, "readers", qi, s)
            model.add(n_read >= holds)
            model.add(n_read <= len(sh.blocks) * holds)
            hold.append(holds)
            if s == 0:
                continue  # stage 0 holds the first reader's copy if any: already charged
            after = model.new_bool_var(f"after[{s},{qi}]")
            model.add(end[s - 1] >= sh.blocks[0] + 1).only_enforce_if(after)
            model.add(end[s - 1] <= sh.blocks[0]).only_enforce_if(~after)
            x = model.new_bool_var(f"extra[{s},{qi}]")
            model.add_bool_and([holds, after]).only_enforce_if(x)
            model.add_bool_or([~holds, ~after, x])
            extra_mem[s] = extra_mem[s] + sh.mem_kib * x
            for c in range(len(sh.ar)):
                extra_ar[s, c] = extra_ar.get((s, c), 0) + sh.ar[c] * x
        # The ranks holding a copy: every device of every holding stage.
        ranks = []
        for s in range(ns):
            r = model.new_int_var(0, max_size, f"ranks[{s},{qi}]")
            model.add(r == size[s]).only_enforce_if(hold[s])
            model.add(r == 0).only_enforce_if(~hold[s])
            ranks.append(r)
        world_hi = len(sh.tied[0]) - 1
        world = model.new_int_var(0, world_hi, f"world[{qi}]")
        model.add(world == sum(ranks))
        t_hi_q = max(max(t) for t in sh.tied) + 1
        t_q = model.new_int_var(0, t_hi_q, f"tied[{qi}]")

        def by_world(table: Sequence[int], name: str, count: cp_model.IntVar = world) -> cp_model.IntVar:
            v = model.new_int_var(min(table), max(table), name)
            model.add_element(count, list(table), v)
            return v

        if len(hosts) == 1:
            model.add(t_q >= by_world(sh.tied[host_link[hosts[0]]], f"tied_host[{qi}]"))
        else:
            hold_on = []
            for h in hosts:
                hs = []
                for s in range(ns):
                    b = model.new_bool_var(f"hold_on[{s},{qi},{h}]")
                    model.add(b <= hold[s])
                    model.add(b <= on[s, h])
                    model.add(b >= hold[s] + on[s, h] - 1)
                    hs.append(b)
                flag = model.new_bool_var(f"holds_on[{qi},{h}]")
                model.add_max_equality(flag, hs)
                hold_on.append(flag)
            cross = model.new_bool_var(f"cross[{qi}]")
            model.add(2 * cross <= sum(hold_on))
            model.add(sum(hold_on) <= 1 + len(hosts) * cross)
            model.add(t_q >= by_world(sh.tied[p.net_link], f"tied_net[{qi}]")).only_enforce_if(cross)
            for h, flag in zip(hosts, hold_on, strict=True):
                th = by_world(sh.tied[host_link[h]], f"tied_host[{qi},{h}]")
                model.add(t_q >= th).only_enforce_if([flag, ~cross])
        for s in range(ns):
            ts = model.new_int_var(0, t_hi_q, f"tied[{s},{qi}]")
            model.add(ts >= t_q).only_enforce_if(hold[s])
            tied_s[s] = tied_s[s] + ts

    # (g) all-reduce and optimizer step of the slowest stage.
    for s in range(ns):
        for oi, o in enumerate(opts):
            model.add(
                z
                >= span(p.ar_prefix[o.ar], "ar", o.ar, s)
                + o.ar_latency
                + extra_ar.get((s, o.ar), 0)
                + tied_s[s]
            ).only_enforce_if(y[s, oi])

    # (h) memory per device: state, activations of the in-flight microbatches, what recomputation holds.
    for s in range(ns):
        for oi, o in enumerate(opts):
            cap = pools[o.pool].cap_kib
            fixed = span(p.mem_prefix[o.state], "mem", o.state, s) + extra_mem[s] + o.extra_kib
            if o.once >= 0:
                fixed = fixed + span(p.act_prefix[o.once], "act", o.once, s)
            per_mb: Any = 0
            if o.act >= 0:
                per_mb = span(p.act_prefix[o.act], "act", o.act, s)
            if o.inputs >= 0:
                at = end[s - 1] if s else model.new_constant(0)
                per_mb = per_mb + element(p.input_kib[o.inputs], "inp", o.inputs, s - 1, at)
            if gpipe:
                model.add(fixed + m * per_mb <= cap).only_enforce_if([y[s, oi], used[s]])
            else:
                for v in range(1, min(m, ns - s) + 1):
                    model.add(fixed + v * per_mb <= cap).only_enforce_if([y[s, oi], used[s + v - 1]])

    # (i) symmetry between identical hosts.
    for h1, h2 in p.identical_hosts:
        on1 = [o.size * y[s, oi] for s in range(ns) for oi, o in enumerate(opts) if pools[o.pool].host == h1]
        on2 = [o.size * y[s, oi] for s in range(ns) for oi, o in enumerate(opts) if pools[o.pool].host == h2]
        model.add(sum(on1) >= sum(on2))

    # Objective ----------------------------------------------------------------------------------------
    steady = (m - 1) * (f_max + b_max) if gpipe else (m - 1) * t_max  # type: ignore[operator]
    model.minimize(sum(stage_t) + steady + sum(cf) + sum(cb) + z)

    if hint:
        hint_end = {s: e for s, (_, e, _) in enumerate(hint)}
        for s in range(ns):
            model.add_hint(end[s], hint_end.get(s, nb))
            model.add_hint(used[s], s < len(hint))
            for oi in range(len(opts)):
                model.add_hint(y[s, oi], s < len(hint) and hint[s][2] == oi)

    # Solve --------------------------------------------------------------------------------------------
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.num_workers = max(1, workers)
    prm.random_seed = 0
    # CP-SAT's own Ctrl-C handler is installed for each solve and reset to the default action afterwards
    # (OR-Tools 9.15): a SIGINT after any solve then killed the process outright -- the service lost its
    # graceful shutdown, the CLI its "interrupted". The caller's handlers stay in charge instead.
    prm.catch_sigint_signal = False
    # Deterministic work limit first (same answer on every run and any load); wall clock only as a
    # safety net. interleave_search makes the portfolio deterministic whatever the worker count.
    prm.interleave_search = True
    # An explicit batch size: with the automatic one (0), OR-Tools 9.15 kept running until the wall-clock
    # limit after proving optimality (measured: a 2-stage model done at 0.8 s returned at 30 s).
    prm.interleave_batch_size = max(1, workers)
    prm.max_deterministic_time = deterministic_time
    prm.max_time_in_seconds = time_limit_s
    # Probing in presolve costs seconds on these models (one value encoding per stage and prefix array)
    # and buys little: on Llama-7B x 64 GPUs it was most of the wall time.
    prm.cp_model_probing_level = 0
    # The core-based (max-SAT) worker ignored the deterministic limit inside interleaved search: the batch
    # it ran in waited for it until the wall clock stopped the solve (measured: a 6-block, 4-stage model
    # proved optimal by another worker at 0.04 s returned after the 5 s wall limit; OR-Tools 9.15). Without
    # it, solves end on their deterministic limit. See [Note: determinism] in distplan.planner.search.
    prm.ignore_subsolvers.append("core")
    prm.log_search_progress = log
    t0 = time.perf_counter()
    cb_ = _Progress(progress, p.time_unit_s, label) if progress else None
    status = solver.solve(model, cb_)
    seconds = time.perf_counter() - t0
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return StageSolution(name, 0, 0, seconds, ())
    stages: list[StageSlot] = []
    first = 0
    for s in range(ns):
        if not solver.boolean_value(used[s]):
            break
        last = int(solver.value(end[s]))
        oi = next(oi for oi in range(len(opts)) if solver.boolean_value(y[s, oi]))
        stages.append(StageSlot(first, last, oi))
        first = last
    return StageSolution(
        name,
        round(solver.objective_value),
        round(solver.best_objective_bound),
        seconds,
        tuple(stages),
    )
