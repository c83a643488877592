"""Run matrix multiplies at the precision the plan names (``PlanRequest.precision``).

The cost model prices every matmul at the plan's precision, so the lowering must run them at it:

- ``fp32``: strict IEEE fp32 (``torch.set_float32_matmul_precision("highest")``: no TF32 on CUDA);
- ``tf32``: fp32 tensors multiplied on TF32 tensor cores (``"high"``);
- ``bf16`` / ``fp16``: mixed precision: each stage's forward and the loss run under ``torch.autocast`` to
  that dtype (parameters, gradients and optimizer state stay fp32; the backward follows the forward's
  casts, as autocast recommends, outside the context).

:func:`set_matmul_precision` sets the process-wide fp32 matmul mode once per rank; :func:`autocast_for` is
the context the runner enters around each stage forward and loss.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from distplan.errors import LoweringError
from distplan.plan import MATMUL_PRECISIONS

__all__ = ["autocast_for", "set_matmul_precision"]

_FP32_MODE = {"fp32": "highest", "tf32": "high", "bf16": "highest", "fp16": "highest"}
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_matmul_precision(precision: str) -> None:
    """Set torch's fp32 matmul mode for ``precision`` (see the module docstring).

    Raises:
        LoweringError: an unknown precision.
    """
    if precision not in MATMUL_PRECISIONS:
        raise LoweringError(
            f"unknown matmul precision {precision!r}; expected one of {', '.join(MATMUL_PRECISIONS)}"
        )
    torch.set_float32_matmul_precision(_FP32_MODE[precision])


def autocast_for(precision: str, device: torch.device) -> Any:
    """The context a stage's forward runs in: ``torch.autocast`` for bf16/fp16, else nothing.

    Raises:
        LoweringError: fp16 autocast asked for on a CPU (torch's CPU autocast runs bf16 only).
    """
    dtype = _AUTOCAST.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise LoweringError(
            "matmul precision fp16 needs CUDA (torch's CPU autocast runs bf16); plan with bf16"
        )
    return torch.autocast(device_type=device.type, dtype=dtype)
