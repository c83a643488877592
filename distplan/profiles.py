"""Load device kinds and cluster presets from YAML (``device_profiles/`` package data, or user files).

Errors name the file, the field and the value: ``a100.yaml: cluster.hosts[1].link.bandwidth_gbit_s: expected
a positive number, got -5``. YAML is read with ``yaml.safe_load`` only.

A cluster file may list calibration files (``distplan profile``) under ``calibrations:``, by paths relative to
the cluster file; they are read here and attached as in [Note: calibrated clusters] (``distplan.cluster``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from distplan.calibration import Calibration
from distplan.cluster import Cluster, DeviceKind
from distplan.errors import ProfileError

__all__ = ["device_kinds", "list_presets", "load_cluster", "preset_cluster"]

_PKG = "distplan.device_profiles"


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"{source}: not valid YAML: {e}") from e


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, DeviceKind]:
    src = "device_profiles/kinds.yaml"
    data = _read_yaml(resources.files(_PKG).joinpath("kinds.yaml").read_text(), src)
    if not isinstance(data, dict) or not isinstance(data.get("kinds"), list):
        raise ProfileError(f"{src}: expected a top-level 'kinds:' list")
    out: dict[str, DeviceKind] = {}
    for i, kd in enumerate(data["kinds"]):
        try:
            k = DeviceKind.from_dict(kd, f"kinds[{i}]")
        except ProfileError as e:
            raise ProfileError(f"{src}: {e}") from e
        if k.name in out:
            raise ProfileError(f"{src}: kinds[{i}]: duplicate device kind name {k.name!r}")
        out[k.name] = k
    return out


def device_kinds() -> dict[str, DeviceKind]:
    """The built-in catalogue of device kinds, by name."""
    return dict(_catalogue())


def _preset_files() -> dict[str, Any]:
    folder = resources.files(_PKG).joinpath("clusters")
    return {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    """Names of the built-in cluster presets, sorted."""
    return sorted(_preset_files())


@lru_cache(maxsize=64)
def preset_cluster(name: str) -> Cluster:
    """A built-in cluster preset by name."""
    files = _preset_files()
    if name not in files:
        raise ProfileError(f"unknown cluster preset {name!r}; presets: {', '.join(sorted(files))}")
    return _parse_cluster(files[name].read_text(), f"device_profiles/clusters/{name}.yaml")


def _parse_cluster(text: str, source: str, *, is_json: bool = False) -> Cluster:
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{source}: not valid JSON: {e}") from e
    else:
        data = _read_yaml(text, source)
    if isinstance(data, dict) and "cluster" in data and "hosts" not in data:
        data = data["cluster"]
    files: dict[int, str] = {}
    try:
        if isinstance(data, dict) and isinstance(data.get("calibrations"), list):
            base = Path(source).parent
            data = dict(data)
            loaded = []
            for i, c in enumerate(data["calibrations"]):
                if isinstance(c, str):
                    files[i] = c
                    c = Calibration.load(base / c).to_dict()
                loaded.append(c)
            data["calibrations"] = loaded
        return Cluster.from_dict(data, catalogue=_catalogue())
    except ProfileError as e:
        msg = str(e)
        for i, name in files.items():  # name the calibration file as well as its place in the list
            msg = msg.replace(f"calibrations[{i}]", f"calibrations[{i}] ({name})", 1)
        raise type(e)(f"{source}: {msg}") from e


def load_cluster(spec: str | Path | dict[str, Any] | Cluster) -> Cluster:
    """A cluster from a preset name, a YAML/JSON file path, an inline dict, or a :class:`Cluster`."""
    if isinstance(spec, Cluster):
        return spec
    if isinstance(spec, dict):
        return Cluster.from_dict(spec, catalogue=_catalogue())
    s = str(spec)
    p = Path(s)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        try:
            text = p.read_text()
        except OSError as e:
            raise ProfileError(f"cannot read cluster file {s!r}: {e.strerror}") from e
        return _parse_cluster(text, s, is_json=p.suffix == ".json")
    return preset_cluster(s)
