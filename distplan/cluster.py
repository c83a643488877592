"""Device kinds, hosts and links: the heterogeneous cluster a plan runs on.

Internally every quantity is in SI units (bytes, bytes/s, FLOP/s, seconds). The YAML profiles under
``device_profiles/`` use human units; :meth:`DeviceKind.from_dict` and :meth:`Cluster.from_dict` accept
both spellings of each field (exactly one of them), e.g. ``memory_gib: 80`` or ``memory_bytes: 85899345920``,
``bandwidth_gbit_s: 100`` or ``bandwidth_gbyte_s: 12.5`` or ``bandwidth_bytes_s: 1.25e10``.
``to_dict`` always writes the SI spelling, which reads back exactly.

[Note: calibrated clusters]
A device kind and a link may carry measured figures (``DeviceKind.calibration``, ``Link.calibration``; see
``distplan.calibration``), which the cost model prefers to the datasheet. A cluster description gets them
from a top-level ``calibrations:`` list of calibration files (``distplan profile``; paths are read by
``distplan.profiles.load_cluster`` relative to the YAML file) or of their contents inline
(:meth:`Cluster.from_dict`, the REST door), or in Python from :meth:`Cluster.calibrated`. A calibration's
device part goes to the kind it names; its link part, when measured between ranks of one host
(``intra-host``), to the link of every host whose devices are all of that kind, and when measured between
hosts (``network``), to the network. ``to_dict`` writes each part with the kind or link it belongs to, so
the cluster (and a plan holding it) reads back with the same figures; an uncalibrated cluster's dictionary
has no calibration keys at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from distplan._serde import canonical_hash, get_float, get_int, get_list, get_map, get_str
from distplan.calibration import Calibration, DeviceCalibration, LinkCalibration
from distplan.errors import CalibrationError, ProfileError

__all__ = ["ATTENTION", "DTYPES", "Cluster", "Device", "DeviceKind", "Host", "Link"]

#: Compute dtypes a device kind may list peak FLOP/s for.
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
#: Attention implementations a device kind runs: ``fused`` kernels (flash / memory-efficient) keep no
#: score matrix; ``math`` stores the ``seq x seq`` scores and probabilities for the backward.
ATTENTION = ("fused", "math")

GIB = 1024**3
_E = ProfileError


def _one_of(m: Mapping[str, Any], path: str, options: Mapping[str, float], *, positive: bool = True) -> float:
    """Read exactly one of several unit spellings of a quantity; return it in SI units."""
    present = [k for k in options if k in m]
    if len(present) != 1:
        names = " or ".join(options)
        if not present:
            raise _E(f"{path}: missing field {names}")
        raise _E(f"{path}: give only one of {', '.join(present)}")
    key = present[0]
    return get_float(m, key, path, _E, positive=positive, minimum=0.0) * options[key]


@dataclass(frozen=True, slots=True)
class Link:
    """A link between devices: ``time(bytes) = latency_s + bytes / bandwidth_bytes_s`` by the datasheet, or
    the measured times of ``calibration`` when it has one (see [Note: calibrated clusters])."""

    bandwidth_bytes_s: float
    latency_s: float = 0.0
    calibration: LinkCalibration | None = None

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_s > 0:
            raise _E(f"link bandwidth must be > 0 bytes/s, got {self.bandwidth_bytes_s}")
        if self.latency_s < 0:
            raise _E(f"link latency must be >= 0 s, got {self.latency_s}")

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_s if nbytes > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bandwidth_bytes_s": self.bandwidth_bytes_s, "latency_s": self.latency_s}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any, path: str = "link") -> Link:
        m = get_map(d, path, _E)
        bw = _one_of(
            m, path, {"bandwidth_bytes_s": 1.0, "bandwidth_gbyte_s": 1e9, "bandwidth_gbit_s": 1e9 / 8}
        )
        if "latency_s" in m or "latency_us" in m:
            lat = _one_of(m, path, {"latency_s": 1.0, "latency_us": 1e-6}, positive=False)
        else:
            lat = 0.0
        cal = None
        if m.get("calibration") is not None:
            cal = LinkCalibration.from_dict(m["calibration"], f"{path}.calibration")
        return cls(bandwidth_bytes_s=bw, latency_s=lat, calibration=cal)


@dataclass(frozen=True, slots=True)
class DeviceKind:
    """One kind of accelerator, with datasheet figures.

    Attributes:
        name: catalogue name, e.g. ``a100-sxm-80g``.
        memory_bytes: device memory capacity.
        memory_bandwidth_bytes_s: device memory bandwidth.
        peak_flops: dense peak FLOP/s per compute dtype (keys from :data:`DTYPES`); a dtype the device has no
            fast path for is absent and costed at the ``fp32`` rate.
        efficiency: fraction of peak a real training kernel mix achieves (0 < e <= 1).
        memory_reserved_bytes: memory not available to the model (CUDA context, allocator slack).
        calibration: measured figures (``distplan profile``) the cost model uses instead of the datasheet
            for the op classes and precisions they cover; None when never measured.
        attention: the attention kernel the kind runs by default (:data:`ATTENTION`); a calibration's
            measured kernel overrides it (:attr:`fused_attention`).
        vendor / description: free text.
    """

    name: str
    memory_bytes: int
    memory_bandwidth_bytes_s: float
    peak_flops: Mapping[str, float]
    efficiency: float = 0.5
    memory_reserved_bytes: int = 0
    calibration: DeviceCalibration | None = None
    attention: str = "fused"
    vendor: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        p = f"device kind {self.name!r}"
        if self.memory_bytes <= 0:
            raise _E(f"{p}: memory must be > 0, got {self.memory_bytes} bytes")
        if not self.memory_bandwidth_bytes_s > 0:
            raise _E(f"{p}: memory bandwidth must be > 0, got {self.memory_bandwidth_bytes_s}")
        if "fp32" not in self.peak_flops:
            raise _E(f"{p}: peak_flops must list fp32 (found {sorted(self.peak_flops)})")
        for k, v in self.peak_flops.items():
            if k not in DTYPES:
                raise _E(f"{p}: peak_flops has unknown dtype {k!r}; known: {', '.join(DTYPES)}")
            if not v > 0:
                raise _E(f"{p}: peak_flops.{k} must be > 0, got {v}")
        if not 0 < self.efficiency <= 1:
            raise _E(f"{p}: efficiency must be in (0, 1], got {self.efficiency}")
        if not 0 <= self.memory_reserved_bytes < self.memory_bytes:
            raise _E(
                f"{p}: memory_reserved must be in [0, memory), got {self.memory_reserved_bytes} of {self.memory_bytes}"
            )
        if self.attention not in ATTENTION:
            raise _E(f"{p}: attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")

    @property
    def usable_memory_bytes(self) -> int:
        return self.memory_bytes - self.memory_reserved_bytes

    @property
    def fused_attention(self) -> bool:
        """Whether attention runs a fused kernel (no stored score matrix): measured when calibrated."""
        if self.calibration is not None:
            return self.calibration.fused_attention
        return self.attention == "fused"

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype (``fp32`` rate where the device has no fast path)."""
        return self.peak_flops.get(dtype, self.peak_flops["fp32"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "memory_bandwidth_bytes_s": self.memory_bandwidth_bytes_s,
            "peak_flops": dict(self.peak_flops),
            "efficiency": self.efficiency,
            "memory_reserved_bytes": self.memory_reserved_bytes,
            **({} if self.calibration is None else {"calibration": self.calibration.to_dict()}),
            **({} if self.attention == "fused" else {"attention": self.attention}),
            "vendor": self.vendor,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "kind") -> DeviceKind:
        m = get_map(d, path, _E)
        name = get_str(m, "name", path, _E)
        path = f"{path}[{name}]"
        mem = _one_of(m, path, {"memory_bytes": 1.0, "memory_gib": GIB, "memory_gb": 1e9})
        bw = _one_of(m, path, {"memory_bandwidth_bytes_s": 1.0, "memory_bandwidth_gbyte_s": 1e9})
        if ("peak_flops" in m) == ("peak_tflops" in m):
            raise _E(f"{path}: give exactly one of peak_flops or peak_tflops")
        key, scale = ("peak_flops", 1.0) if "peak_flops" in m else ("peak_tflops", 1e12)
        pf = get_map(m[key], f"{path}.{key}", _E)
        peak = {
            k: get_float(pf, k, f"{path}.{key}", _E, positive=True) * scale for k in pf if pf[k] is not None
        }
        reserved = 0.0
        if "memory_reserved_bytes" in m or "memory_reserved_gib" in m:
            reserved = _one_of(
                m, path, {"memory_reserved_bytes": 1.0, "memory_reserved_gib": GIB}, positive=False
            )
        cal = _device_calibration(m.get("calibration"), f"{path}.calibration")
        try:
            return cls(
                name=name,
                memory_bytes=int(mem),
                memory_bandwidth_bytes_s=bw,
                peak_flops=peak,
                efficiency=get_float(m, "efficiency", path, _E, 0.5, positive=True),
                memory_reserved_bytes=int(reserved),
                calibration=cal,
                attention=get_str(m, "attention", path, _E, "fused"),
                vendor=get_str(m, "vendor", path, _E, ""),
                description=get_str(m, "description", path, _E, ""),
            )
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from e


def _device_calibration(raw: Any, path: str) -> DeviceCalibration | None:
    """A kind's ``calibration`` field: measured figures, or nothing (``null``, or the empty mapping older
    files carry); the efficiency factors earlier versions took there are refused with what to do instead."""
    if raw is None or (isinstance(raw, Mapping) and not raw):
        return None
    m = get_map(raw, path, _E)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values()):
        raise CalibrationError(
            f"{path}: per-class correction factors ({', '.join(sorted(m))}) are no longer read; measure the "
            "kind with `distplan profile` and list the file under the cluster's `calibrations:`"
        )
    return DeviceCalibration.from_dict(m, path)


