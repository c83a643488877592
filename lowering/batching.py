"""Model inputs along the batch: which keyword inputs carry a batch dimension, how batches are drawn, cut
into data-parallel shares and microbatches.

[Note: keyword inputs]
A model is called as ``model(*args, **kwargs)``. Every positional tensor has the batch along dimension 0
(the tracer's batch maker redraws them at any batch size). A keyword tensor (an attention or padding mask,
token type ids, a per-sample weight) has a batch dimension when its leading dimension equals the
positional inputs' batch size ``B`` in the example call; it is then cut into data-parallel shares and
microbatches with the positional inputs. Every other keyword value (a flag, a 0-d tensor, a table whose
leading dimension is not ``B``, a mask of leading dimension 1 that broadcasts) reaches every microbatch
unchanged. Two cases cannot be told apart and are refused up front, naming the input:

- ``B == 1`` and a keyword tensor's leading dimension is 1: it may be per-sample or broadcast; give example
  inputs with a batch of at least 2;
- no positional tensor at all: the batch size is read from the positional inputs; pass the main input
  positionally.

Batches drawn for training and validation (:func:`sample_kwargs`) pick, for each sample, one row of every
batched keyword tensor of the example call (the same row for all of them, seeded), so masks and ids keep
values the model accepts; non-batch keyword values are the example's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from distplan.errors import LoweringError

__all__ = ["InputLayout", "classify_inputs", "input_flags", "sample_kwargs", "take_samples"]


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(key))
    return ".".join(parts)


@dataclass(frozen=True, slots=True)
class InputLayout:
    """Which inputs have a batch dimension (see [Note: keyword inputs]).

    Attributes:
        batch: ``B``, the positional inputs' batch size in the example call.
        kwarg_flags: the example keyword arguments with each pytree leaf (``None`` included) replaced by
            ``True`` (batched tensor) or ``False`` (passed whole).
        batched: names of the batched keyword tensors (dotted paths for nested values).
        whole: names of the keyword tensors passed whole to every microbatch.
    """

    batch: int
    kwarg_flags: dict[str, Any]
    batched: tuple[str, ...] = ()
    whole: tuple[str, ...] = ()


def classify_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> InputLayout:
    """Classify the keyword inputs of an example call (see [Note: keyword inputs]).

    Raises:
        LoweringError: an input whose batch dimension cannot be told, named.
    """
    first = next(
        (t for t in pytree.tree_leaves(tuple(args)) if isinstance(t, torch.Tensor) and t.dim() > 0), None
    )
    kw_tensors = [
        (_path_name(p), v)
        for p, v in pytree.tree_flatten_with_path(dict(kwargs))[0]
        if isinstance(v, torch.Tensor)
    ]
    if first is None:
        if kw_tensors:
            raise LoweringError(
                f"the model takes its tensors only as keyword inputs ({', '.join(n for n, _ in kw_tensors)}); "
                "the batch size is read from the positional inputs: pass the main input positionally"
            )
        return InputLayout(batch=0, kwarg_flags=dict(kwargs))
    b = int(first.shape[0])
    batched: list[str] = []
    whole: list[str] = []

    def flag(path: tuple[Any, ...], v: Any) -> bool:
        if not isinstance(v, torch.Tensor):
            return False
        name = _path_name(path)
        lead = int(v.shape[0]) if v.dim() > 0 else None
        if lead == b and b == 1:
            raise LoweringError(
                f"keyword input {name!r} (shape {tuple(v.shape)}) has leading dimension 1, the same as the "
                "example batch size 1: it may hold one row per sample or one row for all; give example "
                "inputs with a batch of at least 2 so the batch dimension can be told"
            )
        (batched if lead == b else whole).append(name)
        return lead == b

    flags = pytree.tree_map_with_path(flag, dict(kwargs))
    return InputLayout(batch=b, kwarg_flags=flags, batched=tuple(batched), whole=tuple(whole))


def input_flags(args: tuple[Any, ...], layout: InputLayout) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` flags: ``True`` for every leaf cut along the batch (every positional tensor and the
    batched keyword tensors), ``False`` for the rest; same structure as the call."""
    arg_flags = pytree.tree_map(lambda v: isinstance(v, torch.Tensor) and v.dim() > 0, tuple(args))
    return arg_flags, layout.kwarg_flags


def sample_kwargs(
    example: Mapping[str, Any], layout: InputLayout, batch: int, *, seed: int
) -> dict[str, Any]:
    """Keyword inputs for ``batch`` samples: batched tensors take seeded rows of the example, the rest is
    the example's (see [Note: keyword inputs])."""
    if not layout.batched:
        return dict(example)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, layout.batch, (batch,), generator=gen)

    def pick(v: Any, batched: Any) -> Any:
        if batched is True:
            return v.index_select(0, rows.to(v.device))
        return v

    return pytree.tree_map(pick, dict(example), layout.kwarg_flags)  # type: ignore[no-any-return]


def check_kwargs(given: Mapping[str, Any], layout: InputLayout) -> None:
    """Raise :class:`LoweringError` unless ``given`` has the example call's keyword names."""
    want, got = set(layout.kwarg_flags), set(given)
    if want != got:
        missing, extra = sorted(want - got), sorted(got - want)
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unknown {extra}")
        raise LoweringError(
            f"keyword inputs {sorted(got)} do not match the model's example call {sorted(want)}: "
            f"{'; '.join(parts)} (the captured program takes exactly the example call's keywords)"
        )


def take_samples(tree: Any, flags: Any, start: int, stop: int) -> Any:
    """``tree`` with every batched leaf (flag ``True``) cut to samples ``[start, stop)``."""
    return pytree.tree_map(lambda v, f: v[start:stop] if f is True else v, tree, flags)


def num_samples(tree: Any, flags: Any) -> int | None:
    """The batch size of the batched leaves of ``tree`` (``None`` if it has none)."""
    sizes = [
        int(v.shape[0])
        for v, f in zip(pytree.tree_leaves(tree), pytree.tree_leaves(flags), strict=True)
        if f is True
    ]
    return sizes[0] if sizes else None
