"""Reproducible initial values for a model built on ``meta``: every tensor gets the same value whatever the
plan, the rank that holds it and the other tensors materialised beside it.

[Note: reproducible initialisation]
A model built on the ``meta`` device has shapes but no values. :func:`initialize` gives the named tensors
(parameters and buffers, by fully qualified name) values on the CPU and leaves the others on ``meta``:

1. Each named tensor that is on ``meta`` is replaced, at every name it has (tied weights are one tensor
   under several names), by an uninitialised CPU tensor of the same shape and dtype.
2. Every module's own initialisation runs over the *whole* module tree, children before parents (the
   order of Hugging Face's ``initialize_weights``): first the module's ``reset_parameters()`` (torch's
   convention; ``_reset_parameters()`` for ``nn.MultiheadAttention``), what its constructor would have
   run on a real device, then ``_init_weights(module)`` of the nearest enclosing module that has one
   (Hugging Face's ``PreTrainedModel`` convention, what ``post_init`` would have run). On ``meta`` tensors
   these ops cost nothing and write nothing.
3. Random draws are made independent of the split: the ``k``-th random op (``normal_``, ``uniform_``,
   ``bernoulli_``, ...) writing tensor ``name`` draws from its own generator seeded with
   ``derive_seed(seed, "tensor", name, k)``, whether or not the other tensors are materialised. Draws into
   temporaries (``orthogonal_`` draws a matrix and copies its QR factor) use the global generator, seeded
   per module with ``derive_seed(seed, "module", fqn)``; they are split-independent too unless a plan
   cuts between the tensors of one such module.
4. A tensor that no initialisation writes (a counter buffer, a causal-mask buffer, a scale made with
   ``torch.ones`` in the constructor) keeps the value its constructor gives it: replayed by
   :func:`replay_constructor` (the model built again from its spec with its small tensors on the CPU)
   when the model can be rebuilt, else read from the model when it was built with values; so a model
   built with values (the validation's reference) and one built on ``meta`` (a rank) agree. Without
   either, :class:`LoweringError` names the tensors.

The values are drawn on the CPU, so a GPU rank, a CPU rank and the single-device reference of the
validation get the same numbers. The last write wins: a tied weight is initialised by each module that
holds it, in the order above (for Hugging Face GPT-2 both inits of the shared embedding draw from the
same distribution). The values differ from those of an eager CPU build (one global random stream drawn in
construction order), which depends on everything built before a tensor and so cannot be reproduced per
rank.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from distplan.errors import LoweringError

__all__ = [
    "SmallOnCPU",
    "TensorSlots",
    "derive_seed",
    "initialize",
    "install",
    "replay_constructor",
    "tensor_slots",
]

# Random in-place aten ops that take a generator: the ones torch.nn.init and model inits use to draw values.
_RANDOM_OPS = {
    torch.ops.aten.normal_,
    torch.ops.aten.uniform_,
    torch.ops.aten.bernoulli_,
    torch.ops.aten.random_,
    torch.ops.aten.exponential_,
    torch.ops.aten.geometric_,
    torch.ops.aten.cauchy_,
    torch.ops.aten.log_normal_,
}


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts`` (BLAKE2b of their text): the same inputs give the same seed
    on every machine and Python version (``hash()`` of a string is salted per process)."""
    text = "\x1f".join([str(int(seed)), *map(str, parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True, slots=True)
class TensorSlots:
    """Where one tensor of a module lives.

    Attributes:
        name: its canonical fully qualified name (the first of its names in ``named_parameters`` /
            ``named_buffers`` order, as ``state_dict`` would keep it).
        aliases: every name it has (itself first); tied weights have several.
        is_param: a parameter (else a buffer); persistent: whether ``state_dict`` holds it.
        shape / dtype: as built.
    """

    name: str
    aliases: tuple[str, ...]
    is_param: bool
    persistent: bool
    shape: tuple[int, ...]
    dtype: torch.dtype


def tensor_slots(module: nn.Module) -> dict[str, TensorSlots]:
    """Every parameter and buffer of ``module`` by canonical name (see :class:`TensorSlots`)."""
    by_id: dict[int, list[str]] = {}
    first: dict[int, tuple[torch.Tensor, bool]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        first.setdefault(id(p), (p, True))
    for name, b in module.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
        first.setdefault(id(b), (b, False))
    persistent = set(module.state_dict(keep_vars=True))
    out: dict[str, TensorSlots] = {}
    for key, names in by_id.items():
        t, is_param = first[key]
        out[names[0]] = TensorSlots(
            name=names[0],
            aliases=tuple(names),
            is_param=is_param,
            persistent=any(n in persistent for n in names),
            shape=tuple(int(d) for d in t.shape),
            dtype=t.dtype,
        )
    return out


def install(module: nn.Module, names: Iterable[str], tensor: torch.Tensor) -> None:
    """Put ``tensor`` at each of ``names`` (dotted paths) of ``module``, as a parameter where the slot holds a
    parameter and as a buffer where it holds a buffer (one object at every name keeps weights tied)."""
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor  # type: ignore[assignment]
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            setattr(owner, leaf, tensor)


class _InitStreams(TorchDispatchMode):
    """Gives each tracked tensor its own random stream and records which tracked tensors get written
    (see [Note: reproducible initialisation], step 3)."""

    def __init__(self, seed: int, names: dict[int, str]) -> None:
        super().__init__()
        self.seed = seed
        self.names = names
        self.draws: Counter[str] = Counter()
        self.written: set[str] = set()

    def _name(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        name = self.names.get(id(t))
        if name is None and t._base is not None:
            name = self.names.get(id(t._base))
        return name

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        target = None
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = args[i] if i < len(args) else kwargs.get(a.name)
                name = self._name(v)
                if name is not None:
                    self.written.add(name)
                    target = (name, v)
        if target is not None and func.overloadpacket in _RANDOM_OPS:
            name, v = target
            k = self.draws[name]
            self.draws[name] += 1
            if v.device.type == "cpu":
                kwargs["generator"] = torch.Generator().manual_seed(derive_seed(self.seed, "tensor", name, k))
        return func(*args, **kwargs)


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


def _inits(root: nn.Module) -> Iterator[tuple[str, list[Callable[[], Any]]]]:
    """Each module (children before parents) with the init calls that apply to it (step 2 of the note)."""
    # The nearest enclosing module with `_init_weights`, per module path (Hugging Face's smart_apply).
    owners: dict[str, nn.Module | None] = {}
    for fqn, m in root.named_modules(remove_duplicate=False):
        parent = owners.get(fqn.rpartition(".")[0]) if fqn else None
        owners[fqn] = m if callable(getattr(m, "_init_weights", None)) else parent
    seen: set[int] = set()
    for fqn, m in _post_order(root):
        if id(m) in seen:
            continue
        seen.add(id(m))
        calls: list[Callable[[], Any]] = []
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if callable(reset):
            calls.append(reset)
        owner = owners.get(fqn)
        if owner is not None:
            calls.append(functools.partial(getattr(owner, "_init_weights"), m))  # noqa: B009 - typed, unlike nn.Module.__getattr__
        if calls:
            yield fqn, calls


def initialize(
    module: nn.Module,
    names: Iterable[str] | None = None,
    *,
    seed: int = 0,
    replay: Callable[[dict[str, TensorSlots]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Give the tensors ``names`` (canonical names, see :func:`tensor_slots`; ``None``: all) their
    reproducible initial values on the CPU, in ``module``, and return them by name
    (see [Note: reproducible initialisation]).

    Tensors not named stay as they are (on ``meta``, they cost nothing). ``replay`` gives the constructor's
    values of the named tensors that no initialisation writes (:func:`replay_constructor`); the module's
    own values stand in for what it does not give.

    Raises:
        LoweringError: a name the module does not have; tensors no initialisation writes whose constructor
            value is unknown (named, with the remedies).
    """
    slots = tensor_slots(module)
    wanted = list(slots) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in slots]
    if unknown:
        raise LoweringError(
            f"{len(unknown)} tensor(s) to initialise are not in the model: {', '.join(unknown[:5])}"
        )
    current = {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }
    built: dict[str, torch.Tensor] = {}  # constructor values the module already holds
    fresh: dict[str, torch.Tensor] = {}
    for name in wanted:
        s = slots[name]
        old = current[name]
        if old.device.type != "meta":
            built[name] = old.detach().to("cpu", copy=True)
        t = torch.empty(s.shape, dtype=s.dtype, device="cpu")
        new: torch.Tensor = nn.Parameter(t, requires_grad=old.requires_grad) if s.is_param else t
        install(module, s.aliases, new)
        fresh[name] = new
    streams = _InitStreams(seed, {id(t): n for n, t in fresh.items()})
    with torch.no_grad(), streams:
        for fqn, calls in _inits(module):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "module", fqn))
                for call in calls:
                    call()
    uncovered = [n for n in wanted if n not in streams.written]
    replayed: dict[str, torch.Tensor] = {}
    if uncovered and replay is not None:
        # Replayed first, so a module built with values and one built on meta agree (step 4 of the note).
        replayed = replay({n: slots[n] for n in uncovered})
    still = [n for n in uncovered if n not in replayed and n not in built]
    if still:
        owners = sorted({type(module.get_submodule(n.rpartition(".")[0])).__name__ for n in still})
        raise LoweringError(
            f"no initialisation writes {len(still)} tensor(s) and their constructor values are unknown on "
            f"'meta': {', '.join(still[:6])}{' ...' if len(still) > 6 else ''} (in {', '.join(owners)}). "
            "Give the module a reset_parameters() that sets them, build the model from a spec (its "
            "constructor is then replayed for them), pass a module built with values, or load them from "
            "a checkpoint"
        )
    with torch.no_grad():
        for n in uncovered:
            fresh[n].copy_(replayed[n] if n in replayed else built[n])
    return fresh


# ---------------------------------------------------------------------------------------------- replay
class SmallOnCPU(TorchFunctionMode):
    """Within it, tensor factories (``torch.empty``, ``zeros``, ``ones``, ``arange``, ``tensor``, ``randn``,
    ...) that would allocate on ``meta`` allocate on the CPU when the result is at most ``limit`` bytes, while
    the total stays within ``budget``, and such a tensor moved ``.to("meta")`` stays where it is: a model
    (or example call) built on ``meta`` in it gets the values of its small constructor-made tensors (see
    :func:`replay_constructor`)."""

    def __init__(self, limit: int, budget: int) -> None:
        super().__init__()
        from torch.utils._device import _device_constructors

        self.factories = _device_constructors()
        self.limit = limit
        self.left = budget

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            getattr(func, "__name__", None) == "to"
            and isinstance(out, torch.Tensor)
            and out.device.type == "meta"
            and args[0].device.type == "cpu"
            and args[0].numel() * args[0].element_size() <= self.limit
        ):
            return args[0]  # a small tensor made on the CPU here stays there (`x.to(device)` after a build)
        if func in self.factories and isinstance(out, torch.Tensor) and out.device.type == "meta":
            size = out.numel() * out.element_size()
            if size <= min(self.limit, self.left):
                self.left -= size
                return func(*args, **{**kwargs, "device": "cpu"})
        return out


def replay_constructor(
    build: Callable[[], nn.Module], wanted: dict[str, TensorSlots], *, budget: int = 1 << 30
) -> dict[str, torch.Tensor]:
    """The values the model's constructor gives the ``wanted`` tensors, without building the model.

    ``build()`` builds the model on ``meta`` (``with torch.device("meta")``, as the tracer does) again, with
    every tensor factory of at most the largest wanted tensor's size allocated on the CPU instead (at most
    ``budget`` bytes in all): small tensors made by the constructor (``torch.zeros``, ``torch.ones``,
    ``torch.arange``, ``torch.tril`` of them, ...) get their values, large ones stay on ``meta``. Returns the
    wanted tensors that came out with values (by canonical name); the ones that did not (too large, or
    computed from a large tensor) are left out. A constructor that fails this way (it mixes a small and a
    large tensor) gives nothing.
    """
    if not wanted:
        return {}
    limit = max(int(torch.Size(s.shape).numel()) * s.dtype.itemsize for s in wanted.values())
    try:
        with SmallOnCPU(limit, budget):
            model = build()
    except Exception:  # the replay is best effort: what it cannot give is reported by the caller
        return {}
    have = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    out: dict[str, torch.Tensor] = {}
    for name, s in wanted.items():
        for alias in s.aliases:
            t = have.get(alias)
            if t is not None and t.device.type == "cpu" and tuple(t.shape) == s.shape:
                out[name] = t.detach().to(s.dtype)
                break
    return out
