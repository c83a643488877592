"""Local rank processes: the one way distplan starts ``world`` processes of a ``torch.distributed`` job on this
machine (validation, measured timing runs, calibration of links), and stops them.

Each rank is ``python -m <module> <config>`` with the environment ``torch.distributed``'s ``env://``
initialisation reads (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``LOCAL_RANK``...), its output
in ``<folder>/rank<R>.log``, in a session of its own so that the rank and anything it starts are killed together
(:func:`kill_ranks`).

Why not ``torch.distributed.elastic.multiprocessing.start_processes`` (what ``torchrun`` uses): the callers need
one plain ``Popen`` per rank -- validation asks a running rank for its Python stacks with ``SIGUSR1`` to tell
a hung rank from one waiting on it, and polls every rank to name the first that failed by its own error file;
elastic's contexts hand back results only when the whole group ends, and its failure records need its
``@record`` wrapper inside the rank. Starting processes is the small part; the diagnosis on top is distplan's.
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["free_port", "kill_ranks", "project_root", "spawn_ranks"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous port of a local job)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def project_root() -> str:
    """The folder the running ``distplan`` package is imported from (put on the ranks' ``PYTHONPATH``, so that
    they import the same tree as this process, whatever their working directory)."""
    import distplan

    return str(Path(distplan.__file__).resolve().parent.parent)


def spawn_ranks(
    module: str, config: Path, world: int, folder: Path, *, threads: int = 1
) -> list[subprocess.Popen[bytes]]:
    """Start ``world`` processes ``python -m module config`` on this machine, rank ``R`` logging to
    ``folder/rank<R>.log``.

    Args:
        module: the rank's entry module (run with ``-m``).
        config: the file passed as its one argument.
        world: number of ranks (>= 1).
        folder: where the logs go (exists).
        threads: ``OMP_NUM_THREADS`` of each rank (1 keeps ranks from sharing cores).

    Returns:
        One ``Popen`` per rank, rank order; each leads a session of its own.

    Raises:
        ValueError: ``world`` or ``threads`` below 1.
    """
    if world < 1 or threads < 1:
        raise ValueError(f"world and threads must be >= 1, got world={world}, threads={threads}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (project_root(), env.get("PYTHONPATH", "")) if x)
    env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": str(threads),
            "TORCH_CPP_LOG_LEVEL": "ERROR",
        }
    )
    procs = []
    for r in range(world):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world))
        log = open(folder / f"rank{r}.log", "wb")  # noqa: SIM115 - the child holds it; ours is closed below
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, str(config)],
                env=e,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
    return procs


def kill_ranks(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every rank still running together with what it started (its session), then reap them all."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
