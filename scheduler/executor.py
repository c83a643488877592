"""The local executor: a :class:`~distplan.scheduler.core.Scheduler`'s running jobs as real ``torchrun`` process
groups on this machine's CPU (gloo), preempted and resumed through checkpoints.

[Note: executor protocol]
The executor keeps the scheduler's allocation true on this machine, one pass (:meth:`LocalExecutor.step`) at a
time:

1. **Report.** A job's ranks print ``step K loss L`` (the lowering's entry point, ``train.py``); each new
   line is reported as progress (``Scheduler.report_progress``: ``K + 1`` steps). A process that exits is
   reported: stopped on request -> nothing to report (the scheduler stopped or moved it), all steps done ->
   ``finish``, anything else -> ``fail`` (the job waits and resumes from its last checkpoint).
2. **Stop.** A job whose placement changed (stopped, moved or resized: another plan or other devices) is
   asked to stop: the executor creates its *stop file*; after the step in progress every rank of the job
   sees it (they agree by an all-reduce, so all stop at the same step), saves a
   ``torch.distributed.checkpoint`` of weights and optimizer state (``Runner.save``) and exits.
3. **Launch.** A job the allocation places, and that has no process, is launched once every device it is
   given is free of this executor's processes (a stopping job holds its devices until its checkpoint is
   written) and its own previous process has exited: ``torchrun --standalone`` with one process per rank of
   its plan (the scheduler's plan on its devices, ``Scheduler.plan``), resuming from its checkpoint if it
   has one -- under the new plan: the checkpoint is resharded by parameter name (``Runner.load``).

Each job has a folder under the executor's ``workdir``: its plans (``plan-<n>.json``), its checkpoint
(``checkpoint/``), the stop file and one log per launch. Device indices are the scheduler's: on this
machine every "device" is a CPU process (the ranks of a plan run with ``--device cpu``); what the test of
this module checks is the protocol and the numerics (a preempted and resumed job's losses are those of one
device that never stopped), not the speed of the devices.

This module imports no torch: it launches the lowering's entry point (``distplan.lowering.train``) as a
program.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .core import Scheduler
from .model import SchedulerError

__all__ = ["JobProgram", "LaunchRecord", "LocalExecutor"]

#: The entry point every rank runs (the lowering's train.py, as a module).
ENTRY = "distplan.lowering.train"
_STEP = re.compile(r"^step (\d+) loss ([-+0-9.eEinfa]+)", re.M)


@dataclass(frozen=True, slots=True)
class JobProgram:
    """How the ranks of a job run: the model ``train.py`` builds (a built-in name, a ``config.json`` path or
    ``package.module:function``, as the plan's graph was traced from), its sequence length, and the training
    options (``lr``; ``seed`` of the weights and data; ``timeout_s`` of a collective)."""

    model: str
    seq: int
    lr: float = 1e-3
    seed: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.model:
            raise SchedulerError("job program: model must name a model")
        if not (isinstance(self.seq, int) and self.seq >= 1):
            raise SchedulerError(f"job program: seq must be an integer >= 1, got {self.seq!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SchedulerError(f"job program: lr must be > 0, got {self.lr!r}")


@dataclass(slots=True)
class LaunchRecord:
    """One launch of a job: its plan, devices, command, log and what became of it.

    Attributes:
        job_id / index: the job and the launch's number (from 0).
        plan_id / layout / devices: the plan it ran and its devices (the cluster's indices).
        first_step: the step it resumed after (0: a fresh start).
        steps: ``(step, loss)`` it printed.
        outcome: ``running``, ``stopped`` (on request, checkpoint saved), ``finished``, ``failed``.
        exit_code: the process's exit code, once it ended.
    """

    job_id: str
    index: int
    plan_id: str
    layout: str
    devices: tuple[int, ...]
    first_step: int
    command: list[str]
    log: Path
    steps: list[tuple[int, float]] = field(default_factory=list)
    outcome: str = "running"
    exit_code: int | None = None
    started_s: float = 0.0
    ended_s: float | None = None


@dataclass(slots=True)
class _Proc:
    record: LaunchRecord
    popen: subprocess.Popen[bytes]
    out: IO[bytes]
    deadline: float
    stop_requested: bool = False
    read: int = 0


class LocalExecutor:
    """Runs ``scheduler``'s allocation as real ``torchrun`` processes (see [Note: executor protocol]).

    Args:
        scheduler: the scheduler (its clock is this machine's wall clock, ``clock``).
        workdir: a folder of its own (created).
        programs: job id or graph key -> :class:`JobProgram` (a job id wins).
        python: the interpreter the ranks run (default: this one).
        launch_timeout_s: wall-clock limit of one launch; a launch that passes it is killed and failed.
        clock: seconds (default ``time.time``).
        env: extra environment of the ranks.
        on_progress: called with ``(job id, steps done)`` after each progress report (a monitor; a test's
            way to make a job arrive at a known point of another's run).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        workdir: str | Path,
        programs: Mapping[str, JobProgram],
        *,
        python: str = sys.executable,
        launch_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.time,
        env: Mapping[str, str] | None = None,
        on_progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.on_progress = on_progress
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.programs = dict(programs)
        self.python = python
        self.launch_timeout_s = launch_timeout_s
        self.clock = clock
        self.env = dict(env or {})
        self.launches: list[LaunchRecord] = []
        self._procs: dict[str, _Proc] = {}

    # ------------------------------------------------------------------ the loop
    def now(self) -> float:
        """The scheduler's clock: this machine's, never behind the scheduler."""
        return max(self.clock(), self.scheduler.now)

    def step(self) -> None:
        """One pass of [Note: executor protocol]: report, stop, launch."""
        self._report()
        self._stop_changed()
        self._launch_placed()

    def run(
        self, *, until: Callable[[], bool] | None = None, timeout_s: float = 600.0, poll_s: float = 0.1
    ) -> None:
        """Pass after pass until ``until()`` holds (default: no job waits or runs, no process is left).

        Raises:
            SchedulerError: ``timeout_s`` passed first (the processes are killed).
        """
        done = until or self.idle
        deadline = time.monotonic() + timeout_s
        while True:
            self.step()
            if done():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise SchedulerError(
                    f"the executor did not finish within {timeout_s:g} s; running: {sorted(self._procs)}"
                )
            self._tick_if_due()
            time.sleep(poll_s)

    def idle(self) -> bool:
        """No process left and no job waiting or running."""
        return not self._procs and not any(r.active for r in self.scheduler.jobs.values())

    def kill(self) -> None:
        """Kill every process this executor started (with its ranks)."""
        for p in list(self._procs.values()):
            _killpg(p.popen)
            p.popen.wait(timeout=30)
            p.out.close()
            p.record.outcome, p.record.exit_code, p.record.ended_s = (
                "failed",
                p.popen.returncode,
                self.clock(),
            )
        self._procs.clear()

    def _tick_if_due(self) -> None:
        t = self.scheduler.next_tick()
        if t is not None and t <= self.now():
            self.scheduler.tick(self.now())

    # ------------------------------------------------------------------ 1. report
    def _report(self) -> None:
        for jid, p in list(self._procs.items()):
            self._read_steps(p)
            code = p.popen.poll()
            if code is None and self.clock() > p.deadline:
                _killpg(p.popen)
                code = p.popen.wait(timeout=30)
            if code is None:
                continue
            self._read_steps(p)
            p.out.close()
            del self._procs[jid]
            rec = p.record
            rec.exit_code, rec.ended_s = code, self.clock()
            saved = self._checkpoint_step(jid)
            book = self.scheduler.record(jid)
            total = book.spec.total_steps
            if code == 0 and total is not None and saved >= total:
                rec.outcome = "finished"
                if book.running:
                    self.scheduler.finish(jid, self.now())
                # else: it completed as it was stopped; it finishes at its next placement (_launch_placed)
            elif code == 0 and p.stop_requested:
                rec.outcome = "stopped"
            else:
                rec.outcome = "failed"
                # A crash while stopping is not the new placement's failure: that one starts from the last
                # checkpoint written. A crash of the placement itself makes the job wait and resume.
                if book.running and not p.stop_requested:
                    self.scheduler.fail(jid, self.now())

    def _read_steps(self, p: _Proc) -> None:
        """New ``step K loss L`` lines of a launch: recorded and reported as progress."""
        try:
            with open(p.record.log, "rb") as f:
                f.seek(p.read)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only
        if end == 0:
            return
        p.read += end
        found = [(int(k), float(v)) for k, v in _STEP.findall(chunk[:end].decode(errors="replace"))]
        if not found:
            return
        p.record.steps.extend(found)
        jid = p.record.job_id
        book = self.scheduler.record(jid)
        if book.active:
            self.scheduler.report_progress(jid, (found[-1][0] + 1) * book.spec.global_batch, self.now())
        if self.on_progress is not None:
            self.on_progress(jid, found[-1][0] + 1)

    # ------------------------------------------------------------------ 2. stop
    def _stop_changed(self) -> None:
        for jid, p in self._procs.items():
            if p.stop_requested:
                continue
            book = self.scheduler.record(jid)
            pl = book.placement
            if (
                book.running
                and pl is not None
                and pl.plan_id == p.record.plan_id
                and pl.devices == p.record.devices
            ):
                continue
            p.stop_requested = True
            self._stop_file(jid).touch()

    # ------------------------------------------------------------------ 3. launch
    def _launch_placed(self) -> None:
        held = {d for p in self._procs.values() for d in p.record.devices}
        for book in self.scheduler.jobs.values():
            jid = book.id
            pl = book.placement
            if not book.running or pl is None or jid in self._procs:
                continue
            if held.intersection(pl.devices):
                continue  # a stopping job still writes its checkpoint on these devices
            total = book.spec.total_steps
            if total is None:
                raise SchedulerError(
                    f"job {jid!r} declares no total_steps: the executor cannot know when it ends"
                )
            saved = self._checkpoint_step(jid)
            if saved >= total:
                self.scheduler.finish(jid, self.now())  # its last run had completed as it was stopped
                continue
            self._launch(jid, saved, total)
            held.update(pl.devices)

    def _launch(self, jid: str, saved: int, total: int) -> None:
        book = self.scheduler.record(jid)
        pl = book.placement
        assert pl is not None
        prog = self.programs.get(jid) or self.programs.get(book.spec.graph)
        if prog is None:
            raise SchedulerError(
                f"no job program for job {jid!r} (give one by job id or graph key {book.spec.graph!r})"
            )
        folder = self.workdir / jid
        folder.mkdir(parents=True, exist_ok=True)
        index = sum(1 for r in self.launches if r.job_id == jid)
        plan = self.scheduler.plan(jid)
        plan_path = folder / f"plan-{index}.json"
        plan.save(plan_path)
        ckpt = folder / "checkpoint"
        stop = self._stop_file(jid)
        stop.unlink(missing_ok=True)
        cmd = [
            self.python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(plan.world_size),
            "-m",
            ENTRY,
            "--plan",
            str(plan_path),
            "--model",
            prog.model,
            "--device",
            "cpu",
            "--seq",
            str(prog.seq),
            "--steps",
            str(total - saved),
            "--optimizer",
            book.spec.optimizer,
            "--lr",
            repr(prog.lr),
            "--seed",
            str(prog.seed),
            "--timeout",
            repr(prog.timeout_s),
            "--save",
            str(ckpt),
            "--stop-file",
            str(stop),
        ]
        if saved > 0:
            cmd += ["--resume", str(ckpt)]
        log = folder / f"launch-{index}.log"
        out = open(log, "wb")  # noqa: SIM115 - closed when the process is reaped (_report)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        popen = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder, env=env, start_new_session=True
        )
        rec = LaunchRecord(
            jid, index, pl.plan_id, pl.layout, pl.devices, saved, cmd, log, started_s=self.clock()
        )
        self.launches.append(rec)
        self._procs[jid] = _Proc(rec, popen, out, self.clock() + self.launch_timeout_s)

    # ------------------------------------------------------------------ files
    def _stop_file(self, jid: str) -> Path:
        return self.workdir / jid / "STOP"

    def _checkpoint_step(self, jid: str) -> int:
        """The step the job's checkpoint was saved after (0: none), from the file ``Runner.save`` writes."""
        info = self.workdir / jid / "checkpoint" / "distplan.json"
        try:
            return int(json.loads(info.read_text()).get("step") or 0)
        except (OSError, ValueError, TypeError):
            return 0

    def losses(self, jid: str) -> list[tuple[int, float]]:
        """The job's loss per step over all its launches, by step; a step a failed launch ran past its last
        checkpoint, and ran again after resuming, counts as the later run."""
        by_step = {k: v for r in self.launches if r.job_id == jid for k, v in r.steps}
        return sorted(by_step.items())

    def to_dict(self) -> dict[str, Any]:
        """The launches, JSON-ready (for a report)."""
        return {
            "launches": [
                {
                    "job_id": r.job_id,
                    "index": r.index,
                    "plan_id": r.plan_id,
                    "layout": r.layout,
                    "devices": list(r.devices),
                    "first_step": r.first_step,
                    "steps": [list(s) for s in r.steps],
                    "outcome": r.outcome,
                    "exit_code": r.exit_code,
                    "started_s": r.started_s,
                    "ended_s": r.ended_s,
                }
                for r in self.launches
            ]
        }


def _killpg(p: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        p.kill()
