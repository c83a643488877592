"""What the worker processes run: trace + plan + simulate + emit the launcher, and validation.

This module is imported in the spawned worker processes (see ``distplan.service.jobs``); the server process
imports only :func:`worker_main` by name, so it never imports torch.

A task gets a JSON payload made by the service from a request it has already checked
(``distplan.service.specs``) and returns named text artifacts. Models are built only from the built-in zoo
(by name) or from a Hugging Face ``config.json`` written by this module to a fresh temporary folder under a
fixed file name; nothing a client sends becomes a file name, an import path or code, and
``trust_remote_code`` is never set.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = ["TASKS", "build_graph", "catalog", "run_plan", "run_validation", "worker_main"]


# ---------------------------------------------------------------------------------------------- models
@contextmanager
def hf_config_dir(config: dict[str, Any]) -> Iterator[Path]:
    """A temporary folder holding ``config.json`` with ``config`` (already sanitised by the service)."""
    with tempfile.TemporaryDirectory(prefix="distplan-hf-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        yield Path(tmp)


@contextmanager
def model_source(model: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """The tracer's model spec string and config overrides for a checked model spec."""
    if "builtin" in model:
        yield str(model["builtin"]), (dict(model.get("config") or {}) or None)
    elif "hf_config" in model:
        from distplan.errors import DistplanError

        with hf_config_dir(model["hf_config"]) as folder:
            path = str(folder / "config.json")
            try:
                yield path, None
            except DistplanError as e:
                # Name the request's field, not this worker's temporary file.
                raise type(e)(str(e).replace(path, "hf_config")) from e
    else:
        raise ValueError(f"no model source in {sorted(model)}")


def build_graph(request: dict[str, Any], graph: dict[str, Any] | None, *, max_nodes: int) -> Any:
    """The ``OpGraph`` of a checked plan request: the uploaded graph, or a trace of the named model."""
    from distplan.errors import GraphError
    from distplan.graph import OpGraph

    if graph is not None:
        g = OpGraph.from_dict(graph)
    else:
        from distplan.tracer import resolve_model, trace

        with model_source(request["model"]) as (spec, overrides):
            bundle = resolve_model(
                spec, batch=request["batch"], seq=request["seq"], device="meta", config_overrides=overrides
            )
            g = trace(bundle, batch=request["batch"], seq=request["seq"])
    if len(g.nodes) > max_nodes:
        raise GraphError(
            f"the traced graph has {len(g.nodes)} nodes, more than this server's limit of {max_nodes}"
        )
    return g


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def catalog() -> dict[str, Any]:
    """The built-in models and the Hugging Face ``model_type`` values this worker knows, as it knows them
    (with torch and transformers imported). The API checks requests against its own copy
    (:mod:`distplan.service.catalog`); a worker reports this one at startup so a difference is logged."""
    from distplan.tracer import list_models

    models = [_plain(m) for m in list_models()]
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        hf_types = sorted(CONFIG_MAPPING_NAMES)
    except ImportError:  # transformers is an optional extra
        hf_types = []
    return {"models": models, "hf_model_types": hf_types}


# ---------------------------------------------------------------------------------------------- tasks
def run_plan(payload: dict[str, Any]) -> dict[str, str]:
    """Trace (or read) the graph, plan, simulate, emit the launcher; return the artifacts as text."""
    from distplan.planner import plan as make_plan
    from distplan.planner import simulate
    from distplan.request import PlanRequest

    request = payload["request"]
    # The PlanRequest the route built and checked (see [Note: the request spine] in distplan.request).
    plan_request = PlanRequest.from_dict(request)
    graph = build_graph(request, payload.get("graph"), max_nodes=int(payload["max_graph_nodes"]))
    plan = make_plan(graph, plan_request)
    timeline = simulate(plan, graph)
    artifacts = {
        "plan": plan.to_json(indent=None),
        "graph": graph.to_json(),
        # One stored form: the Chrome trace reads back into a Timeline (Timeline.from_chrome_trace).
        "timeline": json.dumps(timeline.to_chrome_trace()),
    }
    artifacts["launcher"] = json.dumps(_launcher_or_error(plan, request["model"], seq=request["seq"]))
    return artifacts


def _launcher_or_error(plan: Any, model: dict[str, Any], *, seq: int | None) -> dict[str, Any]:
    """The launcher, or the reason there is none: a plan is still a plan when its program cannot be
    emitted (``GET /v1/plans/{id}/launcher`` then answers that reason)."""
    from distplan.errors import DistplanError
    from distplan.service.advice import for_rest_client
    from distplan.service.errors import ErrorKind, kind_of

    try:
        return launcher(plan, model, seq=seq)
    except DistplanError as e:
        return {
            "error": {"type": type(e).__name__, "message": for_rest_client(str(e)), "kind": kind_of(e).value}
        }
    except ImportError as e:  # this build has no lowering
        return {
            "error": {
                "type": "LoweringError",
                "message": f"this server cannot emit launchers: {e}",
                "kind": ErrorKind.UNPROCESSABLE.value,
            }
        }


