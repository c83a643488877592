"""A simulated (or measured) pipeline timeline: one row per device, events with start and end times.

The simulator (``distplan.planner.simulate``) produces it; the report page and the service draw it;
``to_chrome_trace`` writes the Chrome-trace / Perfetto JSON format (one process per host, one thread per
device).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from distplan._serde import get_float, get_int, get_list, get_map, get_str, read_json_file
from distplan.errors import PlanError

__all__ = ["EVENT_KINDS", "Timeline", "TimelineEvent"]

#: fwd/bwd: compute of one microbatch; send: activations or gradients to the neighbour stage;
#: allreduce: data-parallel gradient all-reduce; optimizer: the optimizer step.
EVENT_KINDS = ("fwd", "bwd", "send", "allreduce", "optimizer")


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    device: int
    stage: int
    kind: str
    microbatch: int
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise PlanError(f"timeline event kind must be one of {', '.join(EVENT_KINDS)}, got {self.kind!r}")
        if self.end_s < self.start_s:
            raise PlanError(f"timeline event ends ({self.end_s}) before it starts ({self.start_s})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "stage": self.stage,
            "kind": self.kind,
            "microbatch": self.microbatch,
            "start_s": self.start_s,
            "end_s": self.end_s,
        }


@dataclass(frozen=True, slots=True)
class Timeline:
    """Events of one training iteration.

    Attributes:
        events: every event, sorted by (device, start).
        devices: the device indices shown (rows), in display order.
        labels: a label per device row, e.g. ``a100-node:3 (a100-sxm-80g) stage 1``.
        iteration_time_s: end of the last event.
        bubble_fraction: idle share of the used devices' time within the iteration.
    """

    events: tuple[TimelineEvent, ...]
    devices: tuple[int, ...]
    labels: tuple[str, ...]
    iteration_time_s: float
    bubble_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": [e.to_dict() for e in self.events],
            "devices": list(self.devices),
            "labels": list(self.labels),
            "iteration_time_s": self.iteration_time_s,
            "bubble_fraction": self.bubble_fraction,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Timeline:
        m = get_map(d, "timeline", PlanError)
        events = []
        for i, e in enumerate(get_list(m, "events", "timeline", PlanError)):
            p = f"timeline.events[{i}]"
            em = get_map(e, p, PlanError)
            events.append(
                TimelineEvent(
                    device=get_int(em, "device", p, PlanError),
                    stage=get_int(em, "stage", p, PlanError),
                    kind=get_str(em, "kind", p, PlanError),
                    microbatch=get_int(em, "microbatch", p, PlanError, minimum=-1),
                    start_s=get_float(em, "start_s", p, PlanError),
                    end_s=get_float(em, "end_s", p, PlanError),
                )
            )
        return cls(
            events=tuple(events),
            devices=tuple(int(x) for x in get_list(m, "devices", "timeline", PlanError)),
            labels=tuple(str(x) for x in get_list(m, "labels", "timeline", PlanError)),
            iteration_time_s=get_float(m, "iteration_time_s", "timeline", PlanError),
            bubble_fraction=get_float(m, "bubble_fraction", "timeline", PlanError),
        )

    def to_chrome_trace(self) -> dict[str, Any]:
        """Chrome-trace JSON (open in https://ui.perfetto.dev or chrome://tracing); times in microseconds."""
        row = {d: i for i, d in enumerate(self.devices)}
        trace: list[dict[str, Any]] = []
        for d, label in zip(self.devices, self.labels, strict=True):
            trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": row[d], "args": {"name": label}})
        for e in self.events:
            name = f"{e.kind} mb{e.microbatch}" if e.microbatch >= 0 else e.kind
            trace.append(
                {
                    "name": name,
                    "cat": e.kind,
                    "ph": "X",
                    "pid": 0,
                    "tid": row.get(e.device, e.device),
                    "ts": e.start_s * 1e6,
                    "dur": (e.end_s - e.start_s) * 1e6,
                    "args": {"stage": e.stage, "microbatch": e.microbatch},
                }
            )
        other = {
            "devices": list(self.devices),
            "labels": list(self.labels),
            "iteration_time_s": self.iteration_time_s,
            "bubble_fraction": self.bubble_fraction,
        }
        return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": other}

    @classmethod
    def from_chrome_trace(cls, d: Any) -> Timeline:
        """Read back what :meth:`to_chrome_trace` wrote (its ``otherData`` keeps the rows and totals)."""
        m = get_map(d, "timeline", PlanError)
        other = get_map(m.get("otherData"), "timeline.otherData", PlanError)
        devices = [int(x) for x in get_list(other, "devices", "timeline.otherData", PlanError)]
        events = []
        for i, e in enumerate(get_list(m, "traceEvents", "timeline", PlanError)):
            p = f"timeline.traceEvents[{i}]"
            em = get_map(e, p, PlanError)
            if em.get("ph") != "X":
                continue
            row = get_int(em, "tid", p, PlanError)
            if row >= len(devices):
                raise PlanError(f"{p}.tid: row {row} is out of range of {len(devices)} devices")
            args = get_map(em.get("args", {}), f"{p}.args", PlanError)
            start = get_float(em, "ts", p, PlanError) / 1e6
            events.append(
                TimelineEvent(
                    device=devices[row],
                    stage=get_int(args, "stage", f"{p}.args", PlanError),
                    kind=get_str(em, "cat", p, PlanError),
                    microbatch=get_int(args, "microbatch", f"{p}.args", PlanError, minimum=-1),
                    start_s=start,
                    end_s=start + get_float(em, "dur", p, PlanError) / 1e6,
                )
            )
        return cls.from_dict({**other, "events": [e.to_dict() for e in events]})

    @classmethod
    def load(cls, path: Any) -> Timeline:
        """A timeline file in either form: :meth:`to_dict` or the Chrome trace of ``distplan simulate``."""
        data = read_json_file(path, PlanError, "timeline")
        try:
            if isinstance(data, dict) and "traceEvents" in data:
                return cls.from_chrome_trace(data)
            return cls.from_dict(data)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from e

    def to_chrome_trace_json(self) -> str:
        return json.dumps(self.to_chrome_trace())
