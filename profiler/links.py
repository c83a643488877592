"""Measure the link between ranks: point-to-point and collective times over the backend in use.

:func:`link_part` runs on every rank of an initialised process group (the ranks ``distplan profile``
starts on this host, see ``distplan.profiler.ranks``). This module's entry point runs it under an external
launcher across hosts::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m distplan.profiler.links --out net.json --kind a100-sxm-80g

and then measures the network between the hosts (``scope: network``; the ranks gather their host names
to tell). Every rank runs each measurement the same number of times, in lock step: rank 0 times a
warm-up call, the call count for ``torch.utils.benchmark.Timer.timeit`` is agreed by an all-reduce, each
repeat starts after a barrier, and the slowest rank's median per call is kept (a collective has finished
when its last rank has).

Sizes are bytes of the whole tensor, as :class:`~distplan.calibration.LinkCalibration` defines them; a
point-to-point time is half a ping-pong (rank 0 sends, rank 1 sends back).
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from distplan.calibration import Curve, LinkCalibration

from .budget import MODES, Budget

__all__ = ["link_part", "main"]

Progress = Callable[[str, int, int], None]


def _geometric_bytes(hi: int, per_decade: float) -> list[int]:
    import math

    lo = 4
    n = max(1, math.ceil(math.log10(hi / lo) * per_decade))
    out = sorted({max(4, round(lo * (hi / lo) ** (i / n) / 4) * 4) for i in range(n + 1)})
    return out


# ---------------------------------------------------------------------------------------------- ranks
def link_part(
    dev: Any, backend: str, budget: Budget, source: str, progress: Progress | None = None
) -> dict[str, Any] | None:
    """This rank's share of the link measurement (every rank of the default group calls it); rank 0
    returns the :class:`LinkCalibration` as a dict, the others None."""
    import torch
    import torch.distributed as dist
    from torch.utils.benchmark import Timer

    rank, world = dist.get_rank(), dist.get_world_size()
    names: list[Any] = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    scope = "intra-host" if len(set(names)) == 1 else "network"
    sizes = _geometric_bytes(budget.max_transfer_bytes, budget.points_per_decade)
    groups = {w: dist.new_group(list(range(w))) for w in range(2, world + 1)}
    total = len(sizes) * (1 + 3 * (world - 1))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if rank == 0 and progress is not None:
            progress("link", done, total)

    def timed(fn: Callable[[], None], members: int) -> float:
        """Seconds per call of ``fn`` on ranks ``< members`` (others idle), lock-stepped; the slowest
        rank's median of ``budget.link_repeats`` repeats."""
        inside = rank < members
        number = torch.zeros(1, dtype=torch.float64, device=dev)
        if inside:
            fn()  # warm-up (connections, buffers)
            t0 = Timer(stmt="fn()", globals={"fn": fn}).timeit(1).median
            number[0] = max(1.0, budget.min_run_time_s / budget.link_repeats / max(t0, 1e-7))
        dist.all_reduce(number, op=dist.ReduceOp.MAX)
        n = int(min(number.item(), 10_000))
        meds = []
        for _ in range(budget.link_repeats):
            dist.barrier()
            if inside:
                meds.append(Timer(stmt="fn()", globals={"fn": fn}).timeit(n).median)
        mine = torch.tensor([sorted(meds)[len(meds) // 2] if meds else 0.0], dtype=torch.float64, device=dev)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        return float(mine.item())

    p2p_pts = []
    for nbytes in sizes:
        t = torch.ones(max(1, nbytes // 4), device=dev)

        def pingpong(t: torch.Tensor = t) -> None:
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            elif rank == 1:
                dist.recv(t, 0)
                dist.send(t, 0)

        p2p_pts.append((float(nbytes), timed(pingpong, 2) / 2))
        tick()
    coll: dict[str, dict[int, list[tuple[float, float]]]] = {
        "all_reduce": {},
        "all_gather": {},
        "reduce_scatter": {},
    }
    for w, g in groups.items():
        for nbytes in sizes:
            n = max(w, (nbytes // 4) // w * w)
            full = torch.ones(n, device=dev)
            part = torch.ones(n // w, device=dev)
            fns: dict[str, Callable[[], Any]] = {
                "all_reduce": functools.partial(dist.all_reduce, full, group=g),
                "all_gather": functools.partial(dist.all_gather_into_tensor, full, part, group=g),
                "reduce_scatter": functools.partial(dist.reduce_scatter_tensor, part, full, group=g),
            }
            for name, fn in fns.items():
                coll[name].setdefault(w, []).append((4.0 * n, timed(fn, w)))
                tick()
    if rank != 0:
        return None

    def curve(pts: list[tuple[float, float]]) -> dict[str, Any]:
        by: dict[float, float] = {}
        for x, t in pts:
            by[x] = t
        xs = sorted(by)
        ts: list[float] = []
        for x in xs:  # a larger message never takes less time; a dip is noise
            ts.append(max(by[x], ts[-1]) if ts else by[x])
        return Curve(tuple(xs), tuple(max(t, 1e-9) for t in ts)).to_dict()

    return {
        "backend": backend,
        "scope": scope,
        "p2p": curve(p2p_pts),
        "collectives": {name: {str(w): curve(pts) for w, pts in by_w.items()} for name, by_w in coll.items()},
        "source": source or f"{world} ranks on {', '.join(sorted(set(names)))} over {backend}",
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank under ``torchrun`` (see the module docstring); rank 0 writes the file."""
    ap = argparse.ArgumentParser(
        prog="python -m distplan.profiler.links", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--out", required=True, help="calibration file to write (rank 0)")
    ap.add_argument("--kind", required=True, help="the device kind whose hosts this link joins")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--mode", default="default", choices=sorted(MODES))
    args = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=300))
    result = link_part(dev, backend, MODES[args.mode], "")
    if result is not None:
        from distplan.calibration import Calibration

        cal = Calibration(
            kind=args.kind,
            link=LinkCalibration.from_dict(result),
            meta={"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": args.mode},
        )
        cal.save(args.out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
