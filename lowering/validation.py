"""Check that a lowered plan computes what the single-device model computes.

:func:`validate` starts one CPU process per rank (gloo), runs ``steps`` training steps through
:func:`~distplan.lowering.runtime.lower` on seeded batches, and compares loss, every parameter's gradient
(by original FQN, every replica's copy), the parameters after each optimizer step and every buffer after
each step with the same steps run on one process from the same initial weights.

[Note: validation policy]
- *Width*: each rank builds the whole model, so a model over ``max_param_bytes`` (default 64 MiB) or a plan
  over ``max_full_width_ranks`` ranks (default 8) is validated on ``bundle.width_reduced()``: the same
  layers, graph structure, node names and therefore cut positions, with hidden sizes of about 64. The
  structure hash is checked on the reduced model too. The report says ``width_reduced: true``.
- *Ranks*: a plan with more than ``max_ranks`` ranks (default 8) keeps its stages, cuts, schedule and
  microbatches but is validated with one replica per stage (``dp`` reduced to 1): data-parallel replicas run
  the same program on other samples, and their gradient averaging is checked by every plan with ``dp > 1``
  that fits. If the stages alone exceed ``max_ranks``, that is a clear error.
- *Microbatch size*: the rows of one chunk (the batch every stage program runs at; see [Note: chunks] in
  ``distplan.lowering.parallel``) capped at ``max_microbatch_size`` (default 2) samples; the cut positions,
  the degrees and the schedule do not depend on it.
- *Sequence length*: ``seq`` (default 16); the graph's structure does not depend on it.
- *Optimizer*: SGD by default, whose update is linear in the gradient, so parameter errors measure the
  split and not Adam's ``g / sqrt(v)`` amplification of rounding noise in near-zero gradients.
- *Errors*: per tensor, ``max_abs = max |a - b|`` and ``max_rel = max_abs / max(max |b|, 1e-3 * S)``:
  relative to the tensor's largest reference entry, so tiny entries do not dominate, and never to less
  than a thousandth of ``S``, the largest reference entry of that kind (gradients or parameters) in the
  step, so a gradient that is zero in exact arithmetic (the key bias of softmax attention) and 1e-12 in
  floating point does not count as a 100% error. A tensor passes when ``max_rel`` is within its tolerance
  (loss 1e-5, gradients 1e-4, parameters 1e-4).
  Buffers (running statistics, counters) are compared like parameters (tolerance ``buffer``, 1e-4).
- *Random ops* (dropout, SDPA's ``dropout_p``, ``bernoulli``, ``rand*``, ...) are found in the captured
  graph and, when there are any, both runs draw identical batch-independent values (``PinnedRandom``, see
  [Note: random ops] in ``distplan.lowering.effects``); the report lists them (``random_ops``) and says so in
  a note. Training with the plan still draws them at random.
- *Batch statistics and state*. Pass/fail rule: the run passes when loss, gradients, updated parameters and
  buffers are within tolerance of the *reference*. The reference is the single-device model on the whole
  global batch, unless the forward computes statistics over the batch (a batch-norm op in training mode)
  or writes buffers (running statistics, ``num_batches_tracked``, counters): a pipeline then runs those
  layers once per microbatch on the microbatch's samples, and the reference is the single-device model run
  on the same microbatches in the same order, one data-parallel replica after the other (each replica from
  the same starting buffers, as every replica starts from replica 0's), with gradients accumulated: what
  gradient accumulation on one device computes. The report then names the batch-statistics layers
  (``batch_stat_layers``) and the written buffers, says ``reference: "microbatched"``, and gives in a note
  how far the whole-batch single-device loss is from it -- the effect of microbatching on the model,
  reported and not judged. Replicas do not average buffers (as DDP with ``broadcast_buffers=False``), so
  each replica's buffers are compared with its own reference. Every stage program runs one chunk of a
  microbatch at a time ([Note: chunks] in ``distplan.lowering.parallel``), so the reference runs the
  plan's chunks, each replica the chunks it owns in the runtime's order; stages of different ``dp`` cut the
  chunks into replicas differently, so there is one reference per ``dp`` for the buffers, and a buffer is
  compared on the stage that first reads it (a later stage's copy only receives export's write-back of
  the value, from replicas cut another way).
- *Initial weights*: the reference and every rank start from the reproducible initialisation of [Note:
  reproducible initialisation] (``distplan.lowering.init``) drawn from ``seed``: each rank builds the model
  on ``meta`` (or the width-reduced copy) and draws only its own tensors, which equal the reference's by
  name whatever the plan. Nothing is shipped from the parent but the batches.
- *Model state*: setting up the run (batches, capture, the recorded forward) never changes the model's
  buffers.
- *Failures*: a rank that raises, dies or exceeds ``timeout_s`` fails the run at once with that rank's error;
  every other rank is killed. Collectives carry the same timeout, so nothing waits on a dead peer for long.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from distplan.errors import LoweringError, ModelSpecError
from distplan.lowering._model import (
    Batch,
    ModelSource,
    capture_model,
    check_node_names,
    check_plan_graph,
    resolve_source,
)
from distplan.lowering.batching import input_flags, take_samples
from distplan.lowering.effects import PinnedRandom, preserved_state, scan_forward
from distplan.lowering.init import initialize, replay_constructor
from distplan.lowering.outputs import graph_output
from distplan.lowering.parallel import ParallelLayout, layout_of
from distplan.lowering.runtime import plan_layout
from distplan.plan import Plan, build_rank_map
from distplan.ranks import kill_ranks, spawn_ranks

__all__ = ["TensorCheck", "Tolerance", "ValidationReport", "validate"]

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Relative tolerances (see [Note: validation policy])."""

    loss: float = 1e-5
    grad: float = 1e-4
    param: float = 1e-4
    buffer: float = 1e-4

    def __post_init__(self) -> None:
        for f in ("loss", "grad", "param", "buffer"):
            if not getattr(self, f) > 0:
                raise ValueError(f"tolerance.{f} must be > 0, got {getattr(self, f)}")

    def of(self, kind: str) -> float:
        return float(getattr(self, kind))

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "grad": self.grad, "param": self.param, "buffer": self.buffer}


