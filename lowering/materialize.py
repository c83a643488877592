"""Give this rank's stage tensors values on its device, and nothing else.

[Note: materialisation]
:func:`~distplan.lowering.runtime.lower` captures and splits the model on ``meta`` (a spec string is built
there; a module the user built with values is captured without copying them). Each rank then calls
:func:`materialize` for the stages it runs: every parameter and buffer those stage modules hold is named
by its canonical name in the model (:func:`~distplan.lowering.init.tensor_slots`) and given a value from,
in order,

1. ``checkpoint`` (a safetensors or DCP folder, [Note: checkpoint formats]) or ``state_dict``: the
   persistent tensors, read for this rank only, names and shapes checked against the whole model;
2. the module itself, where it holds a value (``init="auto"`` or ``"module"``);
3. the reproducible initialisation ([Note: reproducible initialisation]) for the rest (``init="auto"``
   or ``"reproducible"``; with ``"reproducible"`` also for tensors the module holds values for).

The value is moved to the rank's device and put, as one object, both in the stage modules (at each of
their names for it) and in ``source.module`` (at each of the model's names): tied weights stay tied within
a rank, :meth:`Runner.stage_parameters` finds the model's names by identity, and ``source.module`` ends up
holding this rank's tensors and ``meta`` everywhere else. Host memory peaks at this rank's tensors (drawn
on the CPU, then moved); no rank ever holds the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distplan.errors import LoweringError
from distplan.lowering.checkpoint import match_names, open_weights
from distplan.lowering.init import initialize, install, replay_constructor, tensor_slots

__all__ = ["INIT_MODES", "Materialized", "materialize"]

INIT_MODES = ("auto", "reproducible", "module")


@dataclass(frozen=True, slots=True)
class Materialized:
    """Where this rank's tensors came from (canonical names), and their size.

    Attributes:
        loaded: from the checkpoint or ``state_dict``; from_module: the module's own values;
        initialized: the reproducible initialisation.
        param_bytes / buffer_bytes: bytes of this rank's parameters and buffers (each tensor once).
    """

    loaded: tuple[str, ...] = ()
    from_module: tuple[str, ...] = ()
    initialized: tuple[str, ...] = ()
    param_bytes: int = 0
    buffer_bytes: int = 0
    origin: dict[str, str] = field(default_factory=dict)


def _is_real(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return t.device.type != "meta" and not isinstance(t, FakeTensor)


def materialize(
    module: nn.Module,
    stages: Sequence[nn.Module],
    *,
    device: torch.device,
    seed: int = 0,
    init: str = "auto",
    checkpoint: str | Path | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    rebuild: Any = None,
) -> Materialized:
    """Give the tensors of ``stages`` values on ``device`` (see [Note: materialisation]).

    Args:
        module: the whole model (``source.module``), on ``meta`` or with values; the stages' tensor names
            are its names (the capture keeps them).
        stages: this rank's stage modules.
        device: where the rank computes.
        seed: the seed of the reproducible initialisation.
        init: ``"auto"``, ``"reproducible"`` or ``"module"`` (see the note).
        checkpoint / state_dict: pretrained weights (at most one).
        rebuild: ``() -> nn.Module`` building the model on ``meta`` again, to replay the constructor of
            tensors no initialisation writes (:func:`~distplan.lowering.init.replay_constructor`).

    Raises:
        LoweringError: an unknown ``init``, both a checkpoint and a state dict, a checkpoint that does not
            fit the model (names, shapes), ``init="module"`` on a model without values, tensors no
            initialisation covers, or a stage tensor that is not the model's and has no value.
    """
    if init not in INIT_MODES:
        raise LoweringError(f"init must be one of {', '.join(INIT_MODES)}; got {init!r}")
    if checkpoint is not None and state_dict is not None:
        raise LoweringError("give pretrained weights as checkpoint= or state_dict=, not both")
    slots = tensor_slots(module)
    owner = {a: s.name for s in slots.values() for a in s.aliases}
    # canonical name -> [(stage module, its name for the tensor)]
    places: dict[str, list[tuple[nn.Module, str]]] = {}
    for st in stages:
        named = [*st.named_parameters(remove_duplicate=False), *st.named_buffers(remove_duplicate=False)]
        for path, t in named:
            name = owner.get(path)
            if name is None:
                if not _is_real(t):
                    raise LoweringError(
                        f"stage tensor {path!r} is not a parameter or buffer of the model and has no value"
                    )
                install(st, [path], t.to(device))
                continue
            places.setdefault(name, []).append((st, path))
    needed = list(places)

    current = {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }
    values: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    if checkpoint is not None or state_dict is not None:
        values.update(_pretrained(module, slots, needed, checkpoint, state_dict))
        origin.update(dict.fromkeys(values, "checkpoint"))
    rest = [n for n in needed if n not in values]
    if init == "module":
        meta = [n for n in rest if not _is_real(current[n])]
        if meta:
            raise LoweringError(
                f"init='module' takes the module's own values, but {len(meta)} tensor(s) have none (built on "
                f"meta): {', '.join(meta[:5])}; use init='reproducible' or load a checkpoint"
            )
    keep = [n for n in rest if init != "reproducible" and _is_real(current[n])]
    for n in keep:
        values[n] = current[n]
        origin[n] = "module"
    draw = [n for n in rest if n not in values]
    if draw:

        def replay(wanted: Any) -> dict[str, torch.Tensor]:
            return replay_constructor(rebuild, wanted) if rebuild is not None else {}

        values.update(initialize(module, draw, seed=seed, replay=replay))
        origin.update(dict.fromkeys(draw, "init"))
        current = {
            **dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False)),
        }

    pbytes = bbytes = 0
    for name in needed:
        s = slots[name]
        v = values.pop(name)
        old = current[name]
        if v is old and v.device == device:
            obj = v  # the module's own tensor, already in place: keep it (and what refers to it)
        else:
            data = v.detach().to(device=device, dtype=s.dtype)
            requires_grad = old.requires_grad if isinstance(old, nn.Parameter) else True
            obj = nn.Parameter(data, requires_grad=requires_grad) if s.is_param else data
            install(module, s.aliases, obj)
        for st, path in places[name]:
            install(st, [path], obj)
        size = obj.numel() * obj.element_size()
        if s.is_param:
            pbytes += size
        else:
            bbytes += size
    return Materialized(
        loaded=tuple(n for n in needed if origin[n] == "checkpoint"),
        from_module=tuple(n for n in needed if origin[n] == "module"),
        initialized=tuple(n for n in needed if origin[n] == "init"),
        param_bytes=pbytes,
        buffer_bytes=bbytes,
        origin=origin,
    )


def _pretrained(
    module: nn.Module,
    slots: Any,
    needed: list[str],
    checkpoint: str | Path | None,
    state_dict: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """This rank's tensors from the checkpoint or state dict (names and shapes checked for the whole model),
    cast to the model's dtypes."""
    prefix = getattr(module, "base_model_prefix", None)
    prefix = prefix if isinstance(prefix, str) else None
    if checkpoint is not None:
        wf = open_weights(checkpoint)
        chosen = match_names(slots, wf.shapes, base_prefix=prefix)
        mine = {n: chosen[n] for n in needed if n in chosen}
        got = wf.read(mine.values())
        raw = {n: got[k] for n, k in mine.items()}
    else:
        assert state_dict is not None
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in state_dict.items()}
        chosen = match_names(slots, shapes, base_prefix=prefix)
        raw = {n: state_dict[chosen[n]] for n in needed if n in chosen}
    return {n: t.to(slots[n].dtype) for n, t in raw.items()}
