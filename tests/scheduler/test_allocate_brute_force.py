"""The allocation program equals exhaustive search on small random instances.

Exhaustive search enumerates every choice per job (wait, keep, each option, each pair and join) and checks
the packing on the real bins by backtracking -- so the program's counting constraint (divisible piece sizes,
see ``distplan.scheduler.shapes``) is checked against true bin packing, not against itself.
"""

from __future__ import annotations

import itertools
import random

import pytest

from distplan.scheduler.allocate import (
    AllocationProblem,
    BinSpec,
    Choice,
    JobEntry,
    Join,
    Keep,
    Option,
    Pair,
    SharedKeep,
    lexicographic_values,
    solve_allocation,
)

#: Values are integers up to this, and each level holds one term of exactly this, so the program's
#: integer scaling (VALUE_RESOLUTION / largest) is exact and ties break the same way in both searches.
TOP = 20


def _packs(p: AllocationProblem, choices: tuple[Choice, ...]) -> bool:
    """True packing: every chosen piece on a bin of its pool with room, a multi-host option's pieces on
    distinct bins, kept jobs and running pairs where they are."""
    free = [b.capacity for b in p.bins]
    for j, c in enumerate(choices):
        if c.kind == "keep":
            keep = p.jobs[j].keep
            assert keep is not None
            for b, n in keep.usage.items():
                free[b] -= n
    for sk in p.shared:
        if choices[sk.a].kind == "keep" or choices[sk.b].kind == "keep":
            free[sk.bin] -= 1
    if min(free) < 0:
        return False
    groups: list[tuple[int, int, int]] = []  # (pool, piece, hosts)
    seen_pairs = set()
    for j, c in enumerate(choices):
        if c.kind == "option":
            o = p.jobs[j].options[c.index]
            groups.append((o.pool, o.per_host, o.hosts))
        elif c.kind == "pair" and c.index not in seen_pairs:
            seen_pairs.add(c.index)
            groups.append((p.pairs[c.index].pool, 1, 1))
    groups.sort(key=lambda g: -g[1])

    def place(i: int) -> bool:
        if i == len(groups):
            return True
        pool, piece, hosts = groups[i]
        bins = [b for b, spec in enumerate(p.bins) if spec.pool == pool and free[b] >= piece]
        for combo in itertools.combinations(bins, hosts):
            for b in combo:
                free[b] -= piece
            if place(i + 1):
                return True
            for b in combo:
                free[b] += piece
        return False

    return place(0)


def _fair(p: AllocationProblem, choices: tuple[Choice, ...]) -> list[float]:
    out = []
    for j, c in enumerate(choices):
        e = p.jobs[j]
        f = e.wait_fair
        if c.kind == "option":
            f = e.options[c.index].fair
        elif c.kind == "keep":
            assert e.keep is not None
            f = e.keep.fair
        elif c.kind == "pair":
            pr = p.pairs[c.index]
            f = pr.fair_a if j == pr.a else pr.fair_b
        elif c.kind == "join":
            f = p.joins[c.index].fair_job
        out.append(f)
    for k, jn in enumerate(p.joins):
        if choices[jn.job] == Choice("join", k):
            out[jn.host] += jn.fair_delta_host
    for sk in p.shared:
        if choices[sk.a].kind == "keep" and choices[sk.b].kind == "keep":
            out[sk.a] += sk.fair_delta_a
            out[sk.b] += sk.fair_delta_b
    return out


def _brute(p: AllocationProblem) -> tuple[tuple[float, ...], tuple[Choice, ...]]:
    per_job: list[list[Choice]] = []
    for j, e in enumerate(p.jobs):
        cs = [Choice("wait")] + [Choice("option", o) for o in range(len(e.options))]
        if e.keep is not None:
            cs.append(Choice("keep"))
        cs += [Choice("pair", k) for k, pr in enumerate(p.pairs) if j in (pr.a, pr.b)]
        cs += [Choice("join", k) for k, jn in enumerate(p.joins) if jn.job == j]
        per_job.append(cs)
    best: tuple[tuple[float, ...], tuple[Choice, ...]] | None = None
    for choices in itertools.product(*per_job):
        vals = lexicographic_values(p, choices)
        if vals is None or not _packs(p, choices):
            continue
        if p.objective == "max-min":
            key: tuple[float, ...] = (min(_fair(p, choices)), sum(vals))
        elif p.objective == "min-max":
            key = (-max(_fair(p, choices)), sum(vals))
        else:
            key = vals
        if best is None or key > best[0]:
            best = (key, choices)
    assert best is not None, "waiting everywhere and keeping every running job is always feasible"
    return best


