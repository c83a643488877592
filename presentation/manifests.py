"""A scheduled job as a manifest of an existing engine: a Kubernetes Indexed Job, or a Slurm batch script.

Plain text made from data (:class:`ManifestJob`) with Jinja2 templates (``templates/k8s_job.yaml.j2``,
``templates/slurm_job.sbatch.j2``); no home-made cluster manager. Each host of the job's plan runs its own
``torchrun`` line (``distplan.lowering.launcher.host_commands``: node rank, process count, ``--host-index``
so ranks follow the plan whatever order the rendezvous numbers the hosts in); the caller passes those lines,
made with the rendezvous endpoint ``$DISTPLAN_RDZV``, which each manifest sets:

* **Kubernetes** (``batch/v1`` Job, ``completionMode: Indexed``): one pod per host, pod ``i`` runs the line
  of node rank ``i`` (``$JOB_COMPLETION_INDEX``); a headless Service gives pod 0 the stable name
  ``<job>-0.<job>`` the others rendezvous at. Pods are confined to the hosts the scheduler chose
  (``nodeAffinity`` on ``kubernetes.io/hostname``), one per host (``podAntiAffinity``), each asking for its
  host's devices (``resource``, e.g. ``nvidia.com/gpu``); the job's priority class is
  ``distplan-<priority>`` (create those PriorityClasses once). Checkpoints go to a volume claim mounted at
  ``/checkpoints``, so a preempted job resumes from it under its next plan.
* **Slurm** (``sbatch``): one task per node on the nodes the scheduler chose (``--nodelist``: the cluster's
  host names must be the Slurm node names); each task runs the line of its node (``$SLURMD_NODENAME``);
  pod 0's role is the first node of the allocation. The priority class is written as a QOS line to enable
  (``##SBATCH`` is ignored by Slurm until one ``#`` is removed), since QOS names are site-specific.

Values are quoted for the file they land in (YAML strings as JSON strings; shell words with ``shlex``):
nothing a client names becomes unquoted text.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

    from distplan.plan import Plan

__all__ = ["FORMATS", "RDZV", "HostLaunch", "ManifestJob", "dns_name", "render_manifest"]

#: Manifest formats: name -> template.
FORMATS = {"k8s": "k8s_job.yaml.j2", "slurm": "slurm_job.sbatch.j2"}
#: The rendezvous endpoint variable every host line uses (``host_commands(..., endpoint=RDZV)``).
RDZV = "$DISTPLAN_RDZV"
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


@dataclass(frozen=True, slots=True)
class HostLaunch:
    """One host of the job: its node rank (pod index), the cluster's host index and name, its process
    count (= its devices in the plan) and its ``torchrun`` line."""

    node_rank: int
    host_index: int
    host: str
    nproc: int
    command: str


@dataclass(frozen=True, slots=True)
class ManifestJob:
    """What a manifest launches.

    Attributes:
        job_id: the scheduler's job id; name: its DNS-1123 form (:func:`dns_name`).
        priority: ``high``, ``normal`` or ``low``.
        device_kind: the device kind of its devices; devices: their global indices.
        plan_id / layout: the plan it runs (``layout`` with the cluster's device indices).
        hosts: one :class:`HostLaunch` per host, in node-rank order.
        image: container image (Kubernetes); resource: the device resource name per pod (``nvidia.com/gpu``,
            ``amd.com/gpu``; Slurm: its ``--gres`` name is the part after the ``/``).
        port: rendezvous port; checkpoint_claim: Kubernetes volume claim holding checkpoints.
        workdir: where ``train.py`` and ``plan.json`` are (the launcher's files).
    """

    job_id: str
    priority: str
    device_kind: str
    devices: tuple[int, ...]
    plan_id: str
    layout: str
    hosts: tuple[HostLaunch, ...]
    image: str = "distplan:latest"
    resource: str = "nvidia.com/gpu"
    port: int = 29500
    checkpoint_claim: str = "distplan-checkpoints"
    workdir: str = "/workspace"

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValueError(f"job {self.job_id!r}: a manifest needs at least one host")
        for h in self.hosts:
            if not _HOST.match(h.host):
                raise ValueError(
                    f"job {self.job_id!r}: host name {h.host!r} cannot be a node name (letters, digits, '.', '-', '_')"
                )
        ranks = [h.node_rank for h in self.hosts]
        if ranks != list(range(len(ranks))):
            raise ValueError(
                f"job {self.job_id!r}: hosts must be in node-rank order 0..{len(ranks) - 1}, got {ranks}"
            )
        if RDZV not in self.hosts[0].command:
            raise ValueError(
                f"job {self.job_id!r}: host commands must rendezvous at {RDZV} (host_commands(endpoint=...))"
            )

    @property
    def name(self) -> str:
        return dns_name(self.job_id)

    @classmethod
    def from_plan(
        cls, plan: Plan, hosts: Sequence[Any], *, job_id: str, priority: str, **options: Any
    ) -> ManifestJob:
        """The manifest data of a job running ``plan`` (addressed to the cluster's devices), with the hosts'
        launch lines ``hosts`` (``distplan.lowering.launcher.HostCommand`` s made with ``endpoint=RDZV``);
        ``options``: the other fields (``image``, ``resource``, ...)."""
        kinds = sorted({s.kind for s in plan.stages})
        return cls(
            job_id=job_id,
            priority=priority,
            device_kind=",".join(kinds),
            devices=tuple(sorted(plan.devices_used)),
            plan_id=plan.id,
            layout=plan.layout,
            hosts=tuple(HostLaunch(h.node_rank, h.host_index, h.host, h.nproc, h.command) for h in hosts),
            **options,
        )


def dns_name(text: str) -> str:
    """``text`` as a DNS-1123 label (lower-case letters, digits, ``-``; at most 50 characters, leaving room
    for the pod index Kubernetes appends), prefixed ``distplan-``."""
    body = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-") or "job"
    return f"distplan-{body}"


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("distplan.presentation", "templates"),
        # YAML and shell, not markup: values are quoted by the filters below, never HTML-escaped.
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["yaml"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.filters["sh"] = lambda v: shlex.quote(str(v))
    return env


def render_manifest(job: ManifestJob, fmt: str) -> str:
    """The job as ``fmt`` (``k8s`` or ``slurm``: see the module docstring).

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"manifest format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ctx: dict[str, Any] = {
        "job": job,
        "name": job.name,
        "hosts": job.hosts,
        "max_nproc": max(h.nproc for h in job.hosts),
        "script": _k8s_script(job.hosts) if fmt == "k8s" else "",
        "gres": job.resource.rsplit("/", 1)[-1],
    }
    return _environment().get_template(FORMATS[fmt]).render(**ctx)


def _k8s_script(hosts: Sequence[HostLaunch]) -> str:
    """The pod's shell: the line of node rank ``$JOB_COMPLETION_INDEX``."""
    lines = ['case "$JOB_COMPLETION_INDEX" in']
    lines += [f"  {h.node_rank}) exec {h.command} ;;  # host {h.host} (index {h.host_index})" for h in hosts]
    lines += [
        '  *) echo "distplan: no host for pod index $JOB_COMPLETION_INDEX" >&2; exit 2 ;;',
        "esac",
    ]
    return "\n".join(lines) + "\n"
