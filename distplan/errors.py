"""The distplan exception hierarchy.

Every error a user can cause derives from :class:`DistplanError`; the CLI prints its message (no traceback
unless ``--debug``) and the service maps each class to one HTTP status in one place
(``distplan.service.errors``). Messages name what is wrong and by how much.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "DistplanError",
    "GraphError",
    "InfeasiblePlanError",
    "LoweringError",
    "ModelSpecError",
    "PlanError",
    "ProfileError",
    "TraceError",
    "ValidationFailedError",
]


class DistplanError(Exception):
    """Base class of every error distplan raises on purpose.

    ``field``: the request field the error is about, by its canonical name (``global_batch``,
    ``time_limit_s``; see ``distplan.limits``), or None. Each door says it in its own syntax: the CLI as
    its option (``--global-batch``), the REST service as the body field (``global_batch``).
    """

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field


class ProfileError(DistplanError, ValueError):
    """A device kind or cluster description is malformed or inconsistent (names file, field and value)."""


class CalibrationError(ProfileError):
    """A calibration file (``distplan profile``) is malformed or does not fit the cluster it is given to
    (names the file and the field)."""


class ModelSpecError(DistplanError, ValueError):
    """A model could not be built: unknown built-in name, broken config.json, bad factory path."""


class TraceError(DistplanError):
    """A model could not be traced (names the op or module where it failed)."""


class GraphError(DistplanError, ValueError):
    """An OpGraph is malformed (cycle, dangling input, negative size, ...)."""


class PlanError(DistplanError, ValueError):
    """A plan is malformed, does not belong to the graph/cluster, or a plan request is invalid."""


class InfeasiblePlanError(DistplanError):
    """No plan fits the cluster; the message names the budget that was missed and by how much."""


class LoweringError(DistplanError):
    """A plan could not be turned into a runnable program."""


class ValidationFailedError(DistplanError):
    """A validation run failed (a rank crashed, timed out, or numerics differ)."""