def _instance(rng: random.Random, objective: str) -> AllocationProblem:
    # pool 0: two bins of 4; pool 1: one bin of 3 (not a power of two: its pieces stop at 2)
    bins = (BinSpec(0, 4), BinSpec(0, 4), BinSpec(1, 3))
    free = [4, 4, 3]
    njobs = rng.randint(3, 5)
    levels = [rng.randint(0, 1) for _ in range(njobs)]
    jobs: list[JobEntry] = []
    running_one: list[int] = []
    for j in range(njobs):
        opts = []
        for _ in range(rng.randint(1, 3)):
            pool = 0 if rng.random() < 0.75 else 1
            part = 4 if pool == 0 else 2
            if pool == 0 and rng.random() < 0.15:
                opts.append(Option(0, 4, 2, rng.randint(1, TOP), rng.randint(0, TOP)))
            else:
                # large pieces most often: they are what fragmentation hurts
                piece = rng.choice([part, part, part // 2 or 1, 1])
                opts.append(Option(pool, piece, 1, rng.randint(1, TOP), rng.randint(0, TOP)))
        keep = None
        if rng.random() < 0.6:
            b = rng.randrange(3)
            n = rng.choice([c for c in (1, 1, 2) if c <= free[b]] or [0])
            if n:
                free[b] -= n
                keep = Keep({b: n}, rng.randint(1, TOP), rng.randint(0, TOP))
                if n == 1:
                    running_one.append(j)
        jobs.append(JobEntry(levels[j], tuple(opts), keep, rng.randint(0, TOP // 2)))
    # One term of exactly TOP in every level (see TOP).
    for lv in set(levels):
        j = levels.index(lv)
        e = jobs[j]
        jobs[j] = JobEntry(
            e.level,
            (Option(e.options[0].pool, e.options[0].per_host, e.options[0].hosts, TOP, TOP), *e.options[1:]),
            e.keep,
            e.wait_fair,
        )
    if objective in ("max-min", "min-max"):
        # ... and one score of exactly TOP, for the same reason.
        e = jobs[0]
        jobs[0] = JobEntry(e.level, e.options, e.keep, TOP)
    pairs = []
    joins = []
    waiting = [j for j in range(njobs) if jobs[j].keep is None]
    for a, b in itertools.combinations(waiting, 2):
        if rng.random() < 0.5:
            pairs.append(
                Pair(
                    a,
                    b,
                    rng.randint(0, 1),
                    rng.randint(1, TOP),
                    rng.randint(1, TOP),
                    rng.randint(0, TOP),
                    rng.randint(0, TOP),
                )
            )
    for h in running_one:
        for a in waiting:
            if rng.random() < 0.5:
                joins.append(
                    Join(
                        a,
                        h,
                        rng.randint(1, TOP),
                        -rng.randint(0, TOP // 2),
                        rng.randint(0, TOP),
                        -rng.randint(0, 3),
                    )
                )
    shared = []
    if len(running_one) >= 2 and rng.random() < 0.5:
        a, b = running_one[:2]
        ka, kb = jobs[a].keep, jobs[b].keep
        assert ka is not None and kb is not None
        # they share a's device: b's own device is released
        (ba,) = ka.usage
        jobs[a] = JobEntry(jobs[a].level, jobs[a].options, Keep({}, ka.value, ka.fair), jobs[a].wait_fair)
        jobs[b] = JobEntry(jobs[b].level, jobs[b].options, Keep({}, kb.value, kb.fair), jobs[b].wait_fair)
        shared.append(
            SharedKeep(
                a, b, ba, -rng.randint(0, 5), -rng.randint(0, 5), -rng.randint(0, 3), -rng.randint(0, 3)
            )
        )
        joins = [jn for jn in joins if jn.host not in (a, b)]
    return AllocationProblem(
        bins, tuple(jobs), tuple(pairs), tuple(joins), tuple(shared), objective=objective
    )


@pytest.mark.parametrize("seed", range(120))
def test_lexicographic_program_equals_exhaustive_search(seed: int) -> None:
    p = _instance(random.Random(seed), "lexicographic")
    sol = solve_allocation(p)
    assert sol.optimal, sol.statuses
    got = lexicographic_values(p, sol.choices)
    assert got is not None, "the program broke a non-packing constraint"
    assert _packs(p, sol.choices), "the program chose an allocation that does not pack into the bins"
    want, _ = _brute(p)
    assert got == pytest.approx(want, abs=1e-9), (got, want)


@pytest.mark.parametrize("objective", ["max-min", "min-max"])
@pytest.mark.parametrize("seed", range(15))
def test_fairness_programs_equal_exhaustive_search(seed: int, objective: str) -> None:
    p = _instance(random.Random(1000 + seed), objective)
    sol = solve_allocation(p)
    assert sol.optimal, sol.statuses
    vals = lexicographic_values(p, sol.choices)
    assert vals is not None and _packs(p, sol.choices)
    want, _ = _brute(p)
    fair = _fair(p, sol.choices)
    got = (min(fair) if objective == "max-min" else -max(fair), sum(vals))
    assert got == pytest.approx(want, abs=1e-9), (got, want)


def test_packing_count_is_exact_not_just_capacity() -> None:
    # Two 3-device pieces... are not shapes; two 2-device jobs and one 4-device job on two bins of 4 fit,
    # but a 4-device job next to a kept 1-device job on each bin does not, although 6 devices are free.
    bins = (BinSpec(0, 4), BinSpec(0, 4))
    jobs = (
        JobEntry(0, (), Keep({0: 1}, 1.0)),
        JobEntry(0, (), Keep({1: 1}, 1.0)),
        JobEntry(0, (Option(0, 4, 1, 10.0),)),
    )
    sol = solve_allocation(AllocationProblem(bins, jobs))
    # Running the 4-device job needs a whole bin: one of the kept jobs must stop (10 > 1).
    assert sol.choices[2] == Choice("option", 0)
    assert sorted(c.kind for c in sol.choices[:2]) == ["keep", "wait"]


def test_bad_problem_is_named() -> None:
    from distplan.scheduler.model import SchedulerError

    with pytest.raises(SchedulerError, match="not a shape of pool 0"):
        AllocationProblem((BinSpec(0, 4),), (JobEntry(0, (Option(0, 3, 1, 1.0),)),))
    with pytest.raises(SchedulerError, match="non-finite"):
        AllocationProblem((BinSpec(0, 4),), (JobEntry(0, (Option(0, 2, 1, float("nan")),)),))
