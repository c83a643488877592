"""Run the measurement on several ranks of this host at once (``python -m distplan.profiler.ranks CONFIG``).

A plan's ranks compute side by side: on a CPU they share the memory bandwidth and the last-level cache of
the socket, on GPUs the host's PCIe. So when ``distplan profile`` measures a link between ``world`` ranks it
also measures the device part *on every rank at once* (each rank one thread, or one GPU; the ranks take
each size of each op class together, see ``distplan.profiler.compute.Peers``) and pools the ranks' points into one curve per op (the median per size,
``distplan.profiler.compute.merge_devices``), then measures the link. :func:`measure_ranks`
starts the processes and gathers the result; a rank that fails is reported with its last lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from distplan.calibration import DeviceCalibration, LinkCalibration
from distplan.errors import CalibrationError
from distplan.host_memory import keep_freed_memory
from distplan.ranks import kill_ranks, spawn_ranks

from .budget import MODES, Budget

__all__ = ["measure_ranks"]

Progress = Callable[[str, int, int], None]


def measure_ranks(
    *,
    world: int,
    device: str,
    budget: Budget,
    with_device: bool = True,
    precisions: Sequence[str] | None = None,
    backend: str | None = None,
    timeout_s: float = 900.0,
    progress: Progress | None = None,
    source: str = "",
) -> tuple[DeviceCalibration | None, LinkCalibration]:
    """Measure on ``world`` ranks of this host: the device part on all of them at once (their points
    pooled) when ``with_device``, then the link between them.

    Args:
        world: ranks to start (>= 2); one CPU thread each, or one GPU each (rank ``r`` on GPU ``r``).
        device: ``cpu`` or ``cuda``.
        budget: the mode.
        with_device: measure the device part too (see the module docstring).
        precisions: matmul precisions of the device part (default the device's own).
        backend: ``gloo`` or ``nccl``; default NCCL on CUDA, gloo on CPU.
        timeout_s: limit for the whole measurement; the ranks are killed after it.
        progress: called with (what, done, total); ``what`` is ``link`` during the link part.
        source: provenance written into the result.

    Returns:
        (device part or None, link part).

    Raises:
        CalibrationError: fewer than 2 ranks, a rank that failed (its last lines), the timeout.
    """
    if world < 2:
        raise CalibrationError(f"a link needs at least 2 ranks, got {world}")
    dev = device.split(":")[0]
    backend = backend or ("nccl" if dev == "cuda" else "gloo")
    with tempfile.TemporaryDirectory(prefix="distplan-profile-") as tmp:
        d = Path(tmp)
        out = d / "result.json"
        cfg = {
            "device": dev,
            "backend": backend,
            "mode": budget.name,
            "with_device": with_device,
            "precisions": list(precisions) if precisions else None,
            "out": str(out),
            "progress": str(d / "progress.json"),
            "source": source,
            "timeout_s": timeout_s,
        }
        (d / "config.json").write_text(json.dumps(cfg))
        procs = spawn_ranks("distplan.profiler.ranks", d / "config.json", world, d)
        deadline = time.monotonic() + timeout_s
        timed_out = False
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if progress is not None:
                    with contextlib.suppress(ValueError, OSError):
                        what, done, total = json.loads((d / "progress.json").read_text())
                        progress(str(what), int(done), int(total))
                time.sleep(0.2)
        finally:
            kill_ranks(procs)
        if timed_out:
            raise CalibrationError(f"the measurement on {world} ranks did not finish in {timeout_s:.0f} s")
        failed = [r for r, p in enumerate(procs) if p.returncode not in (0, -signal.SIGKILL)]
        if failed or not out.exists():
            r = failed[0] if failed else 0
            tail = (d / f"rank{r}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise CalibrationError(
                f"the measurement failed on rank {r} (exit code {procs[r].returncode}): "
                + " | ".join(tail)[-800:]
            )
        data = json.loads(out.read_text())
    device_part = None if data["device"] is None else DeviceCalibration.from_dict(data["device"], "device")
    return device_part, LinkCalibration.from_dict(data["link"], "link")


def _rank_main(config_path: str) -> int:
    """One rank: the device part (with the others, class by class), then the link part."""
    import torch
    import torch.distributed as dist

    from .compute import measure_device, merge_devices
    from .links import link_part

    cfg = json.loads(Path(config_path).read_text())
    device = cfg["device"]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
        keep_freed_memory()  # as CPU ranks do (see [Note: freed memory on CPU ranks])
    dist.init_process_group(cfg["backend"], timeout=timedelta(seconds=float(cfg["timeout_s"])))
    rank, world = dist.get_rank(), dist.get_world_size()
    progress_file = Path(cfg["progress"])

    def progress(what: str, done: int, total: int) -> None:
        if rank == 0:
            progress_file.write_text(json.dumps([what, done, total]))

    budget: Budget = MODES[cfg["mode"]]
    device_part = None
    if cfg["with_device"]:
        device_part = measure_device(
            device=str(dev),
            budget=budget,
            precisions=cfg["precisions"],
            threads=1 if device == "cpu" else None,
            progress=progress,
            source=cfg["source"],
            peers=_peers(dev),
            sharing=world if device == "cpu" else 1,
            runtime=False,  # measured by the launching process, outside this group
        )
        # Every rank measured the same kind at the same time: pool their points (merge_devices).
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, device_part.to_dict())
        device_part = merge_devices([DeviceCalibration.from_dict(p, "device") for p in parts])
    dist.barrier()
    link = link_part(dev, cfg["backend"], budget, cfg["source"], progress)
    if rank == 0:
        result: dict[str, Any] = {
            "device": None if device_part is None else device_part.to_dict(),
            "link": link,
        }
        Path(cfg["out"]).write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


def _peers(dev: Any) -> Any:
    """:class:`~distplan.profiler.compute.Peers` over this process group (tensors on ``dev``: NCCL takes
    only CUDA ones)."""
    import torch
    import torch.distributed as dist

    from .compute import Peers

    def reduce(x: float, op: Any) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=op)
        return float(t.item())

    return Peers(
        barrier=dist.barrier,
        any=lambda flag: reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0.5,
        min=lambda x: reduce(x, dist.ReduceOp.MIN),
    )


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
