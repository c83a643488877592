"""What every ``distplan`` command shares: writing its output files, refusing an unwritable output before
the long work starts, reading ``--set KEY=VALUE``, checking the trace size, and the options several
commands spell the same way.

The command modules (``distplan.presentation.*_cli``, ``distplan.<stage>.cli``) sit above this module and
the top-level CLI (``distplan.cli``) above them; nothing here imports a command module or the CLI, so no
import goes back up. The live progress line every long command shows is :mod:`.progress`.

Errors are :class:`~distplan.errors.DistplanError`: the CLI prints them as one paragraph and exits 2.
Imports only distplan's core and typer, so every command module can use it without slowing
``distplan --help``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from distplan.errors import DistplanError, ModelSpecError
from distplan.limits import REQUEST_RANGES

__all__ = [
    "check_output",
    "check_trace_size",
    "json_option",
    "model_option",
    "output_selector_option",
    "overrides_option",
    "parse_overrides",
    "write_output",
]


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the current folder for a relative path)."""
    p = path if path.is_absolute() else Path.cwd() / path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(path: Path, *, option: str, folder: bool = False) -> Path:
    """Refuse, before any long work, an output that cannot be written: ``path`` is an existing folder
    where a file is wanted (or a file where a ``folder`` is wanted), or its nearest existing ancestor is
    a file or not writable. Creates nothing (a refused command leaves no folders behind).

    Args:
        path: the file (or, with ``folder``, the folder) the command will write.
        option: the option that named it (``--out``), said in the message.
        folder: ``path`` is a folder the command fills (``distplan lower --out``).

    Returns ``path``. Raises :class:`DistplanError` naming the option, the path and what is wrong.
    """
    if path.exists():
        if folder and not path.is_dir():
            raise DistplanError(f"{option} {str(path)!r} is a file; give a folder")
        if not folder and path.is_dir():
            raise DistplanError(f"{option} {str(path)!r} is a folder; give a file name")
        target = path if folder else path.parent
    else:
        target = _first_existing(path.parent)
    if not target.is_dir():
        raise DistplanError(f"{option} {str(path)!r}: {str(target)!r} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise DistplanError(f"{option} {str(path)!r}: folder {str(target)!r} is not writable")
    return path


def write_output(path: Path, data: str | bytes, *, option: str | None = None) -> Path:
    """Write a command's output file, making its parent folders (text as UTF-8).

    Returns ``path``. Raises :class:`DistplanError` with one line naming the file (and ``option``) and
    the operating system's reason when it cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as e:
        named = f"{option} " if option else ""
        # One line: the OS reason is the message, so no "caused by" line repeats it.
        raise DistplanError(f"cannot write {named}{str(path)!r}: {e.strerror or e}") from None
    return path


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as a config-override mapping; VALUE is read as JSON (``2``, ``true``,
    ``[1, 2]``) and otherwise kept as a string (``hidden_act=gelu``).

    Raises :class:`~distplan.errors.ModelSpecError` for an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ModelSpecError(f"--set expects KEY=VALUE (e.g. num_hidden_layers=2), got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def check_trace_size(*, batch: int | None = None, seq: int | None = None) -> None:
    """Check the batch and sequence length a command traces at against the one table of accepted ranges
    (:data:`distplan.limits.REQUEST_RANGES`), before the model is built.

    Raises :class:`~distplan.errors.PlanError` with ``field`` ``batch`` or ``seq`` (the CLI says it as the
    option) and the range.
    """
    if batch is not None:
        REQUEST_RANGES["batch"].check("batch", batch)
    if seq is not None:
        REQUEST_RANGES["seq"].check("seq", seq)


# -------------------------------------------------------------------------- options several commands share
def json_option(what: str = "one JSON object instead of tables") -> Any:
    """``--json``: print ``what`` on stdout (and no progress line)."""
    return typer.Option(False, "--json", help=f"Print {what}.")


def model_option() -> Any:
    """``--model/-m`` (required): the model a plan was made for (``distplan lower``, ``distplan validate``)."""
    return typer.Option(
        ...,
        "--model",
        "-m",
        help="The model the plan was made for: built-in name, config.json path or package.module:function.",
    )


def overrides_option() -> Any:
    """``--set KEY=VALUE``, repeatable: model config overrides (read by :func:`parse_overrides`)."""
    return typer.Option(
        [],
        "--set",
        help="Override a model config field, KEY=VALUE (JSON value), repeatable, e.g. --set "
        "num_hidden_layers=2. Default: none.",
    )


def output_selector_option() -> Any:
    """``--output``: which model output the loss reads (``distplan.lowering.outputs``)."""
    return typer.Option(
        None,
        "--output",
        help=(
            "Which model output the loss reads when the model returns a dict, tuple or dataclass: a path of "
            "keys/indices/fields joined by dots, e.g. logits, 0, aux.loss. Default: the 'logits' entry, "
            "else the first tensor."
        ),
    )
