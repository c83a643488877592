"""Capture a module as a ``torch.fx.GraphModule``: ``torch.export`` (non-strict) first, ``symbolic_trace`` as
the fallback.

The lowering re-captures the CPU model with :func:`capture` and finds the plan's cut points by fx node name,
so names depend only on the model's code and configuration: the same at another batch size or width.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    """

    gm: fx.GraphModule
    method: CaptureMethod
    seconds: float
    export_error: str | None = None


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
    tracing failed.
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"can only trace an nn.Module, got {type(module).__name__}")
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    t0 = time.perf_counter()
    export_error: BaseException | None = None
    if method in ("auto", "export"):
        try:
            with _quiet_torch_logs(), _meta_as_fake_cpu(module, args, kwargs) as (xargs, xkwargs):
                ep = torch.export.export(module, xargs, xkwargs, strict=False)
            # check_guards=False: no `_guards_fn` call_module node, so the graph holds only the model's ops.
            gm = ep.module(check_guards=False)
            return Capture(gm=gm, method="export", seconds=time.perf_counter() - t0)  # type: ignore[arg-type]
        except Exception as e:
            export_error = e
            if method == "export":
                raise TraceError(describe_failure(module, e, how="torch.export")) from TorchFailure.of(e)
    try:
        with _quiet_torch_logs():
            gm = fx.symbolic_trace(module)
    except Exception as e:
        if export_error is not None:
            msg = describe_failure(module, export_error, how="torch.export")
            raise TraceError(
                f"{msg}; the torch.fx fallback failed too: {_first_line(e)}"
            ) from TorchFailure.of(export_error)
        raise TraceError(describe_failure(module, e, how="torch.fx")) from TorchFailure.of(e)
    return Capture(
        gm=gm,
        method="fx",
        seconds=time.perf_counter() - t0,
        export_error=None
        if export_error is None
        else describe_failure(module, export_error, how="torch.export"),
    )


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
