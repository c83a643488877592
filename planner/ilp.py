"""The stage-partition-and-placement integer program, solved with OR-Tools CP-SAT.

One model per (data-parallel degree ``D``, microbatch count ``M``, schedule); the caller enumerates those
(``distplan.planner.candidates``) and builds each model's data (``distplan.planner.problem``). All quantities arrive as integers in :class:`StageProblem`: times in
``time_unit_s`` units, memory in KiB, every per-block quantity as a *prefix array* over block boundaries
``0..B`` so that a stage ``[end[s-1], end[s])`` costs ``A[end[s]] - A[end[s-1]]`` (one element constraint
per stage and array, no products).

Sets: blocks ``j = 0..B-1``, stage slots ``s = 0..S-1`` (used slots come first), group types ``g``
(``D`` same-kind devices on one host; ``n_g`` of them available), kinds ``k``, hosts ``h``.

Variables: ``end[s]`` (boundary where stage ``s`` ends; ``end[-1] = 0``), ``used[s]``, ``y[s, g]`` (stage
``s`` runs on a group of type ``g``), ``T[s]`` (forward + backward per microbatch), ``Tmax``,
``comm[s]`` (send time to stage ``s + 1``), ``same[s, h]`` / ``net[s]`` (which link that send uses),
``Z`` (the slowest all-reduce + optimizer step).

Constraints:
  (a) contiguous, ordered stages:  ``end[s-1] + used[s] <= end[s] <= end[s-1] + B * used[s]``,
      ``used[s] >= used[s+1]``, ``used[0] = 1``, ``end[S-1] = B``
  (b) one group per used stage:    ``sum_g y[s, g] = used[s]``
  (c) group supply:                ``sum_s y[s, g] <= n_g``
  (d) stage compute time:          ``T[s] >= TFB_k[end[s]] - TFB_k[end[s-1]]``  if stage ``s`` is of kind ``k``
  (e) bottleneck:                  ``Tmax >= T[s] + 2 comm[s]`` (1F1B), ``Fmax >= F[s]``, ``Bmax >= B[s]`` (GPipe)
  (f) communication:               ``comm[s] >= C_h[end[s]]`` if ``same[s, h]`` (both stages on host ``h``),
      ``comm[s] >= C_net[end[s]]`` if ``net[s]``; ``same[s, h] = on[s, h] and on[s+1, h]``;
      ``net[s] + sum_h same[s, h] = used[s+1]``
  (g) all-reduce + optimizer:      ``Z >= AR_c[end[s]] - AR_c[end[s-1]] + latency_g``  if ``y[s, g]``
  (h) memory per device:           ``P[s] + v * A[s] <= sum_g cap_g y[s, g]``  if ``used[s + v - 1]``, for
      ``v = 1..min(M, S - s)`` (1F1B: stage ``s`` of ``S`` holds ``min(S - s, M)`` microbatches; the
      constraint for ``v`` is live exactly when at least ``s + v`` stages are used); GPipe: ``v = M``
  (i) symmetry: of two identical hosts, the first hosts at least as many stages.
  (j) shared parameters (:class:`SharedGroup` ``p``, read in blocks ``R_p``, first ``f_p``; see
      [Note: shared parameters] in ``distplan.graph``):
      ``hold[s, p]`` iff stage ``s`` covers a block of ``R_p`` (``hold <= n_p[end[s]] - n_p[end[s-1]] <=
      |R_p| hold``, ``n_p`` counting readers before a boundary); ``extra[s, p] = hold[s, p] and end[s-1] >
      f_p`` (a copy beyond the first holder, which ``mem_prefix`` / ``ar_prefix`` already charge): memory
      (h) gains ``mem_p extra[s, p]``, the all-reduce term (g) ``AR_p,c extra[s, p]``; the holders' gradient
      sum takes ``G_p[l][H_p]`` with ``H_p = sum_s hold[s, p]`` holders, on the network ``l`` if they sit on
      two hosts or more (``cross_p``), else on their host's link, and (g) gains it for every holder.

Objective (the cost model's closed form, see ``distplan.planner.cost``):
  1F1B:  ``sum_s T[s] + 2 sum_s comm[s] + (M - 1) Tmax + Z``
  GPipe: ``sum_s T[s] + (M - 1) (Fmax + Bmax) + 2 sum_s comm[s] + Z`` with ``F``/``B`` split like (d)-(e).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ortools.sat.python import cp_model

__all__ = [
    "GroupType",
    "SharedGroup",
    "SolverProgress",
    "StageProblem",
    "StageSlot",
    "StageSolution",
    "solve_stage_problem",
]


@dataclass(frozen=True, slots=True)
class GroupType:
    """``count`` interchangeable groups of ``D`` devices of kind ``kind`` on host ``host``.

    ``cap_kib``: usable memory per device; ``ar_class``: index into ``StageProblem.ar_prefix``;
    ``ar_latency``: the all-reduce's fixed latency; ``link``: index into ``StageProblem.comm_prefix`` of
    the host's own link.
    """

    host: int
    kind: int
    count: int
    cap_kib: int
    ar_class: int
    ar_latency: int
    link: int


@dataclass(frozen=True, slots=True)
class SharedGroup:
    """Parameters read in several blocks (a tied embedding and output projection): every stage covering one
    of ``blocks`` holds a copy; ``blocks[0]``'s stage is already charged in ``mem_prefix``/``ar_prefix``.

    ``mem_kib``: one copy's weights, gradients and optimizer state; ``ar``: per all-reduce class (as
    ``ar_prefix``), one more copy's data-parallel all-reduce (latency apart) and optimizer step; ``tied``:
    per link (as ``comm_prefix``), the holders' gradient sum by holder count ``0..max_stages`` (0 below two).
    """

    blocks: tuple[int, ...]
    mem_kib: int
    ar: tuple[int, ...]
    tied: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class StageProblem:
    """Integer data of one (D, M, schedule) model; prefix arrays have ``num_blocks + 1`` entries."""

    num_blocks: int
    max_stages: int
    microbatches: int
    schedule: str
    groups: tuple[GroupType, ...]
    fwd_prefix: tuple[tuple[int, ...], ...]  # per kind
    bwd_prefix: tuple[tuple[int, ...], ...]  # per kind
    ar_prefix: tuple[tuple[int, ...], ...]  # per all-reduce class (kind x link x dp)
    comm_prefix: tuple[tuple[int, ...], ...]  # per link class; value at end boundary j
    net_link: int  # index into comm_prefix of the inter-host network
    mem_prefix: tuple[int, ...]  # KiB of weights + grads + optimizer state
    act_prefix: tuple[int, ...]  # KiB of activations per microbatch
    identical_hosts: tuple[tuple[int, int], ...] = ()
    time_unit_s: float = 1e-6
    shared: tuple[SharedGroup, ...] = ()


@dataclass(frozen=True, slots=True)
class SolverProgress:
    """A progress report: best objective and bound so far (seconds), elapsed wall time, which model."""

    objective_s: float
    bound_s: float
    elapsed_s: float
    label: str = ""


class StageSlot(NamedTuple):
    """One stage of a solution: blocks ``[first, end)`` on a group of type ``group`` (an index into
    ``StageProblem.groups``). A named tuple, so ``(first, end, group)`` literals read as one."""

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
    groups = p.groups
    kinds = range(len(p.fwd_prefix))
    hosts = sorted({g.host for g in groups})
    gpipe = p.schedule == "gpipe"
    tfb = [
        tuple(a + b for a, b in zip(f, bw, strict=True))
        for f, bw in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
    ]
    t_hi = max(x[-1] for x in tfb) + 1

    # Variables ----------------------------------------------------------------------------------------
    end = [model.new_int_var(1, nb, f"end[{s}]") for s in range(ns)]
    used = [model.new_bool_var(f"used[{s}]") for s in range(ns)]
    y = {(s, gi): model.new_bool_var(f"y[{s},{gi}]") for s in range(ns) for gi in range(len(groups))}
    stage_t = [model.new_int_var(0, t_hi, f"T[{s}]") for s in range(ns)]
    t_max = model.new_int_var(0, t_hi, "Tmax")
    comm_hi = max((max(c) for c in p.comm_prefix), default=0) + 1
    comm = [model.new_int_var(0, comm_hi, f"comm[{s}]") for s in range(ns - 1)]
    z_hi = (
        max((max(a) for a in p.ar_prefix), default=0)
        + max((g.ar_latency for g in groups), default=0)
        + sum(max(sh.ar, default=0) + max((max(t) for t in sh.tied), default=0) for sh in p.shared)
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

    # (b) one group per used stage, (c) group supply.
    for s in range(ns):
        model.add(sum(y[s, gi] for gi in range(len(groups))) == used[s])
    for gi, g in enumerate(groups):
        model.add(sum(y[s, gi] for s in range(ns)) <= g.count)

    def element(arr: Sequence[int], s: int, name: str) -> cp_model.IntVar:
        v = model.new_int_var(min(arr), max(arr), f"{name}[{s}]")
        model.add_element(end[s], list(arr), v)
        return v

    def span(arrs: list[cp_model.IntVar], s: int) -> Any:
        return arrs[s] - arrs[s - 1] if s else arrs[s]

    # (d) stage compute time on the stage's kind, (e) bottleneck.
    is_kind = {}
    for s in range(ns):
        for k in kinds:
            b = model.new_bool_var(f"kind[{s},{k}]")
            model.add(sum(y[s, gi] for gi, g in enumerate(groups) if g.kind == k) == b)
            is_kind[s, k] = b
    f_max = b_max = None
    if gpipe:
        f_hi = max(x[-1] for x in p.fwd_prefix) + 1
        b_hi = max(x[-1] for x in p.bwd_prefix) + 1
        f_max, b_max = model.new_int_var(0, f_hi, "Fmax"), model.new_int_var(0, b_hi, "Bmax")
        stage_f = [model.new_int_var(0, f_hi, f"F[{s}]") for s in range(ns)]
        stage_b = [model.new_int_var(0, b_hi, f"B[{s}]") for s in range(ns)]
    for k in kinds:
        if gpipe:
            ef = [element(p.fwd_prefix[k], s, f"fwd{k}") for s in range(ns)]
            eb = [element(p.bwd_prefix[k], s, f"bwd{k}") for s in range(ns)]
            for s in range(ns):
                model.add(stage_f[s] >= span(ef, s)).only_enforce_if(is_kind[s, k])
                model.add(stage_b[s] >= span(eb, s)).only_enforce_if(is_kind[s, k])
        else:
            e = [element(tfb[k], s, f"tfb{k}") for s in range(ns)]
            for s in range(ns):
                model.add(stage_t[s] >= span(e, s)).only_enforce_if(is_kind[s, k])
    for s in range(ns):
        if gpipe:
            model.add(stage_t[s] == stage_f[s] + stage_b[s])
            model.add(f_max >= stage_f[s])  # type: ignore[operator]
            model.add(b_max >= stage_b[s])  # type: ignore[operator]
        else:
            # Under 1F1B each stage is one microbatch ahead of the next, so the round trip of a cut is on
            # the steady state's critical path: the period is at most max_s (T_s + 2 c_s) (see cost.py).
            model.add(t_max >= stage_t[s] + (2 * comm[s] if s + 1 < ns else 0))

    # (f) communication between consecutive stages over the link they share.
    links_used = sorted({g.link for g in groups} | ({p.net_link} if len(hosts) > 1 else set()))
    cvals = {lk: [element(p.comm_prefix[lk], s, f"comm{lk}") for s in range(ns - 1)] for lk in links_used}
    on = {
        (s, h): sum(y[s, gi] for gi, g in enumerate(groups) if g.host == h) for s in range(ns) for h in hosts
    }
    host_link = {g.host: g.link for g in groups}
    for s in range(ns - 1):
        if len(hosts) == 1:
            model.add(comm[s] >= cvals[host_link[hosts[0]]][s]).only_enforce_if(used[s + 1])
            continue
        same = []
        for h in hosts:
            # Exactly "both stages on host h": two stages of one host talk over its link even where the
            # network would be cheaper at this cut (the cost model prices it so).
            b = model.new_bool_var(f"same[{s},{h}]")
            model.add(b <= on[s, h])
            model.add(b <= on[s + 1, h])
            model.add(b >= on[s, h] + on[s + 1, h] - 1)
            model.add(comm[s] >= cvals[host_link[h]][s]).only_enforce_if(b)
            same.append(b)
        net = model.new_bool_var(f"net[{s}]")
        model.add(net + sum(same) == used[s + 1])
        model.add(comm[s] >= cvals[p.net_link][s]).only_enforce_if(net)

    # (j) shared parameters: who holds a copy, the copies beyond the first, the holders' gradient sum.
    extra_mem: list[Any] = [0] * ns
    extra_ar: dict[tuple[int, int], Any] = {}
    tied_s: list[Any] = [0] * ns
    for pi, sh in enumerate(p.shared):
        readers = [sum(1 for b in sh.blocks if b < j) for j in range(nb + 1)]
        r_end = [element(readers, s, f"readers{pi}") for s in range(ns)]
        hold = []
        for s in range(ns):
            holds = model.new_bool_var(f"hold[{s},{pi}]")
            model.add(span(r_end, s) >= holds)
            model.add(span(r_end, s) <= len(sh.blocks) * holds)
            hold.append(holds)
            if s == 0:
                continue  # stage 0 holds the first reader's copy if any: already charged
            after = model.new_bool_var(f"after[{s},{pi}]")
            model.add(end[s - 1] >= sh.blocks[0] + 1).only_enforce_if(after)
            model.add(end[s - 1] <= sh.blocks[0]).only_enforce_if(~after)
            x = model.new_bool_var(f"extra[{s},{pi}]")
            model.add_bool_and([holds, after]).only_enforce_if(x)
            model.add_bool_or([~holds, ~after, x])
            extra_mem[s] = extra_mem[s] + sh.mem_kib * x
            for c in range(len(sh.ar)):
                extra_ar[s, c] = extra_ar.get((s, c), 0) + sh.ar[c] * x
        holders = model.new_int_var(0, ns, f"holders[{pi}]")
        model.add(holders == sum(hold))
        t_hi = max(max(t) for t in sh.tied) + 1
        t_p = model.new_int_var(0, t_hi, f"tied[{pi}]")

        def by_holders(table: Sequence[int], name: str, count: cp_model.IntVar = holders) -> cp_model.IntVar:
            v = model.new_int_var(min(table), max(table), name)
            model.add_element(count, list(table), v)
            return v

        if len(hosts) == 1:
            model.add(t_p >= by_holders(sh.tied[host_link[hosts[0]]], f"tied_host[{pi}]"))
        else:
            hold_on = []
            for h in hosts:
                hs = []
                for s in range(ns):
                    b = model.new_bool_var(f"hold_on[{s},{pi},{h}]")
                    model.add(b <= hold[s])
                    model.add(b <= on[s, h])
                    model.add(b >= hold[s] + on[s, h] - 1)
                    hs.append(b)
                o = model.new_bool_var(f"holds_on[{pi},{h}]")
                model.add_max_equality(o, hs)
                hold_on.append(o)
            cross = model.new_bool_var(f"cross[{pi}]")
            model.add(2 * cross <= sum(hold_on))
            model.add(sum(hold_on) <= 1 + len(hosts) * cross)
            model.add(t_p >= by_holders(sh.tied[p.net_link], f"tied_net[{pi}]")).only_enforce_if(cross)
            for h, o in zip(hosts, hold_on, strict=True):
                th = by_holders(sh.tied[host_link[h]], f"tied_host[{pi},{h}]")
                model.add(t_p >= th).only_enforce_if([o, ~cross])
        for s in range(ns):
            ts = model.new_int_var(0, t_hi, f"tied[{s},{pi}]")
            model.add(ts >= t_p).only_enforce_if(hold[s])
            tied_s[s] = tied_s[s] + ts

    # (g) all-reduce and optimizer step of the slowest stage.
    ar_classes = sorted({g.ar_class for g in groups})
    avals = {c: [element(p.ar_prefix[c], s, f"ar{c}") for s in range(ns)] for c in ar_classes}
    for s in range(ns):
        for gi, g in enumerate(groups):
            model.add(
                z >= span(avals[g.ar_class], s) + g.ar_latency + extra_ar.get((s, g.ar_class), 0) + tied_s[s]
            ).only_enforce_if(y[s, gi])

    # (h) memory per device: parameters, gradients, optimizer state + activations in flight.
    mem_end = [element(p.mem_prefix, s, "mem") for s in range(ns)]
    act_end = [element(p.act_prefix, s, "act") for s in range(ns)]
    for s in range(ns):
        cap = sum(g.cap_kib * y[s, gi] for gi, g in enumerate(groups))
        state = span(mem_end, s) + extra_mem[s]
        if gpipe:
            model.add(state + m * span(act_end, s) <= cap).only_enforce_if(used[s])
        else:
            for v in range(1, min(m, ns - s) + 1):
                model.add(state + v * span(act_end, s) <= cap).only_enforce_if(used[s + v - 1])

    # (i) symmetry between identical hosts.
    for h1, h2 in p.identical_hosts:
        model.add(sum(on[s, h1] for s in range(ns)) >= sum(on[s, h2] for s in range(ns)))

    # Objective ----------------------------------------------------------------------------------------
    steady = (m - 1) * (f_max + b_max) if gpipe else (m - 1) * t_max  # type: ignore[operator]
    model.minimize(sum(stage_t) + steady + 2 * sum(comm) + z)

    if hint:
        hint_end = {s: e for s, (_, e, _) in enumerate(hint)}
        for s in range(ns):
            model.add_hint(end[s], hint_end.get(s, nb))
            model.add_hint(used[s], s < len(hint))
            for gi in range(len(groups)):
                model.add_hint(y[s, gi], s < len(hint) and hint[s][2] == gi)

    # Solve --------------------------------------------------------------------------------------------
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.num_workers = max(1, workers)
    prm.random_seed = 0
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
    cb = _Progress(progress, p.time_unit_s, label) if progress else None
    status = solver.solve(model, cb)
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
        gi = next(gi for gi in range(len(groups)) if solver.boolean_value(y[s, gi]))
        stages.append(StageSlot(first, last, gi))
        first = last
    return StageSolution(
        name,
        round(solver.objective_value),
        round(solver.best_objective_bound),
        seconds,
        tuple(stages),
    )
