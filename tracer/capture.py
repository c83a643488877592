"""Capture a module as a ``torch.fx.GraphModule``: ``torch.export`` (non-strict) first, ``symbolic_trace`` as
the fallback.

The lowering re-captures the CPU model with :func:`capture` and finds the plan's cut points by fx node name,
so names depend only on the model's code and configuration: the same at another batch size or width.

[Note: custom autograd Functions]
``torch.export`` (strict or not) and ``torch.fx`` record the ops of a ``torch.autograd.Function``'s
*forward* and drop its ``backward``: the captured graph, and so every pipeline stage built from it, trains
with autograd's derivative of the forward instead (a straight-through estimator's gradient becomes zero or
the derivative of ``round``). :func:`capture` watches ``Function.apply`` while it traces and, for each
Function applied where a gradient can flow, compares its ``backward`` with the derivative of its forward on
random inputs of the recorded shapes (float32, seeded). A Function whose backward *is* that derivative (a
memory-saving GELU, say) loses nothing and is listed in :attr:`Capture.inlined_functions`; any other, or one
that cannot be checked, is refused with a :class:`TraceError` naming it, where it is applied and the
remedy: a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``, which export keeps
as one op with its backward. PyTorch's own Functions (``torch.*``, e.g. the ones ``custom_op`` generates
for ``register_autograd``, reentrant checkpointing) are not watched: their backward is the derivative, or
the op that applies them is what the graph records.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from torch import fx, nn

from distplan.errors import TraceError

__all__ = ["Capture", "CaptureMethod", "TorchFailure", "capture", "describe_failure"]

CaptureMethod = Literal["export", "fx"]


class TorchFailure(Exception):
    """The first line of a library error, chained (``__cause__``) to the full exception.

    Torch's trace errors (and transformers' validators) run to dozens of lines of advice and graph dumps;
    the CLI prints a :class:`TraceError`'s / :class:`ModelSpecError`'s cause, so the cause is this
    one-line summary, and ``--debug`` still shows the whole chain.
    """

    @classmethod
    def of(cls, e: BaseException) -> TorchFailure:
        summary = cls(_first_line(e))
        summary.__cause__ = e
        return summary


@dataclass(frozen=True, eq=False)
class Capture:
    """A captured graph.

    Attributes:
        gm: the graph module; ``gm(*example_args, **example_kwargs)`` computes what the model computes.
            Exported graphs read parameters through ``get_attr`` nodes named after their FQN.
        method: ``export`` (``torch.export.export(strict=False).module()``) or ``fx``
            (``torch.fx.symbolic_trace``).
        seconds: wall time of the capture.
        export_error: why ``torch.export`` failed when ``method == "fx"``.
        inlined_functions: custom ``torch.autograd.Function`` classes (qualified names) whose forward the
            graph records in place of the Function, checked to have the derivative of that forward as their
            backward ([Note: custom autograd Functions]).
    """

    gm: fx.GraphModule
    method: CaptureMethod
    seconds: float
    export_error: str | None = None
    inlined_functions: tuple[str, ...] = field(default=())


def capture(
    module: nn.Module,
    example_args: tuple[Any, ...] | Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    method: Literal["auto", "export", "fx"] = "auto",
) -> Capture:
    """Capture ``module`` called on the example inputs.

    ``method="auto"`` tries ``torch.export.export(..., strict=False)`` and falls back to
    ``torch.fx.symbolic_trace``. Raises :class:`TraceError` naming the module, source line and op where
    tracing failed, or naming each custom ``torch.autograd.Function`` whose backward the graph would lose
    ([Note: custom autograd Functions]).
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"can only trace an nn.Module, got {type(module).__name__}")
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    t0 = time.perf_counter()
    export_error: BaseException | None = None
    watch = _FunctionWatch(module)
    if method in ("auto", "export"):
        try:
            with (
                watch,
                _quiet_torch_logs(),
                _meta_as_fake_cpu(module, args, kwargs) as (xargs, xkwargs),
            ):
                ep = torch.export.export(module, xargs, xkwargs, strict=False)
            # check_guards=False: no `_guards_fn` call_module node, so the graph holds only the model's ops.
            gm = ep.module(check_guards=False)
        except Exception as e:
            export_error = e
            if method == "export":
                raise TraceError(describe_failure(module, e, how="torch.export")) from TorchFailure.of(e)
        else:
            inlined = _check_functions(module, watch, how="torch.export")
            return Capture(
                gm=gm,  # type: ignore[arg-type]
                method="export",
                seconds=time.perf_counter() - t0,
                inlined_functions=inlined,
            )
    try:
        with watch, _quiet_torch_logs():
            gm = fx.symbolic_trace(module)
    except Exception as e:
        if export_error is not None:
            msg = describe_failure(module, export_error, how="torch.export")
            raise TraceError(
                f"{msg}; the torch.fx fallback failed too: {_first_line(e)}"
            ) from TorchFailure.of(export_error)
        raise TraceError(describe_failure(module, e, how="torch.fx")) from TorchFailure.of(e)
    inlined = _check_functions(module, watch, how="torch.fx")
    return Capture(
        gm=gm,
        method="fx",
        seconds=time.perf_counter() - t0,
        export_error=None
        if export_error is None
        else describe_failure(module, export_error, how="torch.export"),
        inlined_functions=inlined,
    )