@dataclass(frozen=True, slots=True)
class TensorCheck:
    """The comparison of one tensor (over all steps and every rank holding a copy).

    Attributes:
        kind: ``loss``, ``grad``, ``param`` (after the optimizer step) or ``buffer`` (after the step).
        name: the parameter's or buffer's FQN in the original model (``loss`` for the loss).
        max_abs / max_rel: the largest errors (see [Note: validation policy]).
        passed: ``max_rel <= tolerance``.
        copies: how many rank copies were compared.
    """

    kind: str
    name: str
    max_abs: float
    max_rel: float
    passed: bool
    copies: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "passed": self.passed,
            "copies": self.copies,
        }


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """The result of :func:`validate` (``to_dict`` is the ``distplan validate --json`` contract).

    Attributes:
        passed: every tensor within tolerance and every rank finished.
        ranks: processes run; steps: training steps compared.
        max_abs_error / max_rel_error: over loss, gradients and updated parameters.
        tolerance: the relative tolerances applied.
        width_reduced: the model was validated at reduced width (see [Note: validation policy]).
        seconds: wall time.
        error: on failure, what failed: the rank, its stage and the cause, or the worst tensor.
        failed_rank: the rank whose failure stopped the run, if one did.
        losses / reference_losses: the loss per step, distributed and single-device.
        tensors: per-tensor comparisons, worst first.
        notes: what was reduced or assumed.
        layout: the validated plan's layout (after any dp reduction); plan_id: the original plan's id.
        reference: ``global-batch`` (the single-device model on the whole batch) or ``microbatched`` (on the
            plan's microbatches with gradient accumulation; see [Note: validation policy]).
        random_ops: the random ops found in the graph, ``module (op, node)``; both runs drew identical
            values for them.
        batch_stat_layers: modules whose statistics are computed over the batch (``fqn (Class)``).
        written_buffers: buffers the forward writes.
        output: the output the loss read (``None``: the model returns one tensor).
        stages: per stage, what the lowering applied on its first rank (``dp``, ``tp``, ``tp_regions`` split,
            ``recompute`` and ``recomputed_regions``, ``shard`` and whether FSDP2 ``fsdp`` shards it).
    """

    passed: bool
    ranks: int
    steps: int
    max_abs_error: float
    max_rel_error: float
    tolerance: Tolerance
    width_reduced: bool
    seconds: float
    error: str | None = None
    failed_rank: int | None = None
    losses: tuple[float, ...] = ()
    reference_losses: tuple[float, ...] = ()
    tensors: tuple[TensorCheck, ...] = ()
    notes: tuple[str, ...] = ()
    layout: str = ""
    plan_id: str = ""
    model: str = ""
    seq: int = 0
    dp_reduced: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    logs: dict[int, str] = field(default_factory=dict)
    reference: str = "global-batch"
    random_ops: tuple[str, ...] = ()
    batch_stat_layers: tuple[str, ...] = ()
    written_buffers: tuple[str, ...] = ()
    output: str | None = None
    stages: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "ranks": self.ranks,
            "steps": self.steps,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance.to_dict(),
            "width_reduced": self.width_reduced,
            "dp_reduced": self.dp_reduced,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "failed_rank": self.failed_rank,
            "losses": list(self.losses),
            "reference_losses": list(self.reference_losses),
            "layout": self.layout,
            "plan_id": self.plan_id,
            "model": self.model,
            "seq": self.seq,
            "notes": list(self.notes),
            "reference": self.reference,
            "random_ops": list(self.random_ops),
            "batch_stat_layers": list(self.batch_stat_layers),
            "written_buffers": list(self.written_buffers),
            "output": self.output,
            "stages": [dict(x) for x in self.stages],
            "tensors": [t.to_dict() for t in self.tensors],
        }

    def summary(self) -> str:
        """One paragraph for humans."""
        head = "PASSED" if self.passed else "FAILED"
        text = (
            f"{head}: {self.ranks} ranks, {self.steps} step(s), max abs error {self.max_abs_error:.3g}, "
            f"max rel error {self.max_rel_error:.3g} (tolerance loss {self.tolerance.loss:g}, grad "
            f"{self.tolerance.grad:g}, param {self.tolerance.param:g}, buffer {self.tolerance.buffer:g}), "
            f"{self.seconds:.1f} s"
        )
        if self.width_reduced:
            text += ", width-reduced model"
        if self.error:
            text += f"\n  error: {self.error}"
        for n in self.notes:
            text += f"\n  note: {n}"
        return text


