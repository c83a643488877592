"""Weights in and out of a lowered plan: pretrained weights read by parameter name (a Hugging Face
safetensors folder or a ``torch.distributed.checkpoint`` folder), and the runner's training state saved and
resumed with ``torch.distributed.checkpoint`` (DCP), under the same plan or another.

[Note: checkpoint formats]
:func:`open_weights` reads

- a Hugging Face folder: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
  (``weight_map``: tensor name -> file), or a single ``*.safetensors`` file (given as the path or alone in
  the folder). Files are opened lazily with ``safetensors.safe_open``: the header gives every name and
  shape, and a rank reads only the tensors it holds.
- a DCP folder (a ``.metadata`` file): the ``model`` part of a :meth:`Runner.save
  <distplan.lowering.runtime.Runner.save>` checkpoint, or a flat model state dict saved with
  ``dcp.save(model.state_dict())``. DCP reads only the requested tensors.

Names are the model's fully qualified names (``state_dict`` keys). A checkpoint may name a tied weight by
any of its names (Hugging Face keeps one of ``lm_head.weight`` / ``transformer.wte.weight``); a checkpoint
of the base model (keys without the ``base_model_prefix`` of a Hugging Face head model, or with it for a
base model) is matched when adding or removing that prefix makes every key match. Every persistent tensor
of the model must be found, every checkpoint tensor must belong to the model and shapes must agree, or
:class:`LoweringError` names the tensors; values are cast to the model's dtype (a bf16 checkpoint into an
fp32 model). Non-persistent buffers (rotary tables, position ids) are not expected in a checkpoint and take
their initial values.

[Note: saving and resuming]
:func:`save` writes, with ``dcp.save`` from every rank, ``{"model": {name: tensor}, "optim": {name:
{state: tensor}}}``: each rank's parameters and persistent buffers by canonical name and the optimizer
state of each parameter (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``; SGD's ``momentum_buffer``), plus
``distplan.json`` (step, plan, optimizer) from rank 0. Replicas and tied copies hold equal tensors under
one name; DCP's planner writes each name once. :func:`load` asks DCP for exactly the tensors this rank
holds under *its* plan, so a checkpoint saved under one plan resumes under another (other stages, other
replica count, other world size): DCP reshards by name. Optimizer hyperparameters (learning rate, betas)
are the resumed run's own; the state tensors are restored.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distplan.errors import LoweringError
from distplan.lowering.init import TensorSlots

if TYPE_CHECKING:
    from distplan.lowering.runtime import Runner

__all__ = ["CheckpointInfo", "WeightsFile", "load", "match_names", "open_weights", "save"]

INFO_FILE = "distplan.json"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# ---------------------------------------------------------------------------------------------- reading
class WeightsFile:
    """Pretrained weights on disk (see [Note: checkpoint formats]): ``shapes`` by tensor name, and
    :meth:`read` for the tensors a rank needs.

    Attributes:
        path: the file or folder; kind: ``safetensors`` or ``dcp``.
        shapes: tensor name -> shape, for every tensor of the model part.
    """

    def __init__(self, path: Path, kind: str, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = path
        self.kind = kind
        self.shapes = shapes

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors on the CPU, reading nothing else."""
        raise NotImplementedError


class _Safetensors(WeightsFile):
    def __init__(self, path: Path, files: list[Path], listed: Mapping[str, Path] | None = None) -> None:
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        self._file_of: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        shapes[name] = tuple(int(d) for d in h.get_slice(name).get_shape())
                        self._file_of[name] = f
            except Exception as e:  # safetensors raises its own SafetensorError (an Exception)
                raise LoweringError(f"cannot read {str(f)!r} as a safetensors file: {e}") from e
        if listed is not None:
            wrong = sorted(n for n, f in listed.items() if self._file_of.get(n) != f)
            if wrong:
                raise LoweringError(
                    f"{_INDEX} in {str(path)!r} places {len(wrong)} tensor(s) in shards that do not hold "
                    f"them: {_some(wrong)}"
                )
        super().__init__(path, "safetensors", shapes)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file_of[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for n in ns:
                    out[n] = h.get_tensor(n)
        return out


class _DCP(WeightsFile):
    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            md = FileSystemReader(str(path)).read_metadata()
        except Exception as e:
            raise LoweringError(f"cannot read the DCP checkpoint {str(path)!r}: {e}") from e
        paths = md.planner_data or {}
        tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        nested = {k: paths[k][1] for k in tensors if len(paths.get(k, ())) == 2 and paths[k][0] == "model"}
        # A runner checkpoint keeps the weights under "model"; a flat state dict has one-level paths.
        self.nested = bool(nested)
        self._key = nested or {k: k for k in tensors if len(paths.get(k, (k,))) == 1}
        self._dtype = {name: tensors[k].properties.dtype for k, name in self._key.items()}
        super().__init__(path, "dcp", {name: tuple(tensors[k].size) for k, name in self._key.items()})

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        want = {n: torch.empty(self.shapes[n], dtype=self._dtype[n]) for n in names}
        _dcp_load({"model": want} if self.nested else want, self.path)
        return want


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    # Collective when a process group exists (every rank calls it, each with its own tensors).
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())