@dataclass(frozen=True, slots=True)
class Host:
    """A host: its devices (kind name per local index) and the link between devices inside it."""

    name: str
    devices: tuple[str, ...]
    link: Link

    def to_dict(self) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        for k in self.devices:
            if groups and groups[-1]["kind"] == k:
                groups[-1]["count"] += 1
            else:
                groups.append({"kind": k, "count": 1})
        return {"name": self.name, "devices": groups, "link": self.link.to_dict()}


@dataclass(frozen=True, slots=True)
class Device:
    """One device of a cluster. ``index`` is its global index: hosts in order, then local index."""

    index: int
    host_index: int
    host: str
    local_index: int
    kind: str

    @property
    def label(self) -> str:
        return f"{self.host}:{self.local_index}"


@dataclass(frozen=True, slots=True)
class Cluster:
    """A heterogeneous cluster: device kinds, hosts and the network between hosts."""

    name: str
    kinds: Mapping[str, DeviceKind]
    hosts: tuple[Host, ...]
    network: Link
    description: str = ""

    def __post_init__(self) -> None:
        p = f"cluster {self.name!r}"
        if not self.hosts:
            raise _E(f"{p}: has no hosts")
        seen: set[str] = set()
        for i, h in enumerate(self.hosts):
            if not h.name:
                raise _E(f"{p}: hosts[{i}] has an empty name")
            if h.name in seen:
                raise _E(f"{p}: duplicate host name {h.name!r}")
            seen.add(h.name)
            for k in h.devices:
                if k not in self.kinds:
                    raise _E(
                        f"{p}: host {h.name!r} uses unknown device kind {k!r}; known: {', '.join(sorted(self.kinds))}"
                    )
        if not any(h.devices for h in self.hosts):
            raise _E(f"{p}: has no devices")

    # ------------------------------------------------------------------ queries
    def devices(self) -> tuple[Device, ...]:
        out: list[Device] = []
        for hi, h in enumerate(self.hosts):
            for li, k in enumerate(h.devices):
                out.append(Device(len(out), hi, h.name, li, k))
        return tuple(out)

    @property
    def num_devices(self) -> int:
        return sum(len(h.devices) for h in self.hosts)

    def kind_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in self.hosts:
            for k in h.devices:
                counts[k] = counts.get(k, 0) + 1
        return counts

    def link(self, host_a: int, host_b: int) -> Link:
        """The link between two hosts (the host's own link when they are the same)."""
        return self.hosts[host_a].link if host_a == host_b else self.network

    def total_memory_bytes(self) -> int:
        return sum(self.kinds[d.kind].usable_memory_bytes for d in self.devices())

    # ------------------------------------------------------------------ calibrations
    def calibrated(self, *calibrations: Calibration) -> Cluster:
        """This cluster with the measured figures of ``calibrations`` attached (see [Note: calibrated
        clusters]).

        Raises:
            CalibrationError: naming the field: a calibration of a kind this cluster does not use, two of
                one kind, or an intra-host link part that fits no host (no host is all of that kind).
        """
        kinds = dict(self.kinds)
        hosts = list(self.hosts)
        network = self.network
        seen: dict[str, int] = {}
        for i, cal in enumerate(calibrations):
            where = f"calibrations[{i}]"
            wants_kind = cal.device is not None or (cal.link is not None and cal.link.scope == "intra-host")
            if wants_kind and cal.kind not in kinds:
                raise CalibrationError(
                    f"{where}.kind: device kind {cal.kind!r} is not used by cluster {self.name!r} (its kinds: "
                    f"{', '.join(sorted(kinds))}); name the kind with distplan profile --kind"
                )
            if cal.device is not None:
                if cal.kind in seen:
                    raise CalibrationError(
                        f"{where}.kind: a second calibration of device kind {cal.kind!r} "
                        f"(calibrations[{seen[cal.kind]}] is one already)"
                    )
                seen[cal.kind] = i
                kinds[cal.kind] = replace(kinds[cal.kind], calibration=cal.device)
            if cal.link is not None:
                if cal.link.scope == "network":
                    network = replace(network, calibration=cal.link)
                    continue
                fits = [j for j, h in enumerate(hosts) if set(h.devices) == {cal.kind}]
                if not fits:
                    raise CalibrationError(
                        f"{where}.link: measured inside a host of {cal.kind!r} devices, but no host of cluster "
                        f"{self.name!r} holds only {cal.kind!r} devices"
                    )
                for j in fits:
                    hosts[j] = replace(hosts[j], link=replace(hosts[j].link, calibration=cal.link))
        if len(self.hosts) == 1 and self.network == self.hosts[0].link:
            network = hosts[0].link  # one host: its link is the network
        return replace(self, kinds=kinds, hosts=tuple(hosts), network=network)

    def calibration_report(self) -> dict[str, str]:
        """Where the cost model's figures come from, per device kind and link: ``calibrated`` (with the
        measured classes and the source) or ``datasheet``."""
        out: dict[str, str] = {}
        for name in sorted(self.kinds):
            c = self.kinds[name].calibration
            out[f"kind {name}"] = (
                "datasheet"
                if c is None
                else f"calibrated ({', '.join(c.classes())}; matmul {', '.join(c.matmul)}) {c.source}".strip()
            )
        links = [(f"host {h.name} link", h.link) for h in self.hosts]
        if len(self.hosts) > 1:
            links.append(("network", self.network))
        for name, lk in links:
            lc = lk.calibration
            out[name] = (
                "datasheet"
                if lc is None
                else f"calibrated ({lc.scope} over {lc.backend}) {lc.source}".strip()
            )
        return out

    @property
    def content_hash(self) -> str:
        return canonical_hash(self.to_dict())

    # ------------------------------------------------------------------ serde
    def to_dict(self) -> dict[str, Any]:
        """The cluster in SI units; calibrations ride with the kinds and links they belong to."""
        used = sorted({k for h in self.hosts for k in h.devices})
        return {
            "name": self.name,
            "description": self.description,
            "kinds": [self.kinds[k].to_dict() for k in used],
            "hosts": [h.to_dict() for h in self.hosts],
            "network": self.network.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(
        cls, d: Any, *, catalogue: Mapping[str, DeviceKind] | None = None, path: str = "cluster"
    ) -> Cluster:
        """Build a cluster; ``kinds`` may be given inline or taken from ``catalogue`` by name.

        A host may be repeated with ``repeat: N`` (names get ``-0``, ``-1``, ... suffixes). A top-level
        ``calibrations`` list holds calibrations' contents (see [Note: calibrated clusters]); file paths there
        are read by ``distplan.profiles.load_cluster`` from a cluster file, never here.
        """
        m = get_map(d, path, _E)
        name = get_str(m, "name", path, _E)
        kinds: dict[str, DeviceKind] = dict(catalogue or {})
        raw_kinds = m.get("kinds", [])
        if isinstance(raw_kinds, Mapping):
            raw_kinds = [{"name": k, **get_map(v, f"{path}.kinds.{k}", _E)} for k, v in raw_kinds.items()]
        if not isinstance(raw_kinds, list):
            raise _E(f"{path}.kinds: expected a list of device kinds, got {type(raw_kinds).__name__}")
        for i, kd in enumerate(raw_kinds):
            k = DeviceKind.from_dict(kd, f"{path}.kinds[{i}]")
            kinds[k.name] = k
        hosts: list[Host] = []
        for i, hd in enumerate(get_list(m, "hosts", path, _E)):
            hp = f"{path}.hosts[{i}]"
            hm = get_map(hd, hp, _E)
            hname = get_str(hm, "name", hp, _E)
            raw_devs = hm.get("devices")
            if isinstance(raw_devs, Mapping):
                raw_devs = [raw_devs]
            if not isinstance(raw_devs, list) or not raw_devs:
                raise _E(f"{hp}.devices: expected a non-empty list of {{kind, count}}, got {raw_devs!r}")
            devs: list[str] = []
            for j, g in enumerate(raw_devs):
                gp = f"{hp}.devices[{j}]"
                gm = get_map(g, gp, _E)
                kname = get_str(gm, "kind", gp, _E)
                if kname not in kinds:
                    raise _E(f"{gp}.kind: unknown device kind {kname!r}; known: {', '.join(sorted(kinds))}")
                count = get_int(gm, "count", gp, _E, 1, minimum=1)
                if count > 4096:
                    raise _E(f"{gp}.count: at most 4096 devices per host, got {count}")
                devs.extend([kname] * count)
            if "link" not in hm:
                raise _E(
                    f"{hp}.link: missing (the intra-host link, e.g. {{bandwidth_gbyte_s: 300, latency_us: 5}})"
                )
            link = Link.from_dict(hm["link"], f"{hp}.link")
            repeat = get_int(hm, "repeat", hp, _E, 1, minimum=1)
            if repeat > 1024:
                raise _E(f"{hp}.repeat: at most 1024, got {repeat}")
            for r in range(repeat):
                hosts.append(Host(f"{hname}-{r}" if repeat > 1 else hname, tuple(devs), link))
        if "network" in m:
            network = Link.from_dict(m["network"], f"{path}.network")
        elif len(hosts) == 1:
            network = hosts[0].link
        else:
            raise _E(f"{path}.network: missing (the link between hosts, e.g. {{bandwidth_gbit_s: 100}})")
        used = {k for h in hosts for k in h.devices}
        cluster = cls(
            name=name,
            kinds={k: v for k, v in kinds.items() if k in used},
            hosts=tuple(hosts),
            network=network,
            description=get_str(m, "description", path, _E, ""),
        )
        raw_cals = get_list(m, "calibrations", path, _E, [])
        cals = []
        for i, c in enumerate(raw_cals):
            cp = f"{path}.calibrations[{i}]"
            if isinstance(c, str):
                raise CalibrationError(
                    f"{cp}: {c[:80]!r} is a file name; calibration files are read when the cluster comes from a "
                    "cluster file (load_cluster), otherwise give the calibration's contents (or, over REST, the "
                    "id of an uploaded calibration)"
                )
            cals.append(Calibration.from_dict(c, cp))
        if not cals:
            return cluster
        try:
            return cluster.calibrated(*cals)
        except CalibrationError as e:
            raise CalibrationError(f"{path}.{e}") from e

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ProfileError(f"cluster JSON is not valid JSON: {e}") from e