def launcher(plan: Any, model: dict[str, Any], *, seq: int | None = None) -> dict[str, Any]:
    """The emitted entry point, plan file and torchrun commands for a plan, as ``{files, commands}``."""
    from distplan.lowering import emit_launcher

    kwargs: dict[str, Any] = {"seq": seq} if seq else {}
    with tempfile.TemporaryDirectory(prefix="distplan-launch-") as tmp, contextlib.ExitStack() as stack:
        if "builtin" in model:
            spec = str(model["builtin"])
        elif "hf_config" in model:
            # An absolute path in a folder of our own: the lowering copies it next to train.py.
            spec = str(stack.enter_context(hf_config_dir(model["hf_config"])) / "config.json")
        else:
            spec = "your_package.module:factory"  # an uploaded graph names no model: the user fills it in
        out = emit_launcher(plan, spec, Path(tmp), **kwargs)
        files = {p.name: p.read_text() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return {
        "model_spec": Path(spec).name if "hf_config" in model else spec,
        "files": files,
        "commands": list(out.commands),
        "local_command": out.local_command,
    }


def run_validation(payload: dict[str, Any]) -> dict[str, str]:
    """Validate a stored plan's numerics on CPU/gloo; return the report.

    The lowering rebuilds the model in each rank process from a spec string; a built-in model with config
    overrides is handed over as a bundle instead (its spec alone would lose the overrides).
    """
    from distplan.lowering import validate
    from distplan.plan import Plan

    plan = Plan.from_dict(payload["plan"])
    with model_source(payload["model"]) as (spec, overrides):
        # Overrides go to validate() as such: building the model here first (at full width, on the CPU)
        # would cost its whole memory, and validate() decides itself whether to run a width-reduced copy.
        report = validate(
            plan,
            spec,
            steps=int(payload["steps"]),
            timeout_s=float(payload["timeout_s"]),
            config_overrides=overrides,
        )
    return {"report": json.dumps(report.to_dict())}


def run_price(payload: dict[str, Any]) -> dict[str, str]:
    """Price a scheduled job's shapes (:func:`distplan.service.schedule_work.run_price`)."""
    from distplan.service.schedule_work import run_price as price

    return price(payload)


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, str]]] = {
    "plan": run_plan,
    "validation": run_validation,
    "price": run_price,
}


# ---------------------------------------------------------------------------------------------- process
def _error_message(exc: BaseException, task: str = "plan") -> dict[str, Any]:
    """The reply for a task that raised: the error's type, message (advice said for a REST client, see
    :mod:`distplan.service.advice`) and kind; never an HTTP status (the edge derives it from the kind)."""
    from distplan.errors import DistplanError
    from distplan.service.advice import for_rest_client
    from distplan.service.errors import ErrorKind, kind_of

    if isinstance(exc, DistplanError):
        message = str(exc)
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, DistplanError) and str(cause) not in message:
            message += f" (caused by {type(cause).__name__}: {str(cause)[:300]})"
        return {
            "ok": False,
            "type": type(exc).__name__,
            "message": for_rest_client(message, task=task),
            "kind": kind_of(exc).value,
        }
    traceback.print_exc(file=sys.stderr)
    return {
        "ok": False,
        "type": "InternalError",
        "message": f"internal error ({type(exc).__name__}: {str(exc)[:300]}); this is a distplan bug",
        "kind": ErrorKind.INTERNAL.value,
    }


def _exit_with_parent() -> None:
    """Kill this worker's process group if the server dies without stopping it (e.g. SIGKILL), so no
    orphaned solve or validation keeps running."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="distplan-parent-watch", daemon=True).start()


def run_worker_init(spec: str) -> None:
    """Call the operator's ``package.module:function`` (``Settings.worker_init``) with no arguments."""
    import importlib

    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    fn()


def worker_main(conn: Any, worker_init: str | None = None) -> None:
    """Body of a worker process: warm up (imports, then ``worker_init`` if given), report the catalog,
    then run tasks until the pipe closes."""
    # Lead a process group of our own, so the service can kill us together with any rank processes a
    # validation starts (see distplan.service.jobs).
    os.setsid()
    _exit_with_parent()
    try:
        if worker_init:
            run_worker_init(worker_init)
        cat = catalog()
        import distplan.planner  # noqa: F401  (warm-up: the first job should not pay for imports)

        conn.send_bytes(json.dumps({"ready": True, "catalog": cat}).encode())
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        conn.send_bytes(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}).encode())
        return
    while True:
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            artifacts = TASKS[msg["task"]](msg["payload"])
            reply: dict[str, Any] = {"ok": True, "artifacts": artifacts}
        except Exception as e:
            reply = _error_message(e, str(msg.get("task", "plan")))
        conn.send_bytes(json.dumps(reply).encode())
