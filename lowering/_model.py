"""Glue between the lowering and the tracer: resolve a model, capture it, check a plan belongs to it.

A model reaches the lowering as a spec string (built-in name, HF ``config.json`` path,
``package.module:function`` factory), a tracer ``ModelBundle``, or a plain ``nn.Module`` with example inputs
and a loss function. All three become a :class:`ModelSource` here. Which output the loss reads is the
``output`` selector ([Note: output selector] in ``distplan.lowering.outputs``); which keyword inputs are cut
along the batch is [Note: keyword inputs] in ``distplan.lowering.batching``. Nothing here changes the
user's module: every step that runs its forward runs under ``preserved_state``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from distplan.errors import LoweringError, ModelSpecError, PlanError
from distplan.graph import OpGraph
from distplan.lowering.batching import InputLayout, classify_inputs, input_flags, sample_kwargs
from distplan.lowering.effects import preserved_state
from distplan.lowering.outputs import select_output
from distplan.plan import Plan

__all__ = [
    "Batch",
    "CapturedModel",
    "ModelSource",
    "as_meta",
    "capture_model",
    "check_plan_graph",
    "on_meta",
    "resolve_source",
]


@dataclass(frozen=True, slots=True)
class Batch:
    """One training batch: ``model(*args, **kwargs)`` is compared with ``target`` by the loss."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Any


