"""Measure the memory one training iteration of a lowered plan takes on a rank, with the PyTorch profiler.

[Note: measuring activation memory]
Method: one :meth:`~distplan.lowering.runtime.Runner.step` runs under ``torch.profiler.profile(
profile_memory=True)``. The profiler records every allocation and free of the CPU (and CUDA) allocator as a
``[memory]`` event with its signed size; summed in time order they give the bytes allocated since the step
began and still live at any moment. The executor marks each forward and backward action with
``record_function("distplan.F<stage>.<microbatch>")`` (``B`` for backwards), so the curve can be read at
the end of the rank's last forward:

- ``after_forward_bytes``: live bytes at the end of the last forward action. Under GPipe every forward runs
  before any backward, so this is what the schedule holds for the backward: the saved activations of every
  microbatch (and the stage outputs and received inputs kept for the backward). It is the figure
  recomputation reduces.
- ``peak_bytes``: the largest value over the whole step (forward, backward, gradient synchronisation),
  gradients and transient buffers included.

Parameters and optimizer state exist before the step and are not counted. The first step of a runner
also allocates gradients and lazily created buffers; measure after a warm-up step for steady-state
figures (:func:`measure_step_memory` does one unless ``warmup=0``). Allocations of other threads (the
autograd engine's device threads on CUDA) are included, as the profiler sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["StepMemory", "measure_step_memory"]


@dataclass(frozen=True, slots=True)
class StepMemory:
    """What one iteration allocated on one rank (see [Note: measuring activation memory]).

    Attributes:
        rank: the plan rank; stages: the stages it runs.
        after_forward_bytes: live bytes allocated during the step, at the end of its last forward action.
        peak_bytes: the largest number of live bytes allocated during the step.
        events: memory events counted (a measurement with none measured nothing).
    """

    rank: int
    stages: tuple[int, ...]
    after_forward_bytes: int
    peak_bytes: int
    events: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "stages": list(self.stages),
            "after_forward_bytes": self.after_forward_bytes,
            "peak_bytes": self.peak_bytes,
            "events": self.events,
        }


def measure_step_memory(
    runner: Any,
    inputs: Any = None,
    targets: Any = None,
    kwargs: dict[str, Any] | None = None,
    *,
    warmup: int = 1,
) -> StepMemory:
    """Run ``warmup`` unmeasured steps, then one step under the profiler, and read its memory curve (see
    [Note: measuring activation memory]). The optimizer is not stepped, so the weights stay as they were.

    Raises:
        LoweringError: the profiler recorded no memory events (nothing can be said).
    """
    from torch.profiler import ProfilerActivity, profile

    from distplan.errors import LoweringError

    for _ in range(warmup):
        runner.step(inputs, targets, kwargs)
    activities = [ProfilerActivity.CPU]
    if runner.rank_info.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        runner.step(inputs, targets, kwargs)
    mem: list[tuple[int, int]] = []
    last_forward_end = None
    for e in prof.profiler.kineto_results.events():  # type: ignore[union-attr]
        name = e.name()
        if name == "[memory]":
            mem.append((e.start_ns(), e.nbytes()))
        elif name.startswith("distplan.F"):
            end = e.start_ns() + e.duration_ns()
            last_forward_end = end if last_forward_end is None else max(last_forward_end, end)
    if not mem:
        raise LoweringError("the profiler recorded no memory events; this torch build cannot measure memory")
    mem.sort()
    live = peak = 0
    after_forward = 0
    for t, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
        if last_forward_end is not None and t <= last_forward_end:
            after_forward = live
    return StepMemory(
        rank=runner.rank_info.rank,
        stages=tuple(runner.rank_info.stages),
        after_forward_bytes=after_forward,
        peak_bytes=peak,
        events=len(mem),
    )
