"""Advice in the pipeline's error messages, said the way a client of the REST service can follow it.

The tracer, planner and lowering speak to a user of the Python API or the CLI: "use --seq 512 or less",
"use a package.module:function factory". A client of this service sends JSON: it has no flags, and the
service never imports code a client names. :func:`for_rest_client` rewrites such advice in a message
before the service answers it (it runs in the worker, on the messages of ``DistplanError`` s):

- advice to use a ``package.module:function`` factory becomes what the service does take: a graph traced
  where the model's code runs, sent as ``{"model": {"graph": ...}}``;
- a CLI flag that is also a field of the request (``--seq``, ``--microbatches``, ``--global-batch``) becomes
  that field's name;
- a CLI flag the service has no field for (``--max-ranks``: a limit of this server) is kept, but said to be
  an option of ``distplan`` run on the client's own machine, with where to get the plan file.

The rules match the *syntax* of such advice (a factory spec, a ``--flag``), not the wording of one message,
so new messages of the same kinds are covered; ``tests/service/test_advice.py`` runs them on the real
messages of the tracer and the lowering.
"""

from __future__ import annotations

import re

__all__ = ["REQUEST_FIELDS", "SERVICE_MODEL_FORMS", "for_rest_client"]

# The fields of POST /v1/plans and POST /v1/plans/{id}/validations bodies (distplan.service.models).
REQUEST_FIELDS = frozenset(
    {
        "model",
        "batch",
        "seq",
        "cluster",
        "global_batch",
        "microbatches",
        "schedule",
        "dtype",
        "optimizer",
        "time_limit_s",
        "steps",
        "timeout_s",
    }
)

SERVICE_MODEL_FORMS = (
    "this service builds only built-in models and Hugging Face configs and never runs client code: trace the "
    "model where its code runs (`distplan.trace(model, inputs)` in Python, or the `distplan trace` command) "
    'and send the graph JSON as {"model": {"graph": ...}} (a graph can be planned, not validated)'
)

_FACTORY = "package.module:function"
# The clause of a message that advises a factory: from the separator before it to the end of its clause.
_FACTORY_CLAUSE = re.compile(r"[,;]?[^,;]*'?package\.module:function'?[^;.]*")
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
# Sentence or clause boundaries: after a period or semicolon that a space follows (not "4.6", "a.b").
_BOUNDARY = re.compile(r"(?<=[.;])(?=\s)")


def _self_hosted(task: str) -> str:
    if task == "validation":
        return (
            "run `distplan validate` with it on a machine of your own, on the plan.json that "
            "GET /v1/plans/{id}/launcher returns"
        )
    return "run `distplan plan` with it on a machine of your own"


def _flags(part: str, task: str) -> str:
    """One clause with its CLI flags said as request fields, or marked as options of ``distplan``."""
    flags = _FLAG.findall(part)
    if not flags:
        return part
    unknown = [f for f in flags if f.replace("-", "_") not in REQUEST_FIELDS]
    part = _FLAG.sub(lambda f: f.group(0) if f.group(1) in unknown else f.group(1).replace("-", "_"), part)
    if not unknown:
        return part
    end = part[-1] if part[-1] in ".;" else ""
    options = ", ".join(f"--{f}" for f in unknown)
    return f"{part[: len(part) - len(end)]} ({options}: not a setting of this service; {_self_hosted(task)}){end}"


def for_rest_client(message: str, *, task: str = "plan") -> str:
    """``message`` with advice a REST client cannot follow rewritten (see the module docstring).

    ``task`` is the job the message comes from (``"plan"`` or ``"validation"``): it decides which
    ``distplan`` command a server-only option belongs to.
    """
    message = "".join(_flags(part, task) for part in _BOUNDARY.split(message))
    if _FACTORY in message:
        rewritten = _FACTORY_CLAUSE.sub(lambda _: "; " + SERVICE_MODEL_FORMS, message, count=1)
        # A factory named where the clause rule does not reach: say what the service takes, after it.
        message = rewritten if _FACTORY not in rewritten else f"{message} ({SERVICE_MODEL_FORMS})"
    return message