@dataclass
class ModelSource:
    """A model with what the lowering needs around it.

    Attributes:
        module: the model; ``module(*args, **kwargs)`` returns one tensor or a structure of them, of which
            ``output`` selects the one the loss reads.
        loss: ``loss(output, target) -> scalar``, a mean over the batch (so microbatch losses average to the
            whole batch's loss); ``output`` is the selected tensor.
        make_batch: ``make_batch(batch, seed=...) -> (inputs tuple, target)``, or ``None`` for a plain module.
        example_args / example_kwargs: an example call (``example_kwargs`` also holds non-tensor flags such as
            ``use_cache``, passed on every call).
        spec: the spec string it came from, if any (the validation's worker processes rebuild it from it).
        bundle: the tracer's ``ModelBundle``, if any.
        output: the output selector (see [Note: output selector]); ``None`` for the default rule.
        layout: which inputs have a batch dimension (see [Note: keyword inputs]).
        rebuild: ``() -> nn.Module`` building the model again on ``meta`` (spec strings), used to replay
            the constructor of tensors no initialisation writes ([Note: reproducible initialisation] in
            ``distplan.lowering.init``); ``None`` when the model cannot be rebuilt.
    """

    module: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_batch: Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor]] | None = None
    example_args: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    spec: str | None = None
    bundle: Any = None
    output: str | None = None
    layout: InputLayout | None = None
    rebuild: Callable[[], nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = classify_inputs(self.example_args, self.example_kwargs)

    def select(self, out: Any) -> torch.Tensor:
        """The tensor of a model output that the loss reads."""
        return select_output(out, self.output)

    def sample(self, batch: int, *, seed: int = 0) -> Batch:
        """A seeded batch of ``batch`` samples: positional inputs and target from the model's batch maker,
        keyword inputs from the example call (see [Note: keyword inputs])."""
        if self.make_batch is None:
            raise LoweringError("this model has no batch generator; pass example inputs of one microbatch")
        inputs, target = self.make_batch(batch, seed=seed)
        assert self.layout is not None
        kwargs = sample_kwargs(self.example_kwargs, self.layout, batch, seed=seed)
        return Batch(tuple(inputs), kwargs, target)

    def inputs(self, batch: int, *, seed: int = 0) -> tuple[tuple[Any, ...], Any]:
        """Example (positional inputs, target) of ``batch`` samples (:meth:`sample` without the keywords)."""
        b = self.sample(batch, seed=seed)
        return b.args, b.target


def resolve_source(
    model: Any,
    *,
    batch: int,
    seq: int | None,
    seed: int = 0,
    device: str = "cpu",
    example_inputs: Sequence[Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    config_overrides: dict[str, Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    output: str | None = None,
) -> ModelSource:
    """Turn a spec string, ``ModelBundle`` or ``nn.Module`` into a :class:`ModelSource`.

    A spec string is built on ``device`` (``"meta"``: no memory, as :func:`~distplan.lowering.lower` does).
    ``output`` selects the output the loss reads (see [Note: output selector]); ``example_kwargs`` are the
    keyword inputs of a plain module's example call.

    Raises:
        ModelSpecError: the model cannot be built. LoweringError: a plain module without example inputs
            or loss, a keyword input whose batch dimension cannot be told, an output selector that selects
            no tensor.
    """
    if isinstance(model, str):
        from distplan.tracer import resolve_model

        kw: dict[str, Any] = {
            "batch": batch,
            "device": device,
            "seed": seed,
            "config_overrides": config_overrides,
        }
        if seq is not None:
            kw["seq"] = seq
        bundle = resolve_model(model, **kw)
        if _any_meta(bundle.example_kwargs):
            # A factory returning its example call builds it on meta too, but keyword values are data the
            # batch maker reuses whole (see [Note: keyword inputs]): build the call again with its small
            # tensors on the CPU.
            from distplan.lowering.init import SmallOnCPU

            with SmallOnCPU(limit=_EXAMPLE_BYTES, budget=4 * _EXAMPLE_BYTES):
                again = resolve_model(model, **kw)
            if _any_meta(again.example_kwargs):
                raise LoweringError(
                    f"the keyword inputs of {model!r}'s example call are too large to rebuild off 'meta' "
                    f"(over {_EXAMPLE_BYTES >> 20} MiB); pass the model as a module with example_kwargs"
                )
            bundle = dataclasses.replace(
                bundle, example_args=again.example_args, example_kwargs=again.example_kwargs
            )
        source = _from_bundle(bundle, spec=model, output=output)
        source.rebuild = lambda: resolve_model(model, **{**kw, "device": "meta"}).module
        return source
    if isinstance(model, nn.Module):
        if example_inputs is None or loss_fn is None:
            raise LoweringError(
                "a plain nn.Module needs example_inputs= (one microbatch) and loss_fn=; "
                "or pass a model spec string or a distplan.tracer ModelBundle"
            )
        return ModelSource(
            module=model,
            loss=loss_fn,
            example_args=tuple(example_inputs),
            example_kwargs=dict(example_kwargs or {}),
            output=output,
        )
    if hasattr(model, "module") and hasattr(model, "loss"):
        return _from_bundle(model, spec=getattr(model, "spec", None), output=output)
    raise ModelSpecError(
        f"cannot use a {type(model).__name__} as a model: pass a spec string, a ModelBundle or an nn.Module"
    )


def _from_bundle(bundle: Any, *, spec: str | None, output: str | None) -> ModelSource:
    if getattr(bundle, "kind", None) == "regression" and getattr(bundle, "_target_shape", ()) is None:
        # The tracer's batch maker learns a factory model's target shape by running its forward, which
        # reads one tensor output and advances the module's state (BatchNorm counters). Learn the shape of
        # the selected output here, with the state put back, and hand it to the batch maker.
        shape = _output_shape(bundle.module, bundle.example_args, bundle.example_kwargs, output)
        bundle = dataclasses.replace(bundle, _target_shape=shape)
    return ModelSource(
        module=bundle.module,
        loss=bundle.loss,
        make_batch=bundle.make_batch,
        example_args=tuple(getattr(bundle, "example_args", ()) or ()),
        example_kwargs=dict(getattr(bundle, "example_kwargs", {}) or {}),
        spec=spec,
        bundle=bundle,
        output=output,
    )


def _output_shape(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: str | None
) -> tuple[int, ...]:
    """Per-sample shape of the selected output, from a fake-tensor forward (no compute, state preserved).

    Tensors on ``meta`` (the model's or the inputs') take part as fake CPU tensors: constants the forward
    makes (``torch.tensor(...)``) are CPU tensors, which meta ones could not meet."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fake(t: Any) -> Any:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")

    def is_meta(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == "meta"

    with preserved_state(module), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        named = (*module.named_parameters(), *module.named_buffers())
        state = {k: fake(t) for k, t in named if is_meta(t)}
        args, kwargs = pytree.tree_map(lambda t: fake(t) if is_meta(t) else t, (args, kwargs))
        out = torch.func.functional_call(module, state, tuple(args), dict(kwargs))
        out = select_output(out, output)
    return tuple(int(d) for d in out.shape[1:])


@dataclass
class CapturedModel:
    """The captured graph of a model at the microbatch shape.

    Attributes:
        gm: the captured ``GraphModule`` (the tracer's capture: node names equal the OpGraph's).
        node_names: the graph's node names in order, ``get_attr``/``output`` excluded (= OpGraph positions).
        input_names: the placeholders that take tensors, in the order stage 0 receives them.
        constant_inputs: placeholders fed a non-tensor value, baked into stage 0.
        flatten: ``flatten(args, kwargs) -> tensors`` in ``input_names`` order.
        batched: per entry of ``input_names``, whether it is cut along the batch (see [Note: keyword
            inputs]); the others reach every microbatch whole.
    """

    gm: fx.GraphModule
    node_names: list[str]
    input_names: list[str]
    constant_inputs: dict[str, Any]
    flatten: Callable[[tuple[Any, ...], dict[str, Any]], list[torch.Tensor]]
    capture: Any = None
    flat_inputs: Callable[[tuple[Any, ...], dict[str, Any]], list[Any]] | None = None
    module: nn.Module | None = None
    example: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
    batched: list[bool] = field(default_factory=list)

    def values(self) -> dict[str, Any]:
        """Node name -> value at the captured shape: ``node.meta["val"]`` (export), else one run of the graph
        on the example inputs (``fx`` captures carry no values)."""
        nodes = [n for n in self.gm.graph.nodes if n.op not in ("get_attr", "output")]
        if all("val" in n.meta for n in nodes):
            return {n.name: n.meta["val"] for n in nodes}
        out: dict[str, Any] = {}
        interp = fx.Interpreter(self.gm)
        run_node = interp.run_node

        def record(n: fx.Node) -> Any:
            out[n.name] = v = run_node(n)
            return v

        interp.run_node = record  # type: ignore[method-assign]
        args, kwargs = self.example
        assert self.flat_inputs is not None and self.module is not None
        with preserved_state(self.module), torch.random.fork_rng(devices=[]), torch.no_grad():
            interp.run(*self.flat_inputs(args, kwargs))
        return out

    def graph(self, *, name: str = "model") -> OpGraph:
        """The tracer's annotated ``OpGraph`` of this very capture (what ``structure_hash`` refers to)."""
        from distplan.tracer import graph_from_capture

        assert self.module is not None
        args, kwargs = self.example
        with preserved_state(self.module):
            return graph_from_capture(self.capture, self.module, args, kwargs, name=name)  # type: ignore[no-any-return]


_EXAMPLE_BYTES = 64 << 20


def _any_meta(x: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in pytree.tree_leaves(x))


def on_meta(module: nn.Module) -> bool:
    """Whether the module was built on ``meta`` (any of its parameters or buffers has no value)."""
    return any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))


def as_meta(x: Any) -> Any:
    """``x`` (a tensor, or a structure of them) with every tensor on ``meta``: example inputs of a model
    built on ``meta``, captured as the tracer captures it."""
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)