# ---------------------------------------------------------------------------------------------- Functions
@dataclass(frozen=True)
class _TensorSpec:
    """A tensor argument of a Function call, as recorded while tracing (fake tensors: shapes only)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class _FunctionCall:
    """One custom Function as applied while tracing: where, and its arguments (``None``: not recordable,
    e.g. fx proxies or data-dependent sizes)."""

    cls: type
    site: str
    args: tuple[Any, ...] | None
    kwargs: dict[str, Any] | None


_WATCH_LOCK = threading.Lock()
_WATCHES: list[_FunctionWatch] = []
_ORIGINAL_APPLY: Any = None


class _FunctionWatch:
    """While active, records every custom ``torch.autograd.Function`` applied with gradients on.

    ``Function.apply`` has no hook, so it is wrapped (once, however many watches are active) and restored
    when the last watch ends; the wrapper only records and then calls the original.
    """

    def __init__(self, root: nn.Module) -> None:
        self.names = {id(m): n for n, m in root.named_modules()}
        self.root_name = type(root).__name__
        self.calls: dict[type, _FunctionCall] = {}
        self.thread = threading.get_ident()  # another thread's capture is not this one's business

    def __enter__(self) -> _FunctionWatch:
        global _ORIGINAL_APPLY
        from torch.autograd.function import Function

        with _WATCH_LOCK:
            if not _WATCHES:
                _ORIGINAL_APPLY = Function.__dict__["apply"]
                Function.apply = classmethod(_watched_apply)  # type: ignore[assignment,method-assign]
            _WATCHES.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        from torch.autograd.function import Function

        with _WATCH_LOCK:
            _WATCHES.remove(self)
            if not _WATCHES:
                Function.apply = _ORIGINAL_APPLY  # type: ignore[method-assign]

    def record(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], frame: Any) -> None:
        if cls in self.calls:
            return
        self.calls[cls] = _FunctionCall(
            cls=cls, site=self._site(frame), args=_specs(args), kwargs=_specs_kw(kwargs)
        )

    def _site(self, frame: Any) -> str:
        """``in module 'blocks.0' (Block) at file.py:12 `line``` for ``frame``, the one calling ``apply``
        (the module is the innermost of the model's modules whose ``forward`` is running)."""
        module_desc = None
        fr = frame
        while fr is not None and module_desc is None:
            self_obj = fr.f_locals.get("self")
            if isinstance(self_obj, nn.Module) and id(self_obj) in self.names:
                fqn = self.names[id(self_obj)]
                module_desc = f"module {fqn!r} ({type(self_obj).__name__})" if fqn else self.root_name
            fr = fr.f_back
        return f"in {module_desc or self.root_name} at {_frame_line(frame)}"


def _watched_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    module = getattr(cls, "__module__", "") or ""
    if not (module == "torch" or module.startswith("torch.")) and _may_need_grad(args, kwargs):
        frame = sys._getframe(1)
        thread = threading.get_ident()
        for w in list(_WATCHES):
            if w.thread == thread:
                w.record(cls, args, kwargs, frame)
    return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)


