"""Small helpers for checked ``from_dict`` conversions of JSON data that may come from the network.

Every getter names the field path and the value it found, so a malformed document gives a message like
``graph.nodes[12].fwd_flops: expected a non-negative integer, got -3``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "canonical_hash",
    "get_bool",
    "get_float",
    "get_int",
    "get_list",
    "get_map",
    "get_str",
    "load_json",
    "read_json_file",
]


def _fail(exc: type[Exception], path: str, what: str, value: Any) -> Exception:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return exc(f"{path}: expected {what}, got {shown}")


def get_map(d: Any, path: str, exc: type[Exception]) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise _fail(exc, path, "an object", d)
    return d


def _field(d: Mapping[str, Any], key: str, path: str, exc: type[Exception], default: Any) -> Any:
    if key in d:
        return d[key]
    if default is _REQUIRED:
        raise exc(f"{path}.{key}: missing required field")
    return default


_REQUIRED = object()


def get_str(d: Mapping[str, Any], key: str, path: str, exc: type[Exception], default: Any = _REQUIRED) -> str:
    v = _field(d, key, path, exc, default)
    if not isinstance(v, str):
        raise _fail(exc, f"{path}.{key}", "a string", v)
    return v


def get_int(
    d: Mapping[str, Any],
    key: str,
    path: str,
    exc: type[Exception],
    default: Any = _REQUIRED,
    *,
    minimum: int | None = 0,
) -> int:
    v = _field(d, key, path, exc, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(exc, f"{path}.{key}", "an integer", v)
    if minimum is not None and v < minimum:
        raise _fail(exc, f"{path}.{key}", f"an integer >= {minimum}", v)
    return v


def get_float(
    d: Mapping[str, Any],
    key: str,
    path: str,
    exc: type[Exception],
    default: Any = _REQUIRED,
    *,
    minimum: float | None = 0.0,
    positive: bool = False,
) -> float:
    v = _field(d, key, path, exc, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(exc, f"{path}.{key}", "a finite number", v)
    if positive and v <= 0:
        raise _fail(exc, f"{path}.{key}", "a positive number", v)
    if minimum is not None and v < minimum:
        raise _fail(exc, f"{path}.{key}", f"a number >= {minimum}", v)
    return float(v)


def get_bool(
    d: Mapping[str, Any], key: str, path: str, exc: type[Exception], default: Any = _REQUIRED
) -> bool:
    v = _field(d, key, path, exc, default)
    if not isinstance(v, bool):
        raise _fail(exc, f"{path}.{key}", "true or false", v)
    return v


def get_list(
    d: Mapping[str, Any], key: str, path: str, exc: type[Exception], default: Any = _REQUIRED
) -> list[Any]:
    v = _field(d, key, path, exc, default)
    if not isinstance(v, (list, tuple)):
        raise _fail(exc, f"{path}.{key}", "a list", v)
    return list(v)


def canonical_hash(obj: Any) -> str:
    """SHA-256 (hex, first 16 bytes) of the canonical JSON form of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_json(text: str, exc: type[Exception], what: str) -> Any:
    """Parse JSON text, raising ``exc`` that names ``what`` (e.g. ``plan``) and where the syntax broke."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise exc(f"{what} JSON is not valid JSON: {e}") from e


def read_json_file(path: Any, exc: type[Exception], what: str) -> Any:
    """Read and parse a JSON file; errors name the file."""
    from pathlib import Path

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise exc(f"cannot read {what} file {str(p)!r}: {e.strerror}") from e
    try:
        return load_json(text, exc, what)
    except exc as e:
        raise exc(f"{p}: {e}") from e