@contextlib.contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """DCP warns that it 'assumes' a single process when none is initialised; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def open_weights(path: str | Path) -> WeightsFile:
    """Open a checkpoint folder or file (see [Note: checkpoint formats]); reads headers only.

    Raises:
        LoweringError: the path does not exist, or holds none of the supported formats (naming what it
            looked for), or a file cannot be read.
    """
    p = Path(path)
    if not p.exists():
        raise LoweringError(f"checkpoint {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise LoweringError(
                f"checkpoint {str(p)!r} is a file but not a .safetensors file; give a safetensors file, a "
                "Hugging Face folder or a torch.distributed.checkpoint folder"
            )
        return _safetensors_source(p)
    if (p / _INDEX).exists():
        _require("safetensors")
        try:
            weight_map = json.loads((p / _INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LoweringError(f"{str(p / _INDEX)!r} has no readable 'weight_map': {e}") from e
        files = {str(n): p / str(f) for n, f in weight_map.items()}
        absent = sorted({f.name for f in files.values() if not f.exists()})
        if absent:
            raise LoweringError(
                f"{_INDEX} in {str(p)!r} names shard(s) that do not exist: {', '.join(absent)}"
            )
        return _Safetensors(p, sorted(set(files.values())), files)
    if (p / _SINGLE).exists():
        return _safetensors_source(p / _SINGLE)
    if (p / ".metadata").exists():
        return _DCP(p)
    single = sorted(p.glob("*.safetensors"))
    if len(single) == 1:
        return _safetensors_source(single[0])
    raise LoweringError(
        f"{str(p)!r} is not a checkpoint folder: it has no {_SINGLE}, no {_INDEX}, no single *.safetensors "
        "file and no torch.distributed.checkpoint .metadata"
    )


def _safetensors_source(f: Path) -> WeightsFile:
    _require("safetensors")
    return _Safetensors(f, [f])


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError as e:
        raise LoweringError(
            f"reading this checkpoint needs the {module} package: pip install {module}"
        ) from e


def match_names(
    slots: Mapping[str, TensorSlots], found: Mapping[str, tuple[int, ...]], *, base_prefix: str | None = None
) -> dict[str, str]:
    """Map each of the model's tensors to its name in a checkpoint (see [Note: checkpoint formats]).

    Args:
        slots: the model's tensors by canonical name (:func:`~distplan.lowering.init.tensor_slots`).
        found: the checkpoint's tensor names and shapes.
        base_prefix: the model's ``base_model_prefix`` (Hugging Face), tried when the names do not match.

    Returns:
        canonical name -> checkpoint name, for every persistent tensor and the non-persistent ones the
        checkpoint happens to hold.

    Raises:
        LoweringError: tensors the checkpoint lacks, tensors it has that the model does not, or shapes that
            differ, each named with the counts.
    """
    owner = {a: s.name for s in slots.values() for a in s.aliases}
    rename = _prefix_rule(set(owner), set(found), base_prefix)
    unexpected: list[str] = []
    chosen: dict[str, str] = {}
    for key in found:
        name = owner.get(rename(key))
        if name is None:
            unexpected.append(key)
        else:
            chosen.setdefault(name, key)
    missing = [n for n, s in slots.items() if s.persistent and n not in chosen]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) of the model are missing from the checkpoint: {_some(missing)}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) of the checkpoint are not in the model: {_some(sorted(unexpected))}"
        )
    wrong = [
        f"{key} {list(found[key])} vs the model's {list(slots[name].shape)}"
        for name, key in chosen.items()
        if tuple(found[key]) != slots[name].shape
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) have another shape in the checkpoint: {_some(wrong)}")
    if problems:
        raise LoweringError("the checkpoint does not fit the model: " + "; ".join(problems))
    return chosen


def _some(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _prefix_rule(model: set[str], found: set[str], prefix: str | None) -> Any:
    """Identity, or adding / removing ``prefix.`` when that makes every checkpoint name a model name."""
    if not prefix or found <= model:
        return lambda k: k
    p = prefix + "."
    if all(p + k in model for k in found):
        return lambda k: p + k
    if all(k.startswith(p) and k[len(p) :] in model for k in found):
        return lambda k: k[len(p) :]
    return lambda k: k


# ---------------------------------------------------------------------------------------------- save / resume
@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What :func:`save` recorded beside the tensors (``distplan.json``).

    Attributes:
        step: the training step the checkpoint was taken after (``None`` when not given).
        plan_id / layout: the plan it was saved under; world_size: its ranks.
        optimizer: the optimizer class; saved_at: Unix time.
    """

    step: int | None
    plan_id: str
    layout: str
    world_size: int
    optimizer: str | None
    saved_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "plan_id": self.plan_id,
            "layout": self.layout,
            "world_size": self.world_size,
            "optimizer": self.optimizer,
            "saved_at": self.saved_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointInfo:
        return cls(
            step=None if d.get("step") is None else int(d["step"]),
            plan_id=str(d.get("plan_id", "")),
            layout=str(d.get("layout", "")),
            world_size=int(d.get("world_size", 0)),
            optimizer=d.get("optimizer"),
            saved_at=float(d.get("saved_at", 0.0)),
        )