def capture_model(source: ModelSource, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CapturedModel:
    """Capture ``source.module`` with the tracer's own ``capture`` at the given (one microbatch) inputs."""
    from distplan.tracer import capture

    with preserved_state(source.module):
        cap = capture(source.module, tuple(args), dict(kwargs))
    gm = cap.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    if cap.method == "export":
        # torch.export: placeholders are the pytree leaves of (args, kwargs), in order.
        def flat_all(a: tuple[Any, ...], k: dict[str, Any]) -> list[Any]:
            return list(pytree.tree_leaves((tuple(a), dict(k))))
    else:
        # fx.symbolic_trace: placeholders are the forward's parameters, by name.
        sig = inspect.signature(source.module.forward)

        def flat_all(a: tuple[Any, ...], k: dict[str, Any]) -> list[Any]:
            bound = sig.bind(*a, **k)
            bound.apply_defaults()
            return [bound.arguments.get(p.target) for p in placeholders]  # type: ignore[call-overload]

    example = flat_all(args, kwargs)
    if len(example) != len(placeholders):
        raise LoweringError(
            f"the captured graph has {len(placeholders)} inputs but the example gives {len(example)} values"
        )
    tensor_idx = [i for i, v in enumerate(example) if isinstance(v, torch.Tensor)]
    constants = {placeholders[i].name: v for i, v in enumerate(example) if not isinstance(v, torch.Tensor)}

    def flatten(a: tuple[Any, ...], k: dict[str, Any]) -> list[torch.Tensor]:
        vals = flat_all(a, k)
        return [vals[i] for i in tensor_idx]

    assert source.layout is not None
    arg_flags, kw_flags = input_flags(tuple(args), source.layout)
    flags = flat_all(arg_flags, kw_flags)

    return CapturedModel(
        gm=gm,
        node_names=names,
        input_names=[placeholders[i].name for i in tensor_idx],
        constant_inputs=constants,
        flatten=flatten,
        capture=cap,
        flat_inputs=flat_all,
        module=source.module,
        example=(tuple(args), dict(kwargs)),
        batched=[flags[i] is True for i in tensor_idx],
    )


def check_plan_graph(plan: Plan, graph: OpGraph) -> None:
    """Raise :class:`PlanError` unless ``plan`` was made for a graph of the same structure as ``graph``."""
    if graph.structure_hash != plan.graph.structure_hash:
        raise PlanError(
            f"the plan does not belong to this model: it was made for graph {plan.graph.name!r} "
            f"(structure hash {plan.graph.structure_hash[:12]}), but the model traces to graph "
            f"{graph.name!r} (structure hash {graph.structure_hash[:12]}, {len(graph.nodes)} nodes)"
        )
    if plan.stages[-1].end != len(graph.nodes):
        raise PlanError(
            f"the plan's last stage ends at node {plan.stages[-1].end} but the graph has {len(graph.nodes)}"
        )


def check_node_names(plan: Plan, names: Sequence[str], graph: OpGraph | None = None) -> None:
    """Check the captured node list against the plan (and the traced graph, when given)."""
    if graph is not None:
        want = [n.name for n in graph.nodes]
        if want != list(names):
            first = next(
                (i for i, (a, b) in enumerate(zip(want, names, strict=False)) if a != b),
                min(len(want), len(names)),
            )
            got = names[first] if first < len(names) else "<end>"
            exp = want[first] if first < len(want) else "<end>"
            raise LoweringError(
                f"the captured graph differs from the traced graph at node {first}: {got!r} vs {exp!r} "
                f"({len(names)} vs {len(want)} nodes); the capture must match the trace the plan was made from"
            )
    if plan.stages[-1].end != len(names):
        raise PlanError(
            f"the plan's last stage ends at node {plan.stages[-1].end} but the captured model has {len(names)} nodes"
        )
    for s in plan.stages:
        if s.start_node and names[s.start] != s.start_node:
            raise PlanError(
                f"stage {s.index} should start at node {s.start_node!r} but position {s.start} of the captured "
                f"model is {names[s.start]!r}; the plan belongs to another model"
            )