def single_replica(plan: Plan) -> Plan:
    """The plan with the same stages, cuts, tensor-parallel degrees, schedule and microbatches but one
    replica per stage (each stage keeps its first replica's devices; one replica computes every row of a
    microbatch, so the microbatch and the global batch stay)."""
    if all(s.dp == 1 for s in plan.stages):
        return plan
    stages = tuple(replace(s, devices=s.devices[: s.tp], dp=1) for s in plan.stages)
    rank_map = build_rank_map(plan.request.cluster, [s.devices for s in stages], tp=[s.tp for s in stages])
    return replace(plan, stages=stages, rank_map=rank_map)


def with_chunk_rows(plan: Plan, rows: int) -> Plan:
    """The plan with ``rows`` samples per chunk of a microbatch (see [Note: chunks] in
    ``distplan.lowering.parallel``): the microbatch and the global batch follow, degrees stay."""
    lay = layout_of(plan)
    if rows == lay.chunk_rows:
        return plan
    b = rows * lay.chunks
    return replace(
        plan, microbatch_size=b, request=replace(plan.request, global_batch=plan.num_microbatches * b)
    )


def with_microbatch_size(plan: Plan, size: int) -> Plan:
    """The plan with ``size`` samples per chunk (kept for callers; see :func:`with_chunk_rows`)."""
    return with_chunk_rows(plan, size)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def validate(
    plan: Plan,
    model: Any,
    *,
    steps: int = 1,
    tolerance: Tolerance | float | None = None,
    timeout_s: float = 120.0,
    setup_timeout_s: float = 600.0,
    width_reduce: bool | None = None,
    progress: Progress | None = None,
    seq: int = 16,
    optimizer: str = "sgd",
    lr: float = 0.1,
    seed: int = 0,
    max_ranks: int = 8,
    max_full_width_ranks: int = 8,
    max_param_bytes: int = 64 * 2**20,
    max_microbatch_size: int = 2,
    max_hidden: int = 64,
    inject_fault: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    output: str | None = None,
) -> ValidationReport:
    """Run ``plan`` on ``plan.world_size`` CPU processes and compare with one device.

    Args:
        plan: the plan to check.
        model: a model spec string (as for ``distplan trace``) or a tracer ``ModelBundle`` built from one
            (the rank processes rebuild the model from its spec and load the parent's weights).
        steps: training steps (forward, backward, optimizer step) to compare.
        tolerance: relative tolerances, or one number for all three.
        timeout_s: limit of the ranks' training steps, counted from the moment every rank has set up (built,
            captured and materialised its stages); a rank that hangs fails the run then, named. Counting
            from set-up's end keeps the diagnosis the same on a loaded machine, where set-up takes longer.
        setup_timeout_s: limit of the ranks' set-up (from their start); a rank still setting up then fails
            the run, named. The collectives' own timeout is the sum of both limits (the parent's diagnosis
            comes first).
        width_reduce: force (``True``) or forbid (``False``) width reduction; ``None`` decides by size.
        progress: called with short progress messages.
        seq, optimizer, lr, seed: sequence length, optimizer (``sgd``/``adam``/``adamw``), learning rate,
            and seed of weights and batches.
        max_ranks, max_full_width_ranks, max_param_bytes, max_microbatch_size, max_hidden: the policy of
            [Note: validation policy].
        config_overrides: config fields replaced when building the model (as for ``resolve_model``).
        output: which output the loss reads when the model returns a dict, tuple, dataclass or
            ``ModelOutput`` (see [Note: output selector] in ``distplan.lowering.outputs``).
        inject_fault: testing aid, ``"kill:R"``, ``"hang:R"`` or ``"raise:R"`` makes rank ``R`` die, hang or
            raise in the middle of the first step.

    Returns:
        A :class:`ValidationReport`; ``passed`` is ``False`` on numeric mismatch or rank failure.

    Raises:
        PlanError: the plan does not belong to the model (structure hash) or is malformed.
        ModelSpecError: the model cannot be built. LoweringError: the plan cannot be lowered or run here,
            the output selector selects no tensor, a keyword input's batch dimension cannot be told, or a
            random op cannot be given a fixed value.
    """
    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    if steps < 1:
        raise LoweringError(f"steps must be >= 1, got {steps}")
    if timeout_s <= 0:
        raise LoweringError(f"timeout_s must be > 0, got {timeout_s}")
    if setup_timeout_s <= 0:
        raise LoweringError(f"setup_timeout_s must be > 0, got {setup_timeout_s}")
    tol = (
        Tolerance(tolerance, tolerance, tolerance, tolerance)
        if isinstance(tolerance, (int, float))
        else (tolerance or Tolerance())
    )
    fault = _parse_fault(inject_fault)
    plan_layout(plan)  # unsupported layouts fail here, before anything starts
    notes: list[str] = []

    # ---- the plan as it will run here
    run_plan = plan
    dp_reduced = False
    if plan.world_size > max_ranks:
        run_plan = single_replica(plan)
        dp_reduced = True
        if run_plan.world_size > max_ranks:
            tps = "/".join(str(s.tp) for s in plan.stages)
            raise LoweringError(
                f"the plan needs {run_plan.world_size} ranks even with one replica per stage "
                f"({plan.num_stages} stages x tp {tps}); validation runs at most {max_ranks} processes on this "
                f"machine ({run_plan.world_size - max_ranks} too many). Raise max_ranks (--max-ranks) if the "
                "machine can hold them"
            )
        dps = (
            "/".join(str(s.dp) for s in plan.stages) if len({s.dp for s in plan.stages}) > 1 else str(plan.dp)
        )
        notes.append(
            f"dp reduced from {dps} to 1: the plan's {plan.world_size} ranks exceed {max_ranks}; the "
            f"{plan.num_stages} stages, their cuts, the schedule and the {plan.num_microbatches} microbatches are unchanged"
        )
    if layout_of(run_plan).chunk_rows > max_microbatch_size:
        lay0 = layout_of(run_plan)
        notes.append(
            f"microbatch reduced from {lay0.microbatch} to {max_microbatch_size * lay0.chunks} samples "
            f"({lay0.chunks} chunk(s) of {max_microbatch_size} instead of {lay0.chunk_rows})"
        )
        run_plan = with_chunk_rows(run_plan, max_microbatch_size)
    run_layout = layout_of(run_plan)
    mb = run_layout.chunk_rows  # every stage program runs at one chunk
    if optimizer != plan.request.optimizer:
        notes.append(
            f"optimizer {optimizer} (lr {lr:g}) instead of the plan's {plan.request.optimizer}: an update linear in "
            "the gradient measures the split, not the optimizer's amplification of rounding noise"
        )

    # ---- the model (before anything is spawned: bad specs and foreign plans fail here)
    spec = model if isinstance(model, str) else getattr(model, "spec", None)
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(
            "validate() needs a model spec string (built-in name, config.json path or package.module:function), "
            "or a ModelBundle made from one: the rank processes rebuild the model from it"
        )
    from distplan.tracer import resolve_model

    say(f"building {spec}")
    overrides = dict(config_overrides or {})
    if not isinstance(model, str) and isinstance(getattr(model, "config", None), dict):
        # A bundle built with config overrides: recover them, since the ranks rebuild it from its spec.
        base = resolve_model(spec, batch=mb, seq=seq, device="meta", seed=seed).config
        overrides = {**{k: v for k, v in model.config.items() if base.get(k) != v}, **overrides}
    meta_bundle = resolve_model(spec, batch=mb, seq=seq, device="meta", seed=seed, config_overrides=overrides)
    pbytes = _param_bytes(meta_bundle.module)
    reduced = bool(width_reduce)
    if width_reduce is None:
        reduced = pbytes > max_param_bytes or run_plan.world_size > max_full_width_ranks
    if reduced:
        bundle = meta_bundle.width_reduced(max_hidden=max_hidden)
        if bundle is None:
            raise LoweringError(
                f"{spec} ({pbytes / 2**20:.0f} MiB of parameters, {run_plan.world_size} ranks) is too large to "
                "validate at full width here and cannot be width-reduced (factory models); validate a smaller "
                "configuration or pass width_reduce=False"
            )
        notes.append(
            f"width-reduced to hidden size <= {max_hidden} ({pbytes / 2**20:.1f} MiB of parameters at full width, "
            f"{_param_bytes(bundle.module) / 2**20:.2f} MiB reduced); same layers, node names and cut positions"
        )
    else:
        bundle = resolve_model(spec, batch=mb, seq=seq, device="cpu", seed=seed, config_overrides=overrides)
    # The reference starts from the reproducible initialisation every rank draws its own tensors from
    # ([Note: reproducible initialisation]): same values whatever the plan. A full-width model's ranks
    # build it on meta and replay its constructor for tensors no init writes; so does the reference.
    replay = None
    if not reduced:

        def rebuild() -> torch.nn.Module:
            return resolve_model(  # type: ignore[no-any-return]
                spec, batch=mb, seq=seq, device="meta", seed=seed, config_overrides=overrides
            ).module

        def replay(wanted: dict[str, Any]) -> dict[str, torch.Tensor]:
            return replay_constructor(rebuild, wanted)

    initialize(bundle.module, seed=seed, replay=replay)
    source = resolve_source(bundle, batch=mb, seq=seq, output=output)
    with preserved_state(bundle.module):  # nothing below may advance the model's state
        ex = source.sample(mb, seed=seed)
        captured = capture_model(source, ex.args, ex.kwargs)
        graph = captured.graph(name=getattr(bundle, "name", spec))
        check_plan_graph(plan, graph)
        check_node_names(run_plan, captured.node_names, graph)
        # A bad selector fails here, before anything is spawned.
        out_node, out_path = graph_output(captured.gm, source.output)
        assert captured.flat_inputs is not None
        effects = scan_forward(
            captured.gm,
            captured.flat_inputs(ex.args, ex.kwargs),
            module=bundle.module,
            batch=mb,
            module_of={n.name: n.module for n in graph.nodes},
        )
    if effects.unpinnable:
        raise LoweringError(
            f"the model draws random numbers with op(s) validation cannot give fixed values: "
            f"{', '.join(map(str, effects.unpinnable))}; the pipeline's draws cannot match one device's"
        )
    pin = bool(effects.random)
    microbatched = bool(effects.batch_stats or effects.written_buffers)
    stat_layers = tuple(_with_class(bundle.module, m) for m in effects.batch_stat_modules())
    if pin:
        mods = effects.random_modules()
        notes.append(
            f"random ops pinned: both runs drew identical values that do not depend on the batch split "
            f"(dropout keeps every element); {len(effects.random)} random op(s) in {len(mods)} module(s): "
            f"{_first(mods)}. Training with this plan draws them at random"
        )
    if out_path is not None:
        notes.append(f"the loss reads output {out_path!r} (graph value {out_node.name!r})")

    # ---- weights and batches, shared with the ranks through files
    gb = run_plan.request.global_batch
    with preserved_state(bundle.module):
        batches = [source.sample(gb, seed=seed + 1 + k) for k in range(steps)]
    # Buffers follow the replicas of each stage; stages of different dp see different replicas.
    stage_dps = sorted({s.dp for s in run_layout.stages})
    split = (stage_dps[0], run_plan.num_microbatches, run_layout.chunks, mb) if microbatched else None
    if microbatched:
        what = []
        if stat_layers:
            what.append(f"statistics over the batch in {_first(list(stat_layers))}")
        if effects.written_buffers:
            what.append(f"buffers written by the forward: {_first(list(effects.written_buffers))}")
        notes.append(
            f"reference run on the plan's microbatches ({run_plan.num_microbatches} microbatches of "
            f"{run_layout.chunks} chunk(s) of {mb} samples, each replica's chunks in order, gradients "
            f"accumulated), not the whole batch of {gb}: " + "; ".join(what)
        )
        assert split is not None
        gap = _whole_batch_gap(bundle.module, source, batches[0], split, pin=pin)
        notes.append(
            f"effect of microbatching on the model (reported, not judged): the whole-batch single-device "
            f"loss is {gap[0]:.6g}, the microbatched one {gap[1]:.6g} (relative difference {gap[2]:.3g})"
        )
    reference = copy.deepcopy(bundle.module)
    # One more reference per other data-parallel degree, for the buffers of its stages' replicas.
    more_refs = {d: copy.deepcopy(bundle.module) for d in stage_dps[1:]} if microbatched else {}
    with tempfile.TemporaryDirectory(prefix="distplan-validate-") as tmp:
        d = Path(tmp)
        torch.save([(list(b.args), b.kwargs, b.target) for b in batches], d / "data.pt")
        cfg = {
            "dir": str(d),
            "plan": run_plan.to_dict(),
            "model": spec,
            "seq": seq,
            "seed": seed,
            "width_reduced": reduced,
            "max_hidden": max_hidden,
            "optimizer": optimizer,
            "lr": lr,
            "timeout_s": timeout_s + setup_timeout_s,
            "fault": fault,
            "config_overrides": overrides,
            "output": source.output,
            "pin_random": pin,
        }
        (d / "config.json").write_text(json.dumps(cfg))
        world = run_plan.world_size
        say(f"starting {world} ranks ({run_plan.layout})")
        procs = spawn_ranks("distplan.lowering._worker", d / "config.json", world, d)
        t_spawn = time.perf_counter()
        try:
            ref = _reference(reference, source, batches, optimizer=optimizer, lr=lr, pin=pin, split=split)
            ref["buffers_by_dp"] = {stage_dps[0]: ref["buffers"]} if split is not None else {}
            for dp_d, module_d in more_refs.items():
                assert split is not None
                ref_d = _reference(
                    module_d, source, batches, optimizer=optimizer, lr=lr, pin=pin, split=(dp_d, *split[1:])
                )
                ref["buffers_by_dp"][dp_d] = ref_d["buffers"]
            t_ref = time.perf_counter() - t_spawn
            failure = _wait(
                procs,
                d,
                t0=t_spawn,
                timeout_s=timeout_s,
                setup_timeout_s=setup_timeout_s,
                say=say,
                layout=run_plan,
            )
            timings = {
                "prepare_s": t_spawn - t0,
                "reference_s": t_ref,
                "ranks_s": time.perf_counter() - t_spawn,
            }
        finally:
            kill_ranks(procs)
        logs = {r: _tail(d / f"rank{r}.log") for r in range(world)}
        base = {
            "ranks": world,
            "steps": steps,
            "tolerance": tol,
            "width_reduced": reduced,
            "notes": tuple(notes),
            "layout": run_plan.layout,
            "plan_id": plan.id,
            "model": spec,
            "seq": seq,
            "dp_reduced": dp_reduced,
            "timings": timings,
            "reference": "microbatched" if microbatched else "global-batch",
            "random_ops": tuple(map(str, effects.random)),
            "batch_stat_layers": stat_layers,
            "written_buffers": effects.written_buffers,
            "output": out_path,
        }
        if failure is not None:
            rank, message = failure
            return ValidationReport(
                passed=False,
                max_abs_error=float("nan"),
                max_rel_error=float("nan"),
                seconds=time.perf_counter() - t0,
                error=message,
                failed_rank=rank,
                logs={rank: logs.get(rank, "")} if rank is not None else logs,
                **base,  # type: ignore[arg-type]
            )
        results = [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(world)]
    owners = _buffer_owners(captured.gm, captured.node_names, run_layout)
    checks, losses = _compare(
        results, ref, tol, num_stages=run_plan.num_stages, layout=run_layout, buffer_owners=owners
    )
    worst = max(checks, key=lambda c: c.max_rel / tol.of(c.kind))
    passed = all(c.passed for c in checks)
    error = None
    if not passed:
        error = (
            f"{worst.kind} of {worst.name!r} differs from the single-device run: max rel error {worst.max_rel:.3g} "
            f"> tolerance {tol.of(worst.kind):g} (max abs {worst.max_abs:.3g})"
        )
    say("done")
    applied: dict[int, dict[str, Any]] = {}
    for res in results:
        for a in res.get("applied", []):
            if a["replica"] == 0 and a["tp_rank"] == 0:
                applied.setdefault(int(a["stage"]), a)
    return ValidationReport(
        passed=passed,
        stages=tuple(applied[k] for k in sorted(applied)),
        max_abs_error=max(c.max_abs for c in checks),
        max_rel_error=max(c.max_rel for c in checks),
        seconds=time.perf_counter() - t0,
        error=error,
        losses=tuple(losses),
        reference_losses=tuple(ref["losses"]),
        tensors=tuple(sorted(checks, key=lambda c: -c.max_rel / tol.of(c.kind))),
        **base,  # type: ignore[arg-type]
    )


