"""The op names that make up an attention core, shared by the planner (which prices selective recomputation of
the cores it finds in a traced graph, ``distplan.planner.parallelism``) and the lowering (which recomputes the
same cores in a stage's captured module, ``distplan.lowering.recompute``): one table, so the planner prices
exactly what the lowering recomputes.

An attention core is a fused scaled-dot-product attention op, or the unfused path ``matmul(Q, K^T)`` ->
elementwise ops (scale, mask, cast, dropout) -> ``softmax`` -> elementwise ops -> ``matmul(., V)``. Names are
bare op names: ``aten.softmax.int`` -> ``softmax``, ``operator.getitem`` -> ``getitem``, ``torch.matmul`` ->
``matmul``. This module imports nothing.
"""

from __future__ import annotations

__all__ = ["ELEMENTWISE", "MATMUL", "SDPA", "SOFTMAX"]

#: Fused attention kernels (and the math form DTensor runs on the CPU, named by ``distplan.lowering.stages``).
SDPA = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "sdpa_math",
    }
)
#: The softmax at the centre of an unfused core.
SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
#: The products on either side of it (scores = Q K^T, output = P V).
MATMUL = frozenset({"matmul", "bmm", "baddbmm", "einsum", "__matmul__"})
#: Ops that keep a value's role on the way between the scores and the softmax and between the softmax and the
#: product with V: scale, mask, cast, dropout, copies and views.
ELEMENTWISE = frozenset(
    {
        "add",
        "sub",
        "mul",
        "div",
        "truediv",
        "masked_fill",
        "where",
        "to",
        "type",
        "float",
        "half",
        "bfloat16",
        "_to_copy",
        "dropout",
        "native_dropout",
        "clone",
        "contiguous",
        "tanh",
        "neg",
        "exp",
        "alias",
        "detach",
        "__add__",
        "__mul__",
        "__truediv__",
        "__sub__",
        "getitem",
    }
)
