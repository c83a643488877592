"""Measure the link between ranks: point-to-point and collective times over the backend in use.

:func:`measure_link` starts ``world`` processes on this host (``python -m distplan.profiler.links
CONFIG``), one per rank (one CPU thread each, or one GPU each), which measure together and write the
result. The same entry point runs under an external launcher across hosts::

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
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from distplan.calibration import Curve, LinkCalibration
from distplan.errors import CalibrationError

from .budget import MODES, Budget

__all__ = ["measure_link"]

Progress = Callable[[str, int, int], None]


def _geometric_bytes(hi: int, per_decade: float) -> list[int]:
    import math

    lo = 4
    n = max(1, math.ceil(math.log10(hi / lo) * per_decade))
    out = sorted({max(4, round(lo * (hi / lo) ** (i / n) / 4) * 4) for i in range(n + 1)})
    return out


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_link(
    *,
    world: int,
    device: str,
    budget: Budget,
    backend: str | None = None,
    timeout_s: float = 600.0,
    progress: Progress | None = None,
    source: str = "",
) -> LinkCalibration:
    """Measure the link between ``world`` ranks on this host (one process each).

    Args:
        world: ranks to start (>= 2); on a CPU, at most the cores, so that ranks do not share one.
        device: ``cpu`` or ``cuda`` (rank ``r`` uses GPU ``r``).
        budget: the mode.
        backend: ``gloo`` or ``nccl``; default NCCL on CUDA, gloo on CPU.
        timeout_s: limit for the whole measurement; the ranks are killed after it.
        progress: called with (what, done, total).
        source: provenance written into the result.

    Returns:
        The :class:`LinkCalibration` (scope ``intra-host``).

    Raises:
        CalibrationError: fewer than 2 ranks, a rank that failed (its error), or the timeout.
    """
    if world < 2:
        raise CalibrationError(f"a link needs at least 2 ranks, got {world}")
    dev = device.split(":")[0]
    backend = backend or ("nccl" if dev == "cuda" else "gloo")
    with tempfile.TemporaryDirectory(prefix="distplan-profile-") as tmp:
        d = Path(tmp)
        out = d / "link.json"
        cfg = {"device": dev, "backend": backend, "mode": budget.name, "out": str(out), "source": source}
        (d / "config.json").write_text(json.dumps(cfg))
        env = dict(os.environ)
        import distplan

        root = str(Path(distplan.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH", "")) if x)
        env.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
                "WORLD_SIZE": str(world),
                "OMP_NUM_THREADS": "1",
                "TORCH_CPP_LOG_LEVEL": "ERROR",
            }
        )
        procs = []
        for r in range(world):
            e = dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world))
            log = open(d / f"rank{r}.log", "wb")  # noqa: SIM115 - closed when the process is reaped
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distplan.profiler.links", "--config", str(d / "config.json")],
                    env=e,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        deadline = time.monotonic() + timeout_s
        progress_file = d / "progress.json"
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                if time.monotonic() > deadline:
                    raise CalibrationError(
                        f"the link measurement between {world} ranks did not finish in {timeout_s:.0f} s"
                    )
                if progress is not None and progress_file.exists():
                    with contextlib.suppress(ValueError, OSError):
                        done, total = json.loads(progress_file.read_text())
                        progress("link", int(done), int(total))
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed or not out.exists():
            r = failed[0] if failed else 0
            tail = (d / f"rank{r}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise CalibrationError(
                f"the link measurement failed on rank {r} (exit code {procs[r].returncode}): "
                + " | ".join(tail)[-800:]
            )
        return LinkCalibration.from_dict(json.loads(out.read_text()), "link")


# ---------------------------------------------------------------------------------------------- ranks
def _run_rank(
    device: str, backend: str, budget: Budget, source: str, progress_file: Path | None
) -> dict[str, Any] | None:
    """One rank's share of the measurement; rank 0 returns the LinkCalibration as a dict."""
    import torch
    import torch.distributed as dist
    from torch.utils.benchmark import Timer

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=120))
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
        if rank == 0 and progress_file is not None:
            progress_file.write_text(json.dumps([done, total]))

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
    """Entry point of one rank (started by :func:`measure_link`, or by ``torchrun`` across hosts)."""
    ap = argparse.ArgumentParser(
        prog="python -m distplan.profiler.links", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--config", help="JSON written by measure_link (internal)")
    ap.add_argument("--out", help="calibration file to write (rank 0), when run under torchrun")
    ap.add_argument("--kind", default="", help="device kind the link belongs to, when run under torchrun")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--mode", default="default", choices=sorted(MODES))
    args = ap.parse_args(argv)
    import torch.distributed as dist

    if args.config:
        cfg = json.loads(Path(args.config).read_text())
        result = _run_rank(
            cfg["device"],
            cfg["backend"],
            MODES[cfg["mode"]],
            cfg["source"],
            Path(cfg["out"]).parent / "progress.json",
        )
        if result is not None:
            Path(cfg["out"]).write_text(json.dumps(result))
        dist.destroy_process_group()
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    result = _run_rank(device, backend, MODES[args.mode], "", None)
    if result is not None:
        from distplan.calibration import Calibration

        cal = Calibration(
            kind=args.kind or "unknown",
            link=LinkCalibration.from_dict(result),
            meta={"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "mode": args.mode},
        )
        if args.out:
            cal.save(args.out)
        else:
            print(cal.to_json())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
