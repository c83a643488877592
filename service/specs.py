"""Turn a checked request body into a canonical request: the content address, and safe inputs for a worker.

Everything a client sends is checked here before a job is queued, with errors that name the field, in the
API process and against what it knows itself (:class:`~distplan.service.catalog.Catalog`, presets, the
graph schema): a request gets the same answer whether the workers are warm, busy or still starting.

- a built-in model must be a name of the zoo; a ``package.module:function`` spec (code) is refused;
- an ``hf_config`` must name a ``model_type`` this transformers knows, must not carry ``auto_map`` or
  ``trust_remote_code`` (remote code), and its layer count is capped (as are built-in config overrides);
  private ``_*`` keys are dropped;
- an uploaded graph is size-checked (node count) *before* it is parsed, then parsed and linted by
  ``OpGraph.from_dict`` (cycles, dangling inputs, negative sizes) and its numbers range-checked;
- a cluster is a preset name (never a file path) or an inline cluster, its device count is capped and its
  figures must lie in physical ranges (a 1e-300 B/s link would overflow the planner's integer times);
- the request's fields, the cluster's figures and the batch arithmetic are checked by ``PlanRequest``'s own
  rules (one table of ranges for every door, ``distplan.limits``).

The canonical request is plain JSON: the cluster in full, the graph by content hash, the solver time limit
after the server cap. Its hash is the plan id (:func:`plan_id`), so the same request is solved once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distplan._serde import canonical_hash
from distplan.cluster import Cluster
from distplan.errors import CalibrationError, GraphError, ModelSpecError, PlanError, ProfileError
from distplan.graph import OpGraph
from distplan.limits import FIGURE_RANGES
from distplan.profiles import list_presets, load_cluster, preset_cluster
from distplan.request import RECOMPUTE, SHARD, PlanRequest
from distplan.service.catalog import Catalog
from distplan.service.models import BuiltinModel, GraphModel, HFConfigModel, PlanCreate, ValidationCreate
from distplan.service.settings import Settings

__all__ = ["PlanSpec", "ValidationSpec", "check_cluster", "plan_spec", "validation_spec"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LAYER_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "num_decoder_layers",
    "num_encoder_layers",
)
_REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")
_MAX_NUMBER = 2**53  # the largest integer JSON clients reliably round-trip


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """A checked plan request: its id, canonical JSON, and the parsed graph JSON for uploaded graphs."""

    id: str
    request: dict[str, Any]
    graph: dict[str, Any] | None
    graph_json: str | None


@dataclass(frozen=True, slots=True)
class ValidationSpec:
    """A checked validation request."""

    id: str
    request: dict[str, Any]


def _check_measured(where: str, data: Any) -> None:
    """Every measured time of a calibration (a curve's ``seconds``) within the range of
    :data:`distplan.limits.FIGURE_RANGES` ("measured time")."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "seconds" and isinstance(value, list):
                for i, t in enumerate(value):
                    FIGURE_RANGES["measured time"].check("measured time", t, where=f"{where}.seconds[{i}]")
            else:
                _check_measured(f"{where}.{key}", value)


def _check_calibrations(cluster: Cluster) -> None:
    for k in cluster.kinds.values():
        if k.calibration is not None:
            _check_measured(
                f"cluster {cluster.name!r}: device kind {k.name!r} calibration", k.calibration.to_dict()
            )
    links = [(f"host {h.name!r}", h.link) for h in cluster.hosts] + [("network", cluster.network)]
    for name, link in links:
        if link.calibration is not None:
            _check_measured(f"cluster {cluster.name!r}: {name} link calibration", link.calibration.to_dict())


def check_cluster(
    spec: str | dict[str, Any],
    *,
    max_devices: int,
    calibration: Callable[[str], dict[str, Any] | None] | None = None,
) -> Cluster:
    """A cluster from a preset name or an inline cluster (never a file path).

    An inline cluster's ``calibrations`` list holds calibrations' contents or the ids of calibrations
    uploaded to ``POST /v1/calibrations``; ``calibration(id)`` returns an uploaded one (None if unknown)."""
    if isinstance(spec, dict) and isinstance(spec.get("calibrations"), list):
        spec = dict(spec)
        resolved = []
        for i, c in enumerate(spec["calibrations"]):
            if isinstance(c, str) and re.fullmatch(r"[0-9a-f]{8,64}", c):
                found = calibration(c) if calibration is not None else None
                if found is None:
                    raise CalibrationError(
                        f"cluster.calibrations[{i}]: no uploaded calibration has id {c!r}; POST the file "
                        "(what distplan profile wrote) to /v1/calibrations first"
                    )
                c = found
            resolved.append(c)
        spec["calibrations"] = resolved
    if isinstance(spec, str):
        presets = list_presets()
        if spec not in presets:
            raise ProfileError(f"unknown cluster preset {spec[:80]!r}; presets: {', '.join(presets)}")
        cluster = preset_cluster(spec)
    else:
        cluster = load_cluster(dict(spec))
        # Its figures are checked by PlanRequest (distplan.limits); measured times here.
        _check_calibrations(cluster)
    if cluster.num_devices > max_devices:
        raise ProfileError(
            f"cluster {cluster.name!r} has {cluster.num_devices} devices, more than this server's limit of {max_devices}"
        )
    return cluster


def _check_layers(cfg: dict[str, Any], where: str, max_layers: int) -> None:
    # Tracing time and memory grow with the layer count (not with width: models are built on meta).
    for key in _LAYER_KEYS:
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= max_layers:
            raise ModelSpecError(f"{where}.{key}: {v} is out of range (1..{max_layers} on this server)")


def _builtin(m: BuiltinModel, catalog: Catalog, *, max_layers: int) -> dict[str, Any]:
    name = m.builtin
    if ":" in name or "/" in name or "\\" in name:
        raise ModelSpecError(
            f"model.builtin {name!r} looks like a code path (package.module:function); the service only builds "
            "built-in models, hf_config or graph models, never code named by a client"
        )
    known = catalog.model_names
    if not _NAME.match(name) or name not in known:
        raise ModelSpecError(f"unknown built-in model {name[:64]!r}; built-in models: {', '.join(known)}")
    for k, v in m.config.items():
        if not _NAME.match(k):
            raise ModelSpecError(f"model.config: {k[:64]!r} is not a config field name")
        if isinstance(v, str) and len(v) > 256:
            raise ModelSpecError(f"model.config.{k}: string of {len(v)} characters (at most 256)")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > _MAX_NUMBER:
            raise ModelSpecError(f"model.config.{k}: {v} is out of range (|value| <= 2**53)")
    _check_layers(m.config, "model.config", max_layers)
    return {"builtin": name, "config": dict(sorted(m.config.items()))}


def _hf(m: HFConfigModel, catalog: Catalog, *, max_layers: int) -> dict[str, Any]:
    cfg = m.hf_config
    bad = [k for k in _REMOTE_CODE_KEYS if k in cfg]
    if bad:
        raise ModelSpecError(
            f"hf_config carries {', '.join(bad)}, which asks for remote code; the service never runs remote code"
        )
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ModelSpecError(
            "hf_config.model_type: missing (a Hugging Face config.json names its model_type)"
        )
    known = catalog.hf_model_types
    if known is not None and not known:
        raise ModelSpecError(
            "hf_config: this server has no Hugging Face transformers installed (the 'hf' extra); "
            "send a built-in model or a graph"
        )
    if known is not None and mt not in known:
        close = difflib.get_close_matches(mt[:64], sorted(known), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ModelSpecError(
            f"hf_config.model_type {mt[:64]!r} is not a model type this transformers knows ({len(known)} known{hint})"
        )
    _check_layers(cfg, "hf_config", max_layers)
    # Private keys (``_name_or_path``, ``_commit_hash``) may point transformers at files or the hub.
    return {"hf_config": {k: v for k, v in sorted(cfg.items()) if not k.startswith("_")}}


def _graph(m: GraphModel, *, max_nodes: int) -> OpGraph:
    nodes = m.graph.get("nodes")
    if isinstance(nodes, list) and len(nodes) > max_nodes:
        raise GraphError(f"graph has {len(nodes)} nodes, more than this server's limit of {max_nodes}")
    g = OpGraph.from_dict(m.graph)
    for i, n in enumerate(g.nodes):
        for f in ("fwd_flops", "bwd_flops", "bytes_moved", "param_bytes", "activation_bytes"):
            if getattr(n, f) > _MAX_NUMBER:
                raise GraphError(f"graph.nodes[{i}].{f}: {getattr(n, f)} is out of range (at most 2**53)")
        for j, t in enumerate(n.outputs):
            if t.nbytes > _MAX_NUMBER or any(s > _MAX_NUMBER for s in t.shape):
                raise GraphError(f"graph.nodes[{i}].outputs[{j}]: size out of range (at most 2**53)")
    if g.param_bytes > _MAX_NUMBER or g.num_params > _MAX_NUMBER:
        raise GraphError("graph.param_bytes / num_params: out of range (at most 2**53)")
    return g


def plan_spec(
    body: PlanCreate,
    *,
    settings: Settings,
    catalog: Catalog,
    calibration: Callable[[str], dict[str, Any] | None] | None = None,
) -> PlanSpec:
    """Check a plan request and make its canonical form (see the module docstring).

    Raises ``ProfileError`` (cluster), ``ModelSpecError`` (model), ``GraphError`` (uploaded graph) or
    ``PlanError`` (batch arithmetic, schedule), each naming the field and the value.
    """
    cluster = check_cluster(body.cluster, max_devices=settings.max_cluster_devices, calibration=calibration)
    time_limit = min(body.time_limit_s or settings.default_time_limit_s, settings.solver_time_cap_s)
    graph: OpGraph | None = None
    model: dict[str, Any]
    if isinstance(body.model, BuiltinModel):
        model = _builtin(body.model, catalog, max_layers=settings.max_layers)
    elif isinstance(body.model, HFConfigModel):
        model = _hf(body.model, catalog, max_layers=settings.max_layers)
    else:
        graph = _graph(body.model, max_nodes=settings.max_graph_nodes)
        model = {"graph": graph.content_hash, "name": graph.name}
    # The request spine (see [Note: the request spine] in distplan.request): built once here, checked by its
    # own rules, stored with the job and read back by the worker.
    plan_request = PlanRequest(
        cluster=cluster,
        global_batch=body.global_batch,
        dtype=body.dtype,
        optimizer=body.optimizer,
        microbatches=body.microbatches,
        schedule=body.schedule,
        time_limit_s=time_limit,
        workers=settings.solver_threads,
        matmul_precision=body.matmul_precision,
        tensor_parallel=body.tensor_parallel,
        recompute=RECOMPUTE if body.recompute is None else tuple(body.recompute),
        shard=SHARD if body.shard is None else tuple(body.shard),
    )
    request = {
        "model": model,
        # An uploaded graph fixes its own example input size.
        "batch": None if graph is not None else body.batch,
        "seq": None if graph is not None else body.seq,
        # The request's own fields beside the model's: the worker reads them back with PlanRequest.from_dict.
        **plan_request.to_dict(),
    }
    graph_dict = graph.to_dict() if graph is not None else None
    return PlanSpec(
        id=canonical_hash({"kind": "plan", "v": 2, **request}),
        request=request,
        graph=graph_dict,
        graph_json=graph.to_json() if graph is not None else None,
    )


def validation_spec(
    plan_id: str, plan_request: dict[str, Any], body: ValidationCreate, *, settings: Settings
) -> ValidationSpec:
    """Check a validation request for a stored plan."""
    if "graph" in plan_request["model"]:
        raise PlanError(
            f"plan {plan_id} was made from an uploaded graph; validation needs a model the service can build "
            "(a built-in model or an hf_config), so plan one of those to validate here, or validate this plan "
            "where the model's code runs: `distplan validate plan.json --model package.module:function` with "
            f"the plan.json of GET /v1/plans/{plan_id}/launcher"
        )
    timeout = min(body.timeout_s or settings.validation_timeout_s, settings.validation_timeout_s)
    request = {"plan_id": plan_id, "steps": body.steps, "timeout_s": timeout}
    return ValidationSpec(
        id=canonical_hash({"kind": "validation", "v": 1, "plan_id": plan_id, "steps": body.steps}),
        request=request,
    )