def _model_state(runner: Runner) -> dict[str, torch.Tensor]:
    """This rank's parameters and persistent buffers by canonical name (the tensors themselves)."""
    persistent = set(runner.source.module.state_dict(keep_vars=True))
    out: dict[str, torch.Tensor] = dict(runner.stage_parameters())
    out.update({k: b for k, b in runner.stage_buffers().items() if k in persistent})
    return out


def _optimizer_state(runner: Runner, *, create: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter name, its optimizer state tensors; ``create`` makes the state exist first."""
    opt = runner.optimizer
    if opt is None:
        return {}
    params = runner.stage_parameters()
    if create:
        _init_optimizer_state(opt)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in params.items():
        st = {k: v for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
        if st:
            out[name] = st
    return out


def _init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Make a lazily created optimizer state (Adam's moments, SGD's momentum) exist, without changing the
    parameters: one step with zero gradients and learning rate 0 (what torch.distributed.checkpoint's
    ``state_dict`` helpers do); the loaded state overwrites it."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if all(p in opt.state for p in params):
        return
    saved_grads = [p.grad for p in params]
    saved = [dict(g) for g in opt.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"] = 0.0
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
        opt.step()
    finally:
        for g, s in zip(opt.param_groups, saved, strict=True):
            for k in ("lr", "weight_decay"):
                if k in s:
                    g[k] = s[k]
        for p, gr in zip(params, saved_grads, strict=True):
            p.grad = gr


def save(runner: Runner, path: str | Path, *, step: int | None = None) -> None:
    """Save this rank's weights and optimizer state into the DCP folder ``path`` (every rank calls it;
    see [Note: saving and resuming]). ``step``: the number of training steps done, recorded for resuming.

    Raises:
        LoweringError: the folder cannot be created or written.
    """
    import torch.distributed.checkpoint as dcp

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoweringError(f"cannot create checkpoint folder {str(p)!r}: {e.strerror or e}") from e
    state: dict[str, Any] = {"model": _model_state(runner)}
    optim = _optimizer_state(runner, create=False)
    if optim:
        state["optim"] = optim
    try:
        with _single_process_is_meant():
            dcp.save(state, checkpoint_id=str(p), no_dist=not dist.is_initialized())
    except OSError as e:
        raise LoweringError(f"cannot write checkpoint {str(p)!r}: {e.strerror or e}") from e
    if not dist.is_initialized() or dist.get_rank() == 0:
        info = CheckpointInfo(
            step=step,
            plan_id=runner.plan.id,
            layout=runner.plan.layout,
            world_size=runner.plan.world_size,
            optimizer=type(runner.optimizer).__name__ if runner.optimizer is not None else None,
            saved_at=time.time(),
        )
        (p / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()  # every rank returns once the checkpoint is complete


def load(runner: Runner, path: str | Path) -> CheckpointInfo:
    """Load this rank's weights and optimizer state from the DCP folder ``path`` written by :func:`save`,
    under this runner's plan, which may differ from the saving one (see [Note: saving and resuming]).
    Every rank calls it.

    Returns:
        The :class:`CheckpointInfo` saved with it.

    Raises:
        LoweringError: not a checkpoint of :func:`save`; tensors of this rank missing from it (e.g. the
            optimizer state of another optimizer) or of another shape, named.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    p = Path(path)
    if not (p / ".metadata").exists():
        raise LoweringError(
            f"{str(p)!r} is not a checkpoint written by Runner.save (no torch.distributed.checkpoint .metadata)"
        )
    md = FileSystemReader(str(p)).read_metadata()
    have = {
        tuple(md.planner_data.get(k, (k,))): tuple(v.size)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    model = _model_state(runner)
    optim = _optimizer_state(runner, create=bool(runner.optimizer is not None and runner.stage_parameters()))
    want: dict[tuple[str, ...], tuple[int, ...]] = {("model", k): tuple(t.shape) for k, t in model.items()}
    for name, st in optim.items():
        for k, t in st.items():
            want[("optim", name, k)] = tuple(t.shape)
    missing = [".".join(k) for k in want if k not in have]
    wrong = [
        f"{'.'.join(k)} {list(have[k])} vs {list(s)}" for k, s in want.items() if k in have and have[k] != s
    ]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensor(s) of rank {runner.rank_info.rank} are not in it: {_some(missing)}"
            )
        if wrong:
            parts.append(f"{len(wrong)} have another shape: {_some(wrong)}")
        raise LoweringError(f"cannot resume from {str(p)!r}: " + "; ".join(parts))
    state: dict[str, Any] = {"model": model}
    if optim:
        state["optim"] = optim
    with torch.no_grad():
        _dcp_load(state, p)
    info_path = p / INFO_FILE
    if info_path.exists():
        return CheckpointInfo.from_dict(json.loads(info_path.read_text()))
    return CheckpointInfo(step=None, plan_id="", layout="", world_size=0, optimizer=None, saved_at=0.0)