def _may_need_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether autograd would record the Function's backward: grad mode on and an argument that requires
    grad (an fx ``Proxy`` may: symbolic tracing has no values)."""
    if not torch.is_grad_enabled():
        return False
    for a in (*args, *kwargs.values()):
        if isinstance(a, fx.Proxy) or (isinstance(a, torch.Tensor) and a.requires_grad):
            return True
    return False


def _spec(a: Any) -> Any:
    if isinstance(a, fx.Proxy):
        raise ValueError("symbolic value")
    if isinstance(a, torch.Tensor):
        return _TensorSpec(tuple(int(s) for s in a.shape), a.dtype, bool(a.requires_grad))
    return a


def _specs(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    try:
        return tuple(_spec(a) for a in args)
    except Exception:  # proxies, unbacked sizes: nothing to probe with
        return None


def _specs_kw(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return {k: _spec(v) for k, v in kwargs.items()}
    except Exception:
        return None


# Largest probe ([Note: custom autograd Functions]): elements over all tensor arguments of one call.
_PROBE_NUMEL = 1 << 24


def _check_functions(module: nn.Module, watch: _FunctionWatch, *, how: str) -> tuple[str, ...]:
    """Raise :class:`TraceError` for the custom Functions whose backward the graph loses; return the names
    of those whose backward is the derivative of their forward (nothing lost)."""
    inlined: list[str] = []
    refused: list[str] = []
    for call in watch.calls.values():
        name = call.cls.__qualname__
        problem = _backward_differs(call)
        if problem is None:
            inlined.append(f"{call.cls.__module__}.{name}")
            continue
        defined = _definition(call.cls)
        refused.append(f"{name} ({defined}) {call.site}: {problem}")
    if refused:
        n = len(refused)
        what = "a custom torch.autograd.Function" if n == 1 else f"{n} custom torch.autograd.Functions"
        raise TraceError(
            f"{type(module).__name__} applies {what} with its own backward, which {how} cannot keep: "
            + "; ".join(refused)
            + ". The captured graph records only the forward's ops, so every pipeline stage would train with "
            "autograd's derivative of that forward instead. Make each one a custom op, which the graph keeps "
            "whole with its backward: decorate a function computing the forward with "
            "@torch.library.custom_op('yourlib::name', mutates_args=()), give its output shapes with "
            "register_fake, and its backward with register_autograd(backward, setup_context=...) "
            "(https://pytorch.org/docs/stable/library.html); or drop the Function if its backward is the "
            "derivative of its forward"
        )
    return tuple(sorted(inlined))


def _definition(cls: type) -> str:
    import inspect

    try:
        filename = inspect.getsourcefile(cls) or ""
        line = inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return f"class {cls.__module__}.{cls.__qualname__}"
    short = "/".join(filename.replace("\\", "/").split("/")[-2:])
    return f"defined at {short}:{line}"


def _backward_differs(call: _FunctionCall) -> str | None:
    """``None`` when the Function's backward matches the derivative of its forward on seeded random inputs
    of the recorded shapes (float32, relative tolerance 1e-4); otherwise what differs or why it could not be
    checked."""
    if call.args is None or call.kwargs is None:
        return "its backward could not be checked against its forward (no example values while tracing)"
    specs = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, _TensorSpec)]
    if sum(math.prod(s.shape) for s in specs) > _PROBE_NUMEL:
        return "its backward could not be checked against its forward (arguments too large to probe)"
    gen = torch.Generator().manual_seed(0)
    values = {id(s): _probe_value(s, gen) for s in specs}

    def inputs() -> tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]]:
        leaves: list[torch.Tensor] = []

        def one(a: Any) -> Any:
            if not isinstance(a, _TensorSpec):
                return a
            t = values[id(a)].clone()
            if a.requires_grad and t.dtype.is_floating_point:
                t.requires_grad_(True)
                leaves.append(t)
            return t

        assert call.args is not None and call.kwargs is not None
        return tuple(one(a) for a in call.args), {k: one(v) for k, v in call.kwargs.items()}, leaves

    cls: Any = call.cls
    try:
        with torch.enable_grad():
            a1, k1, leaves1 = inputs()
            custom = _grads(cls.apply(*a1, **k1), leaves1, gen_seed=1)
            a2, k2, leaves2 = inputs()
            ctx = torch.autograd.function.FunctionCtx()
            ctx.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in a2)  # type: ignore[attr-defined]
            setup = getattr(cls, "setup_context", None)
            plain = getattr(torch.autograd.function._SingleLevelFunction, "setup_context", None)
            if setup is not None and getattr(setup, "__func__", setup) is not getattr(
                plain, "__func__", plain
            ):
                out2 = cls.forward(*a2, **k2)
            else:
                out2 = cls.forward(ctx, *a2, **k2)
            derived = _grads(out2, leaves2, gen_seed=1)
    except Exception as e:
        return f"its backward could not be checked against its forward ({_first_line(e)})"
    worst = 0.0
    for g1, g2 in zip(custom, derived, strict=True):
        g1 = torch.zeros_like(g2) if g1 is None and g2 is not None else g1
        g2 = torch.zeros_like(g1) if g2 is None and g1 is not None else g2
        if g1 is None or g2 is None:
            continue
        both = torch.isfinite(g1) & torch.isfinite(g2)
        if not torch.equal(torch.isfinite(g1), torch.isfinite(g2)):
            return "its backward and the derivative of its forward differ in where they are finite"
        if not both.any():
            continue
        scale = max(float(g1[both].abs().max()), float(g2[both].abs().max()), 1e-12)
        worst = max(worst, float((g1[both] - g2[both]).abs().max()) / scale)
    if worst > 1e-4:
        return (
            f"its backward differs from the derivative of its forward by up to {worst:.1%} of the largest "
            "gradient on random inputs"
        )
    return None


def _probe_value(s: _TensorSpec, gen: torch.Generator) -> torch.Tensor:
    if s.dtype.is_floating_point:
        dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        return torch.randn(s.shape, generator=gen, dtype=dtype)
    return torch.zeros(s.shape, dtype=s.dtype)


def _grads(out: Any, leaves: list[torch.Tensor], *, gen_seed: int) -> list[torch.Tensor | None]:
    """Gradients of ``out`` (seeded random cotangents) with respect to ``leaves``."""
    from torch.utils._pytree import tree_flatten

    outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.dtype.is_floating_point]
    gen = torch.Generator().manual_seed(gen_seed)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    pairs = [(o, c) for o, c in zip(outs, cotangents, strict=True) if o.requires_grad]
    if not pairs or not leaves:
        return [None for _ in leaves]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
    return list(grads)


@contextlib.contextmanager
def _meta_as_fake_cpu(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Export a meta-device model as if it lived on the CPU, without allocating it.

    Kernels pick output strides by device: on ``meta``, attention returns a layout for which
    ``transpose(1, 2).contiguous()`` is a real copy, on the CPU a layout for which it is a no-op that export
    does not record. The lowering captures the real model on the CPU and must find the same node names, so
    the meta model's tensors are swapped, for the duration of the export, for fake CPU tensors (shapes and
    strides only, no memory) and restored afterwards.
    """
    slots: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    for mod in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(mod, kind).items():
                if isinstance(t, torch.Tensor) and t.device.type == "meta":
                    slots.append((mod, kind, name, t))
    inputs_meta = any(
        isinstance(a, torch.Tensor) and a.device.type == "meta" for a in (*args, *kwargs.values())
    )
    if not slots and not inputs_meta:
        yield args, kwargs
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return t
        f = fakes.get(id(t))
        if f is None:
            with fake_mode:
                f = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
            if isinstance(t, nn.Parameter):
                f = nn.Parameter(f, requires_grad=t.requires_grad)
            fakes[id(t)] = f  # tied weights: one fake for one tensor
        return f

    def fake_input(t: Any) -> Any:
        # Real example inputs next to fake parameters: one fake mode for all of them.
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            return fake_mode.from_tensor(t)
        return fake(t)

    for mod, kind, name, t in slots:
        getattr(mod, kind)[name] = fake(t)
    try:
        yield tuple(fake_input(a) for a in args), {k: fake_input(v) for k, v in kwargs.items()}
    finally:
        for mod, kind, name, t in slots:
            getattr(mod, kind)[name] = t


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's loggers while capturing: a failed trace is reported at WARNING/ERROR level, with
    tracebacks and graph dumps, before the exception reaches us; the TraceError says it in one paragraph."""
    import logging

    # Loggers without a level of their own inherit "torch"'s; torch._logging gives some their own.
    loggers = [logging.getLogger("torch")]
    loggers += [
        lg
        for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("torch.") and isinstance(lg, logging.Logger) and lg.level != logging.NOTSET
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        # torch.export also print()s the partial graph of a failed export to stderr.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first informative line`` of an exception (torch messages run to dozens of lines)."""
    text = str(e).strip()
    # torch errors often start with a blank or boilerplate line; take the first informative one.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(e).__name__}: {first}"


