"""``distplan.profile``: measure this machine's device and link, return (and write) a calibration."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from distplan.calibration import Calibration
from distplan.errors import CalibrationError

from .budget import MODES

__all__ = ["default_kind_name", "default_ranks", "profile"]

#: Progress callback: (what is being measured, steps done, steps in all).
Progress = Callable[[str, int, int], None]


def default_ranks(device: str) -> int:
    """Ranks the link is measured between by default: every GPU on CUDA; on a CPU two, one per core, when
    the machine has two cores or more (ranks never share a core), else one (no link measured)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if cores >= 2 else 1


def default_kind_name(device_name: str) -> str:
    """A device-kind name made from what the device reports (``NVIDIA A100-SXM4-80GB`` ->
    ``nvidia-a100-sxm4-80gb``); pass ``kind=`` to use the name your cluster YAML uses."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return slug or "device"


def profile(
    kind: str | None = None,
    *,
    device: str | None = None,
    ranks: int | None = None,
    mode: str = "default",
    precisions: Sequence[str] | None = None,
    threads: int | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> Calibration:
    """Measure what the cost model needs on this machine and return it as a :class:`Calibration`.

    The compute part (matmul and attention per precision, weight streaming, memory-bound ops, fixed per-op
    and per-microbatch costs, optimizer steps; see ``distplan.profiler.compute``) and the link part
    (point-to-point, all-reduce, all-gather, reduce-scatter; ``distplan.profiler.links``) are measured on
    ``ranks`` processes started on this host, all computing at once as a plan's ranks do, over the backend
    distplan uses there (NCCL on CUDA, gloo on CPU); with one rank, in this process and without a link.

    Args:
        kind: the device-kind name the calibration is for, as the cluster YAML names it (e.g.
            ``a100-sxm-80g``); default a name made from the device (:func:`default_kind_name`).
        device: ``cpu``, ``cuda`` or ``cuda:N``; default CUDA when available.
        ranks: processes for the link measurement; default :func:`default_ranks`; 1 measures no link.
        mode: ``quick`` (under a minute), ``default`` (a couple of minutes) or ``thorough`` (several minutes).
        precisions: matmul precisions (``fp32``, ``tf32``, ``bf16``, ``fp16``); default the device's own.
        threads: CPU threads of the compute measurement (default 1 on CPU: one rank per core).
        out: write the calibration there as JSON too.
        progress: called with (what, done, total) as measurements finish.

    Returns:
        The calibration (also written to ``out`` when given).

    Raises:
        CalibrationError: an unknown mode or device, more ranks than this host can run, a failed rank.
    """
    import dataclasses

    import torch
    import torch.distributed as dist

    from .compute import _cpu_name, measure_device, pipeline_overhead, runtime_overhead
    from .ranks import measure_ranks
    from .reference import in_graph_costs

    if mode not in MODES:
        raise CalibrationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    budget = MODES[mode]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = device.startswith("cuda")
    if ranks is None:
        ranks = default_ranks(device)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise CalibrationError(f"ranks must be a positive integer, got {ranks!r}")
    if is_cuda and ranks > torch.cuda.device_count():
        raise CalibrationError(
            f"ranks={ranks} but this host has {torch.cuda.device_count()} CUDA device(s) (one rank per GPU)"
        )
    if not is_cuda:
        cores = os.cpu_count() or 1
        if ranks > cores:
            raise CalibrationError(
                f"ranks={ranks} but this host has {cores} CPU core(s); ranks sharing a core measure contention, "
                f"not the link (use ranks <= {cores})"
            )
    device_name = torch.cuda.get_device_name(torch.device(device)) if is_cuda else _cpu_name()
    kind = kind or default_kind_name(device_name)
    host = socket.gethostname()
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    source = f"distplan profile ({mode}) on {host}, {created}" + (f", {Path(out).name}" if out else "")
    t0 = time.perf_counter()
    link = None
    if ranks >= 2 and threads in (None, 1):
        dev, link = measure_ranks(
            world=ranks, device=device, budget=budget, precisions=precisions, progress=progress, source=source
        )
        assert dev is not None
        if not dist.is_initialized():  # inside a job of its own, this process cannot lower a one-rank plan
            if progress is not None:
                progress("runtime overhead", 0, 1)
            one = runtime_overhead(device, budget)
            bf, bb = pipeline_overhead(device, budget, one)
            dev = dataclasses.replace(
                dev,
                microbatch_fwd_s=one.microbatch_fwd_s,
                microbatch_bwd_s=one.microbatch_bwd_s,
                step_s=one.step_s,
                boundary_fwd_s=bf,
                boundary_bwd_s=bb,
            )
            dev = in_graph_costs(device, budget, dev)
    else:
        # One rank, or ranks of several threads each: measure the device here, the link on its own.
        dev = measure_device(
            device=device,
            budget=budget,
            precisions=precisions,
            threads=threads,
            progress=progress,
            source=source,
            runtime=not dist.is_initialized(),
        )
        if ranks >= 2:
            _, link = measure_ranks(
                world=ranks, device=device, budget=budget, with_device=False, progress=progress, source=source
            )
    cal = Calibration(
        kind=kind,
        device=dev,
        link=link,
        meta={
            "created": created,
            "host": host,
            "device": device_name,
            "torch": torch.__version__,
            "mode": mode,
            "ranks": ranks,
            "threads": dev.threads,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    if out is not None:
        cal.save(out)
    return cal