def _parse_fault(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    mode, _, rank = text.partition(":")
    if mode not in ("kill", "hang", "raise") or not rank.isdigit():
        raise LoweringError(f"inject_fault must look like 'kill:1', 'hang:1' or 'raise:1', got {text!r}")
    return {"mode": mode, "rank": int(rank), "step": 0}


_PEER_FAILURE = ("connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout")


_COMM_FRAMES = (
    "distributed_c10d.py",
    "_wait_p2p",  # the schedule executor waiting on a transfer (distplan.lowering.executor)
    "_wait_batch_p2p",
    "batch_isend_irecv",
    "rendezvous",
    "_store_based_barrier",
    # distplan's schedule executor waits on its receives and sends here (lowering/executor.py)
    " in _recv",
    " in _drain_sends",
)


def _stack_of(d: Path, rank: int) -> list[str]:
    """The main thread's frames, innermost first, from the rank's last faulthandler dump."""
    try:
        text = (d / f"rank{rank}.stack").read_text(errors="replace")
    except OSError:
        return []
    blocks = [b for b in text.split("\n\n") if b.strip()]
    if not blocks:
        return []
    main = next((b for b in blocks if "Current thread" in b or "Thread" in b), blocks[-1])
    return [ln.strip() for ln in main.splitlines() if ln.strip().startswith("File ")]


def _diagnose_timeout(
    procs: list[subprocess.Popen[bytes]], running: list[int], d: Path, *, timeout_s: float, layout: Plan
) -> tuple[int | None, str]:
    """Ask the running ranks for their stacks: a rank outside communication while the others wait in it is
    the one that hangs."""
    for r in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(1.0)
    stacks = {r: _stack_of(d, r) for r in running}
    waiting = [r for r, fr in stacks.items() if fr and any(k in ln for ln in fr[:12] for k in _COMM_FRAMES)]
    busy = [r for r, fr in stacks.items() if fr and r not in waiting]
    if busy and waiting:
        r = busy[0]
        return r, (
            f"{_where(r, layout)} hangs: after {timeout_s:g} s it is still in {stacks[r][0]}, while ranks {waiting} "
            "wait for it in communication"
        )
    return (
        running[0],
        f"timed out after {timeout_s:g} s with ranks {running} still running (a rank hangs, or the run needs a "
        "larger timeout_s)",
    )


def _where(rank: int, layout: Plan) -> str:
    """``rank R (stage S)`` (stages plural under interleaved schedules)."""
    stages = [
        s.index
        for s in layout.stages
        if any(r.rank == rank for r in layout.rank_map if r.device in s.devices)
    ]
    return f"rank {rank}" + (f" (stage {','.join(map(str, stages))})" if stages else "")


def _describe(rank: int, code: int, d: Path, layout: Plan) -> tuple[str, bool]:
    """``(message, secondary)``: the rank's failure, and whether it looks like a reaction to a peer's."""
    where = _where(rank, layout)
    err = d / f"rank{rank}.error.json"
    if err.exists():
        info = json.loads(err.read_text())
        msg = f"{where}: {info['type']}: {info['message']}"
        return msg, any(k in info["message"].lower() for k in _PEER_FAILURE)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{where} died with {name}", False
    return f"{where} exited with code {code}: {_tail(d / f'rank{rank}.log', 400)}", False


def _wait(
    procs: list[subprocess.Popen[bytes]],
    d: Path,
    *,
    t0: float,
    timeout_s: float,
    setup_timeout_s: float,
    say: Progress,
    layout: Plan,
) -> tuple[int | None, str] | None:
    """Wait for every rank; on the first failure (or a timeout) return ``(rank, message)``. Set-up (until a
    rank writes ``rank{R}.ready``) is limited by ``setup_timeout_s`` from ``t0``; the steps by ``timeout_s``
    from the moment the last rank is ready."""
    done: set[int] = set()
    ready_at: float | None = None
    while len(done) < len(procs):
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            # Let the ranks that fail in reaction (closed connections) exit too, then blame the root cause.
            time.sleep(0.3)
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            described = [(r, *_describe(r, procs[r].returncode, d, layout)) for r in failed]
            described.sort(key=lambda x: (x[2], x[0]))
            rank, message, secondary = described[0]
            running = [r for r, p in enumerate(procs) if p.poll() is None]
            if secondary and running:
                # Everyone who failed was waiting on a peer, and someone is still busy: that one hangs.
                return running[0], (
                    f"{_where(running[0], layout)} hangs: still running after ranks {failed} gave up waiting "
                    f"(first: {message})"
                )
            others = [r for r, _, _ in described[1:]]
            if others:
                message += f" (ranks {others} failed after it)"
            return rank, message
        for r, p in enumerate(procs):
            if r not in done and p.poll() == 0:
                done.add(r)
                say(f"rank {r} finished ({len(done)}/{len(procs)})")
        running = [r for r, p in enumerate(procs) if p.poll() is None]
        now = time.perf_counter()
        if ready_at is None and all((d / f"rank{r}.ready").exists() for r in running):
            ready_at = now
            say("every rank set up; training steps running")
        if running and ready_at is None and now - t0 > setup_timeout_s:
            late = [r for r in running if not (d / f"rank{r}.ready").exists()]
            return late[0], (
                f"{_where(late[0], layout)} still sets up (builds, captures or materialises its stages) after "
                f"{setup_timeout_s:g} s (ranks {late} not ready; raise setup_timeout_s on a slow machine)"
            )
        if running and ready_at is not None and now - ready_at > timeout_s:
            return _diagnose_timeout(procs, running, d, timeout_s=timeout_s, layout=layout)
        time.sleep(0.05)
    return None


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""


def _reference(
    module: torch.nn.Module,
    source: ModelSource,
    batches: list[Batch],
    *,
    optimizer: str,
    lr: float,
    pin: bool,
    split: tuple[int, int, int, int] | None,
) -> dict[str, Any]:
    """The same steps on one process (see [Note: validation policy]): the whole global batch, or with
    ``split = (dp, microbatches, chunks, chunk rows)`` the plan's chunks with gradient accumulation and the
    buffers of each of ``dp`` replicas. Returns losses, gradients, parameters and buffers (one dict per replica) per step."""
    from distplan.lowering.runtime import _make_optimizer

    params = dict(module.named_parameters())
    opt = _make_optimizer(optimizer, list(params.values()), lr)
    dp = split[0] if split is not None else 1
    states = [_buffers(module)] * dp  # every replica starts from replica 0's buffers
    losses, grads, after, buffers = [], [], [], []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        with PinnedRandom() if pin else contextlib.nullcontext():
            if split is None:
                loss = source.loss(source.select(module(*b.args, **b.kwargs)), b.target)
                loss.backward()
                losses.append(float(loss.item()))
                states = [_buffers(module)] * dp
            else:
                total = 0.0
                for r, mb_losses in enumerate(_microbatch_losses(module, source, b, split, states)):
                    total += mb_losses
                    states[r] = _buffers(module)
                losses.append(total / (split[1] * split[2]))
        grads.append(
            {
                k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for k, p in params.items()
            }
        )
        opt.step()
        after.append({k: p.detach().clone() for k, p in params.items()})
        buffers.append(list(states))
    return {"losses": losses, "grads": grads, "params": after, "buffers": buffers}


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def _load_buffers(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in module.named_buffers():
            v.copy_(state[k])


def _microbatch_losses(
    module: torch.nn.Module,
    source: ModelSource,
    b: Batch,
    split: tuple[int, int, int, int],
    states: list[dict[str, torch.Tensor]],
    *,
    backward: bool = True,
) -> Iterator[float]:
    """For each of ``dp`` replicas in turn (its buffers loaded from ``states``), run the chunks it owns in the
    runtime's order (microbatch by microbatch; [Note: chunks] in ``distplan.lowering.parallel``) and their
    backward, each loss divided by the number of chunks in the whole batch; yields the replica's summed
    chunk losses."""
    dp, m, chunks, rows = split
    assert source.layout is not None
    arg_flags, kw_flags = input_flags(b.args, source.layout)
    per = chunks // dp
    for r in range(dp):
        _load_buffers(module, states[r])
        total = 0.0
        for k in range(m):
            for c in range(r * per, (r + 1) * per):
                lo, hi = (k * chunks + c) * rows, (k * chunks + c + 1) * rows
                args = take_samples(b.args, arg_flags, lo, hi)
                kwargs = take_samples(b.kwargs, kw_flags, lo, hi)
                loss = source.loss(source.select(module(*args, **kwargs)), b.target[lo:hi])
                if backward:
                    (loss / (m * chunks)).backward()
                total += float(loss.item())
        yield total


def _whole_batch_gap(
    module: torch.nn.Module, source: ModelSource, b: Batch, split: tuple[int, int, int, int], *, pin: bool
) -> tuple[float, float, float]:
    """(whole-batch loss, microbatched loss, relative difference) of the first batch on the initial weights,
    without changing the module."""
    with preserved_state(module), torch.no_grad(), PinnedRandom() if pin else contextlib.nullcontext():
        whole = float(source.loss(source.select(module(*b.args, **b.kwargs)), b.target).item())
        states = [_buffers(module)] * split[0]
        parts = sum(_microbatch_losses(module, source, b, split, states, backward=False))
    micro = parts / (split[1] * split[2])
    return whole, micro, abs(whole - micro) / max(abs(micro), 1e-12)


def _with_class(module: torch.nn.Module, fqn: str) -> str:
    try:
        sub = module.get_submodule(fqn) if fqn and fqn != "<root>" else module
    except AttributeError:
        return fqn
    return f"{fqn} ({type(sub).__name__})"


def _first(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _err(a: torch.Tensor, b: torch.Tensor, floor: float) -> tuple[float, float]:
    if a.shape != b.shape:
        return float("inf"), float("inf")
    a, b = a.double(), b.double()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = max(float(b.abs().max()) if b.numel() else 0.0, floor)
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return diff, rel


def _floors(ref: dict[str, Any], kind: str) -> list[float]:
    """Per step, a thousandth of the largest reference entry of that kind (see [Note: validation policy])."""
    return [
        1e-3 * max((float(t.double().abs().max()) for t in step.values() if t.numel()), default=0.0)
        for step in ref[kind]
    ]


def _buffer_owners(gm: Any, node_names: list[str], layout: ParallelLayout) -> dict[str, int]:
    """Buffer path -> the stage of the first node that reads it (where a forward's write to it happens)."""
    pos = {n: i for i, n in enumerate(node_names)}
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        used = [pos[u.name] for u in n.users if u.name in pos]
        if used:
            first = min(used)
            out[str(n.target)] = next(s.index for s in layout.stages if s.start <= first < s.end)
    return out


def _compare(
    results: list[dict[str, Any]],
    ref: dict[str, Any],
    tol: Tolerance,
    *,
    num_stages: int,
    layout: ParallelLayout | None = None,
    buffer_owners: dict[str, int] | None = None,
) -> tuple[list[TensorCheck], list[float]]:
    acc: dict[tuple[str, str], list[float]] = {}

    def add(kind: str, name: str, abs_e: float, rel_e: float) -> None:
        cur = acc.setdefault((kind, name), [0.0, 0.0, 0])
        cur[0] = max(cur[0], abs_e)
        cur[1] = max(cur[1], rel_e)
        cur[2] += 1

    losses: list[float] = []
    floors = {kind: _floors(ref, kind) for kind in ("grads", "params")}
    # Buffers: per replica (see [Note: validation policy]); the floor from replica 0's.
    floors["buffers"] = _floors({"buffers": [step[0] for step in ref["buffers"]]}, "buffers")
    for res in results:
        for step, loss in enumerate(res["losses"]):
            if loss is None:
                continue
            if res["replica"] == 0 and len(losses) <= step:
                losses.append(float(loss))
            b = ref["losses"][step]
            diff = abs(float(loss) - b)
            add("loss", "loss", diff, diff / abs(b) if b else (0.0 if diff == 0 else float("inf")))
        for kind in ("grads", "params"):
            for step, tensors in enumerate(res[kind]):
                for name, t in tensors.items():
                    want = ref[kind][step].get(name)
                    k = kind[:-1]
                    if want is None:
                        add(k, name, float("inf"), float("inf"))
                        continue
                    add(k, name, *_err(t, want, floors[kind][step]))
        by_dp = ref.get("buffers_by_dp") or {}
        stage_dp = layout.stages[res["stages"][0]].dp if layout is not None and res.get("stages") else None
        own = by_dp.get(stage_dp, ref["buffers"])  # the reference of this rank's stage's replicas
        for step, tensors in enumerate(res.get("buffers", [])):
            per_replica = own[step]
            want_all = per_replica[min(res["replica"], len(per_replica) - 1)]
            for name, t in tensors.items():
                owner = (buffer_owners or {}).get(name)
                if layout is not None and owner is not None and layout.stages[owner].dp != stage_dp:
                    # A later stage's copy that only receives the owner's value (export writes a mutated
                    # buffer back at the end of the graph) from replicas cut differently: the owner's copy
                    # is the one compared.
                    continue
                want = want_all.get(name)
                if want is None:
                    add("buffer", name, float("inf"), float("inf"))
                    continue
                add("buffer", name, *_err(t, want, floors["buffers"][step]))
    held = {name for (kind, name) in acc if kind == "grad"}
    for name in ref["grads"][0]:
        if name not in held:
            add("grad", name, float("inf"), float("inf"))  # a parameter no stage holds
    if ("loss", "loss") not in acc:
        add("loss", "loss", float("inf"), float("inf"))
    checks = [
        TensorCheck(kind=k, name=n, max_abs=v[0], max_rel=v[1], passed=v[1] <= tol.of(k), copies=int(v[2]))
        for (k, n), v in acc.items()
    ]
    return checks, losses
