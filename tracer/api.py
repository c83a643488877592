"""``distplan.trace``: any model spec, module or bundle to an annotated :class:`OpGraph`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distplan.errors import ModelSpecError, TraceError
from distplan.graph import OpGraph
from distplan.tracer.annotate import graph_from_capture
from distplan.tracer.capture import capture
from distplan.tracer.zoo import ModelBundle, _factory_inputs, resolve_model

__all__ = ["trace", "trace_bundle"]


def trace(
    model: nn.Module | ModelBundle | str,
    example_inputs: tuple[Any, ...] | torch.Tensor | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    batch: int = 1,
    seq: int = 512,
    device: str = "meta",
) -> OpGraph:
    """Trace a model into an annotated :class:`OpGraph`.

    ``model`` is a model spec (built-in name, ``config.json`` path or ``package.module:function``, built on
    ``device`` with example inputs of ``batch`` x ``seq``), a :class:`ModelBundle`, or an ``nn.Module``
    called as ``model(*example_inputs, **example_kwargs)``. For a module without example inputs they are
    inferred as for factories (see [Note: factory contract] in ``distplan.tracer.zoo``). A module with real
    weights is fine: annotation runs on ``meta`` copies of every tensor.

        >>> g = trace("gpt-tiny", seq=32)
        >>> g.fwd_flops > 0 and g.param_bytes == sum(n.param_bytes for n in g.nodes)
        True
    """
    if isinstance(model, str):
        bundle = resolve_model(model, batch=batch, seq=seq, device=device)
        return trace_bundle(bundle, name=name)
    if isinstance(model, ModelBundle):
        if example_inputs is not None or example_kwargs is not None:
            raise ModelSpecError("a ModelBundle carries its own example inputs; do not pass example_inputs")
        return trace_bundle(model, name=name)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"trace() takes an nn.Module, a ModelBundle or a model spec string, got {type(model).__name__}"
        )
    if example_inputs is None:
        args = _factory_inputs(type(model).__name__, None, model, batch=batch, seq=seq, device="cpu", seed=0)
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    bundle = ModelBundle(
        name=name or type(model).__name__,
        spec=type(model).__qualname__,
        module=model,
        example_args=tuple(args),
        example_kwargs=dict(example_kwargs or {}),
        config={},
        kind="regression",
        batch=batch,
        seq=seq,
        device=str(next(iter(model.parameters()), torch.empty(0)).device),
    )
    return trace_bundle(bundle, name=name)


def trace_bundle(bundle: ModelBundle, *, name: str | None = None) -> OpGraph:
    """Capture and annotate a :class:`ModelBundle`; ``graph.meta`` records batch, seq, spec, capture method,
    kind and the seconds spent."""
    t0 = time.perf_counter()
    cap = capture(bundle.module, bundle.example_args, bundle.example_kwargs)
    t1 = time.perf_counter()
    graph = graph_from_capture(
        cap,
        bundle.module,
        bundle.example_args,
        bundle.example_kwargs,
        name=name or bundle.name,
        meta={
            "spec": bundle.spec,
            "kind": bundle.kind,
            "batch": _batch_of(bundle),
            "seq": _seq_of(bundle),
        },
    )
    t2 = time.perf_counter()
    meta = dict(graph.meta)
    meta["annotate_seconds"] = round(t2 - t1, 4)
    meta["trace_seconds"] = round(t2 - t0, 4)
    if not graph.nodes:
        raise TraceError(f"tracing {bundle.name!r} produced an empty graph")
    return OpGraph(
        name=graph.name,
        nodes=graph.nodes,
        outputs=graph.outputs,
        num_params=graph.num_params,
        param_bytes=graph.param_bytes,
        param_dtype=graph.param_dtype,
        meta=meta,
        param_sizes=graph.param_sizes,
        tensor_parallel=graph.tensor_parallel,
    )


def _batch_of(bundle: ModelBundle) -> int:
    first = next((a for a in bundle.example_args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    return int(first.shape[0]) if first is not None else bundle.batch


def _seq_of(bundle: ModelBundle) -> int:
    # Token ids (batch, seq) carry the sequence length; other models have none beyond what was asked.
    first = next((a for a in bundle.example_args if isinstance(a, torch.Tensor)), None)
    if first is not None and first.dim() == 2 and not first.dtype.is_floating_point:
        return int(first.shape[1])
    return bundle.seq
