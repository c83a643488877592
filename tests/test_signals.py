"""Ctrl-C stays with the caller after a CP-SAT solve.

OR-Tools installs its own SIGINT handler for each solve and resets SIGINT to the default action when the
solve ends (``catch_sigint_signal``, on by default): a later Ctrl-C or SIGINT then killed the process
outright -- the service lost its graceful shutdown (found when a restart test's server died with -2 after
the scheduler had solved an allocation in-process), the CLI its "interrupted" message. Each case solves in a
process of its own (a regression would kill the test process otherwise), then interrupts itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent

INTERRUPT = """
import os, signal, time
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)
    print("not interrupted")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""

CASES = {
    "planner": """
from distplan.planner.candidates import Candidate, PlanSpace
from distplan.planner.coarsen import coarsen
from distplan.planner.cost import CostModel
from distplan.planner.ilp import solve_stage_problem
from distplan.planner.problem import build_problem
from distplan.planner.synthetic import random_chain_graph, random_cluster

graph = random_chain_graph(1, nodes=6, scale=0.4, regions=2)
cost = CostModel(graph, random_cluster(1), dtype="fp32")
prob = build_problem(cost, coarsen(graph, max_blocks=6), Candidate(2, 2, "1f1b"), PlanSpace(True, ("none",), ("none",)))
sol = solve_stage_problem(prob.problem, workers=1, deterministic_time=5.0, time_limit_s=30.0)
assert sol.status in ("OPTIMAL", "FEASIBLE", "INFEASIBLE"), sol.status
""",
    "scheduler": f"""
import random, sys
sys.path.insert(0, {str(HERE / "scheduler")!r})
from test_allocate_brute_force import _instance
from distplan.scheduler.allocate import solve_allocation

sol = solve_allocation(_instance(random.Random(0), "lexicographic"))
assert sol.optimal, sol.statuses
""",
}


@pytest.mark.parametrize("solver", sorted(CASES))
def test_ctrl_c_after_a_solve_is_a_keyboard_interrupt(solver: str) -> None:
    # Python's own Ctrl-C handler first: a process started in the background by a shell without job control
    # inherits SIGINT ignored, and the check is about what the solve does to the handler, not about that.
    setup = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    code = setup + textwrap.dedent(CASES[solver]) + INTERRUPT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip().splitlines()[-1] == "KeyboardInterrupt", r.stdout
