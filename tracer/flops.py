"""FLOP formulas for the matmul-class ops that ``torch.utils.flop_counter`` has none for, and the check that
no matmul-class node is left at 0 FLOPs without a reason.

``FlopCounterMode`` counts only the ops in its registry (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
convolutions, attention kernels) and ops that decompose into them; everything else counts 0. Elementwise ops
counting 0 is its convention (and so the convention of every figure here), but a *contraction* counting 0
hides real work from the cost model: mixture-of-experts layers run their experts as one grouped matmul
(``aten._grouped_mm``, or transformers' opaque ``transformers::grouped_mm_fallback`` custom op, which it
uses under ``torch.export`` for non-bf16 weights), so 72% of a Mixtral block looked free.

Conventions (those of ``torch.utils.flop_counter``): a multiply-accumulate is 2 FLOPs; an ``(m, k) @ (k, n)``
product is ``2 m k n``. Grouped matmuls count every row of their jagged operand as routed (the kernels skip
rows past ``offs[-1]``; only expert-parallel sentinels land there), so an MoE layer of ``T`` tokens and top-k
routing costs ``T k`` tokens' worth of expert matmuls whatever the router decides: the eager per-expert
loop's count. Formulas take shapes (``torch.Size``), as torch's registry does; ``out_shape`` is the output's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["extra_flop_formulas", "flop_counter", "is_matmul_class", "uncounted_reason"]

_Shape = Sequence[int]


def _contract(k: int, out_shape: _Shape) -> int:
    """``2 k`` FLOPs per output element: a contraction over ``k``."""
    return 2 * k * math.prod(out_shape)


def _grouped_mm_flop(a_shape: _Shape, b_shape: _Shape, *args: Any, out_shape: _Shape, **kwargs: Any) -> int:
    """``aten._grouped_mm(a, b, offs)``: ``offs`` partitions the 2-D operand's jagged dimension.

    2-D x 3-D (the MoE forward, ``(S, k) x (g, k, n) -> (S, n)``), 3-D x 2-D and 3-D x 3-D (a bmm) contract
    ``a``'s last dimension for every output element: ``2 k numel(out)``. 2-D x 2-D (the weight gradient,
    ``(m, K) x (K, n) -> (g, m, n)``) splits ``K`` into the groups: ``2 m K n`` in all.
    """
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return _contract(a_shape[-1], out_shape)


def _contract_last(a_shape: _Shape, *args: Any, out_shape: _Shape, **kwargs: Any) -> int:
    """Ops whose first operand's last dimension is contracted into each output element: ``_int_mm``,
    ``_scaled_mm_v2``, ``_scaled_grouped_mm`` (non 2-D x 2-D), ``_weight_int8pack_mm``,
    ``_weight_int4pack_mm``, ``mv``, ``dot``, ``vdot``."""
    return _contract(a_shape[-1], out_shape)


def _scaled_grouped_mm_flop(
    a_shape: _Shape, b_shape: _Shape, *args: Any, out_shape: _Shape, **kwargs: Any
) -> int:
    """``aten._scaled_grouped_mm``: the FP8 grouped matmul, counted as :func:`_grouped_mm_flop`."""
    return _grouped_mm_flop(a_shape, b_shape, out_shape=out_shape)


def _addmv_flop(
    self_shape: _Shape, mat_shape: _Shape, vec_shape: _Shape, *args: Any, out_shape: _Shape, **kw: Any
) -> int:
    """``addmv(bias, (m, k), (k,))``: ``2 m k`` (the bias add is elementwise)."""
    return _contract(mat_shape[-1], out_shape)


def _addbmm_flop(
    self_shape: _Shape, a_shape: _Shape, b_shape: _Shape, *args: Any, out_shape: _Shape, **kw: Any
) -> int:
    """``addbmm(c, (b, m, k), (b, k, n))`` sums ``b`` products into ``(m, n)``: ``2 b m k n``."""
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def _trilinear_flop(
    i1: _Shape,
    i2: _Shape,
    i3: _Shape,
    expand1: Sequence[int],
    expand2: Sequence[int],
    expand3: Sequence[int],
    sumdim: Sequence[int],
    *args: Any,
    out_shape: _Shape,
    **kwargs: Any,
) -> int:
    """``_trilinear`` (``F.bilinear``): ``sum over sumdim of i1 * i2 * i3`` after unsqueezing each operand at
    its ``expand`` dims; two multiplies per term of the broadcast product, as ``2 b o n1 n2`` for bilinear."""

    def expanded(shape: _Shape, dims: Sequence[int]) -> list[int]:
        s = list(shape)
        for d in sorted(dims):
            s.insert(d, 1)
        return s

    full = torch.broadcast_shapes(
        torch.Size(expanded(i1, expand1)),
        torch.Size(expanded(i2, expand2)),
        torch.Size(expanded(i3, expand3)),
    )
    return 2 * math.prod(full)


def _grouped_mm_fallback_bwd_flop(
    a_shape: _Shape,
    b_shape: _Shape,
    offs_shape: _Shape,
    grad_shape: _Shape,
    *args: Any,
    out_shape: Any,
    **kw: Any,
) -> int:
    """transformers' grouped-matmul backward: the input gradient ``(S, n) x (n, k)`` and the weight gradient
    ``(k, S) x (S, n)`` per group, ``2 x 2 S k n``."""
    return 2 * _grouped_mm_flop(a_shape, b_shape, out_shape=grad_shape)


_ATEN_FORMULAS: dict[str, Callable[..., int]] = {
    "_grouped_mm": _grouped_mm_flop,
    "_scaled_grouped_mm": _scaled_grouped_mm_flop,
    "_int_mm": _contract_last,
    "_scaled_mm_v2": _contract_last,
    "_weight_int8pack_mm": _contract_last,
    "_weight_int4pack_mm": _contract_last,
    "mv": _contract_last,
    "dot": _contract_last,
    "vdot": _contract_last,
    "addmv": _addmv_flop,
    "addbmm": _addbmm_flop,
    "_trilinear": _trilinear_flop,
}

# Matmul-class custom ops of libraries distplan builds models from (``namespace::name``). transformers runs
# every MoE's experts (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...) through ``grouped_mm_fallback`` when
# captured with fp32/fp16 weights; its backward is a second custom op.
_LIBRARY_FORMULAS: dict[str, Callable[..., int]] = {
    "transformers::grouped_mm_fallback": _grouped_mm_flop,
    "transformers::grouped_mm_fallback_backward": _grouped_mm_fallback_bwd_flop,
}


def _packet(qualified: str) -> Any:
    """``torch.ops.<ns>.<name>`` for ``ns::name``, or ``None`` when no such op is registered (yet)."""
    ns, _, name = qualified.partition("::")
    try:
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return None


def extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """The formulas distplan adds to ``FlopCounterMode`` (``custom_mapping``): op overload packet -> formula.

    Only ops that torch's own registry lacks (a later torch that ships one keeps its own) and, for library
    custom ops, only those registered in this process (transformers registers its ops on import).
    """
    out: dict[Any, Callable[..., int]] = {}
    for name, f in _ATEN_FORMULAS.items():
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            out[op] = f
    for qualified, f in _LIBRARY_FORMULAS.items():
        op = _packet(qualified)
        if op is not None and op not in flop_registry:
            out[op] = f
    return out


def flop_counter() -> FlopCounterMode:
    """A quiet ``FlopCounterMode`` that also counts the ops of :func:`extra_flop_formulas` (and any formula
    registered with ``torch.utils.flop_counter.register_flop_formula``)."""
    return FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


# Contractions whose FLOPs the counter knows (torch's registry and ours), by op name: a node of one of these
# at 0 FLOPs with non-empty operands means a formula is missing or was bypassed.
_MATMUL_NAMES = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "convolution",
        "_convolution",
        "convolution_overrideable",
        "cudnn_convolution",
        "_slow_conv2d_forward",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "linear",
        "matmul",
        "einsum",
        "tensordot",
        "bilinear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        *_ATEN_FORMULAS,
    }
)
_BUILTIN_NAMESPACES = frozenset({"aten", "prims", "prim", "_operator", "builtins", "math", "higher_order"})


def is_matmul_class(target: str) -> bool:
    """Whether an OpNode ``target`` (``aten.mm.default``, ``torch._C._nn.linear``) is a contraction."""
    parts = target.split(".")
    if parts[0] == "aten" and len(parts) >= 2:
        return parts[1] in _MATMUL_NAMES
    return parts[-1] in _MATMUL_NAMES and target.startswith("torch.")


def uncounted_reason(target: str, op: Any, fwd_flops: int, operands: Sequence[torch.Tensor]) -> str | None:
    """Why a node's ``fwd_flops`` of 0 is suspect, or ``None`` when 0 is right or the node counted FLOPs.

    Suspect: a matmul-class op (:func:`is_matmul_class`) with no empty operand, or an op of another
    namespace (a custom op, opaque to the counter) that reads two or more floating tensors of rank >= 2,
    such as activations and a weight matrix, and has no formula. Elementwise custom ops (one matrix
    operand) are not flagged: the counter's convention counts them 0.
    """
    if fwd_flops:
        return None
    floats = [t for t in operands if t.dtype.is_floating_point or t.dtype.is_complex]
    if is_matmul_class(target):
        if not floats or any(t.numel() == 0 for t in floats):
            return None
        return f"{target} is a matmul-class op but counted 0 FLOPs"
    ns = target.split(".")[0]
    if not isinstance(op, torch._ops.OpOverload) or ns in _BUILTIN_NAMESPACES:
        return None
    if op.overloadpacket in extra_flop_formulas() or op.overloadpacket in flop_registry:
        return None
    if sum(1 for t in floats if t.dim() >= 2 and t.numel() > 0) < 2:
        return None
    return (
        f"custom op {target} reads {len(floats)} floating tensors and has no FLOP formula (counted 0); register "
        "one with torch.utils.flop_counter.register_flop_formula"
    )
