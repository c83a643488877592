"""Keep freed host memory in the process, so that a CPU training step does not fault its pages in again.

[Note: freed memory on CPU ranks]
PyTorch's CPU allocator takes each tensor from the C library's ``malloc`` and gives it back on free. glibc
serves a large block with ``mmap`` and returns it to the kernel when it is freed (its threshold starts at
128 KiB and follows the largest block freed), and it returns free memory at the top of its heap once more
than twice that threshold lies free there. A training step frees its gradients, the optimizer's
temporaries and the activations every iteration and asks for them again in the next one, so the kernel
hands the same memory back page by page, zero-filling each 4 KiB page on first touch. Measured here on the
benchmark's 6-layer MLP (26 MB of parameters, one thread, batch 4): the optimizer step took 3536 page
faults and 22.4 ms, the backward up to 6241 faults and 19.4 ms; with the settings below neither faulted
(13.7 and 9.4 ms). The number of faults depended on the heap's history, so the same step varied by up to
2x from run to run, and no calibration could price it.

:func:`keep_freed_memory` raises glibc's ``mmap`` threshold to its maximum (32 MiB on 64-bit: blocks up to
that size come from the heap) and its trim threshold to 2 GiB (freed heap memory stays in the process for
the next step), through ``mallopt(3)``. The resident memory then stays at the step's peak, which is what
the planner's memory model counts anyway (see ``distplan.planner.cost``). It changes only the process it
runs in, and only under glibc; elsewhere (macOS, musl) it does nothing. CPU ranks call it when a plan is
lowered (``distplan.lowering.lower``) and ``distplan profile`` calls it before measuring a CPU, so that the
calibration prices the steps the ranks then run. ``DISTPLAN_KEEP_FREED_MEMORY=0`` in the environment turns
it off. PyTorch's own CPU performance guide suggests a caching ``malloc`` (jemalloc, tcmalloc) loaded with
``LD_PRELOAD`` for the same reason; this needs nothing installed or preloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB * sizeof(long)).
MMAP_THRESHOLD_BYTES = 32 << 20
#: Free memory kept at the top of the heap before glibc returns it (the largest ``int`` mallopt takes).
TRIM_THRESHOLD_BYTES = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in this process (see [Note: freed memory on CPU ranks]).

    Idempotent: the first call decides, later calls return its answer.

    Returns:
        True when the settings are in force (glibc, both ``mallopt`` calls accepted); False under another C
        library, when ``DISTPLAN_KEEP_FREED_MEMORY`` is ``0``, or when glibc refused a value.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("DISTPLAN_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it, and only glibc's mallopt takes these
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