def describe_failure(module: nn.Module, e: BaseException, *, how: str) -> str:
    """One paragraph saying where tracing ``module`` failed: the innermost submodule whose ``forward`` was
    running (FQN and class), the source line, and the error's first line."""
    names = {id(m): n for n, m in module.named_modules()}
    where = ""
    tb: TracebackType | None = e.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    # Walk from the innermost frame outwards: the first frame whose `self` is one of the model's modules
    # names the module; the first frame outside torch/transformers internals names the user's line.
    module_desc = None
    line_desc = None
    for fr in reversed(frames):
        self_obj = fr.f_locals.get("self")
        if module_desc is None and isinstance(self_obj, nn.Module) and id(self_obj) in names:
            fqn = names[id(self_obj)] or "<root>"
            module_desc = f"module {fqn!r} ({type(self_obj).__name__})"
            if line_desc is None:
                line_desc = _frame_line(fr)
        if line_desc is None and not _is_library_frame(fr.f_code.co_filename):
            line_desc = _frame_line(fr)
        if module_desc is not None and line_desc is not None:
            break
    if module_desc is not None:
        where = f" in {module_desc}"
    if line_desc is not None:
        where += f" at {line_desc}"
    return f"{how} could not trace {type(module).__name__}{where}: {_first_line(e)}"


def _is_library_frame(filename: str) -> bool:
    f = filename.replace("\\", "/")
    return "/torch/" in f or "/site-packages/" in f or "/distplan/" in f or f.startswith("<")


def _frame_line(fr: Any) -> str:
    filename = fr.f_code.co_filename
    lineno = fr.f_lineno
    src = linecache.getline(filename, lineno).strip()
    short = "/".join(filename.replace("\\", "/").split("/")[-2:])
    return f"{short}:{lineno}" + (f" `{src}`" if src else "")
