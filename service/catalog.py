"""What a plan request is checked against, known to the API process itself: no worker, no torch.

A request must get the same answer whatever the workers are doing: a bad request is a 4xx while the workers
still warm up, a good one is queued (``202``). So everything :mod:`distplan.service.specs` checks against is
here, made once when the app starts, in milliseconds:

- **built-in model names**: :data:`BUILTIN_MODELS`, a copy of ``distplan.tracer.list_models()`` shipped as
  data. The tracer's zoo lives in a module that imports torch (the API process does not, and must not pay
  its seconds and hundreds of MB); ``tests/service/test_catalog.py`` keeps the copy equal to the zoo, and a
  worker that reports a different list is logged at startup.
- **Hugging Face ``model_type`` values**: read from the installed transformers' own mapping
  (``CONFIG_MAPPING_NAMES``) by parsing its source files (:func:`hf_model_types`). Importing that mapping
  imports torch in transformers 5.x (``configuration_utils`` -> ``modeling_rope_utils``); parsing the
  literal tables takes ~50 ms. If a future transformers lays the mapping out in a way this reader does not
  follow, the reader gives up (logged) and the service checks only that ``model_type`` is a string; the
  worker's tracer then refuses an unknown type (a ``422`` on the plan).
- presets and device kinds come from ``distplan.profiles`` (YAML, no torch), graph structure from
  ``OpGraph.from_dict`` (plain Python): both already light, used directly by :mod:`~distplan.service.specs`.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_MODELS", "Catalog", "hf_model_types", "load_catalog"]

log = logging.getLogger("distplan.service")

# ``[m.to_dict() for m in distplan.tracer.list_models()]``, in the zoo's order (tests/service/test_catalog.py
# fails, printing the new list, when the zoo changes).
BUILTIN_MODELS: tuple[dict[str, Any], ...] = (
    {
        "name": "mlp",
        "family": "mlp",
        "kind": "regression",
        "description": "residual MLP, 8 blocks of width 4096 (545M)",
        "approx_params": 545000000,
    },
    {
        "name": "mlp-tiny",
        "family": "mlp",
        "kind": "regression",
        "description": "residual MLP, 3 blocks of width 32 (tests)",
        "approx_params": 13600,
    },
    {
        "name": "gpt",
        "family": "gpt",
        "kind": "causal-lm",
        "description": "hand-written GPT, 12 layers, width 768, tied embedding",
        "approx_params": 124500000,
    },
    {
        "name": "gpt-tiny",
        "family": "gpt",
        "kind": "causal-lm",
        "description": "hand-written GPT, 2 layers, width 32 (tests)",
        "approx_params": 46000,
    },
    {
        "name": "gpt2",
        "family": "gpt2",
        "kind": "causal-lm",
        "description": "Hugging Face GPT-2 small (124M)",
        "approx_params": 124400000,
    },
    {
        "name": "gpt2-tiny",
        "family": "gpt2",
        "kind": "causal-lm",
        "description": "Hugging Face GPT-2, 2 layers, width 64 (tests)",
        "approx_params": 149000,
    },
    {
        "name": "gpt2-xl",
        "family": "gpt2",
        "kind": "causal-lm",
        "description": "Hugging Face GPT-2 XL (1.5B)",
        "approx_params": 1558000000,
    },
    {
        "name": "llama-tiny",
        "family": "llama",
        "kind": "causal-lm",
        "description": "Hugging Face Llama, 2 layers, width 64, grouped-query attention (tests)",
        "approx_params": 107000,
    },
    {
        "name": "llama-7b",
        "family": "llama",
        "kind": "causal-lm",
        "description": "Llama-2-7B config: 32 layers, width 4096",
        "approx_params": 6738000000,
    },
    {
        "name": "llama-13b",
        "family": "llama",
        "kind": "causal-lm",
        "description": "Llama-2-13B config: 40 layers, width 5120",
        "approx_params": 13016000000,
    },
    {
        "name": "llama-70b",
        "family": "llama",
        "kind": "causal-lm",
        "description": "Llama-2-70B config: 80 layers, width 8192, grouped-query attention (8 KV heads)",
        "approx_params": 68977000000,
    },
    {
        "name": "bert-tiny",
        "family": "bert",
        "kind": "encoder",
        "description": "Hugging Face BERT encoder, 2 layers, width 64 (tests)",
        "approx_params": 133000,
    },
    {
        "name": "bert-base",
        "family": "bert",
        "kind": "encoder",
        "description": "Hugging Face BERT-base encoder (110M)",
        "approx_params": 108900000,
    },
)


@dataclass(frozen=True, slots=True)
class Catalog:
    """The built-in models and the Hugging Face model types a request may name.

    ``hf_model_types`` is ``None`` when the installed transformers' mapping could not be read (then only the
    worker's tracer checks the type); an empty set means transformers is not installed (every ``hf_config``
    is refused, naming the missing extra).
    """

    models: tuple[dict[str, Any], ...]
    hf_model_types: frozenset[str] | None

    @property
    def model_names(self) -> list[str]:
        """The built-in model names, in the zoo's order."""
        return [str(m["name"]) for m in self.models]

    def differences(self, worker: dict[str, Any]) -> list[str]:
        """How a worker's own catalogue (``{"models": [...], "hf_model_types": [...]}``) differs from this
        one, as readable lines (empty when they agree)."""
        out = []
        theirs = [str(m.get("name")) for m in worker.get("models", [])]
        if theirs != self.model_names:
            out.append(f"built-in models: the API knows {self.model_names}, the worker {theirs}")
        if self.hf_model_types is not None:
            wtypes = set(worker.get("hf_model_types", []))
            extra, missing = sorted(wtypes - self.hf_model_types), sorted(self.hf_model_types - wtypes)
            if extra or missing:
                out.append(
                    f"HF model types: {len(extra)} only the worker knows ({', '.join(extra[:5])}), "
                    f"{len(missing)} only the API knows ({', '.join(missing[:5])})"
                )
        return out


def load_catalog() -> Catalog:
    """The catalogue of this installation (see the module docstring)."""
    return Catalog(models=BUILTIN_MODELS, hf_model_types=hf_model_types())


# ---------------------------------------------------------------------------------------------- transformers
_MAPPING = "CONFIG_MAPPING_NAMES"


class _Unreadable(Exception):
    """The mapping's source is laid out in a way :func:`_read_mapping` does not follow."""


def hf_model_types() -> frozenset[str] | None:
    """The ``model_type`` values the installed transformers knows (the keys of
    ``transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES``), read from its source files
    without importing transformers; an empty set without transformers, ``None`` if unreadable."""
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    auto = Path(next(iter(spec.submodule_search_locations))) / "models" / "auto"
    try:
        return frozenset(_read_mapping(auto / "configuration_auto.py", auto, depth=0))
    except (OSError, SyntaxError, ValueError, _Unreadable) as e:
        log.warning(
            "cannot read the HF model types of this transformers (%s); hf_config model types are checked "
            "by the workers only",
            e,
        )
        return None


def _literal_keys(node: ast.expr) -> list[str]:
    """Keys of a literal dict, or of a literal list of ``(key, value)`` pairs."""
    value = ast.literal_eval(node)
    pairs = value.items() if isinstance(value, dict) else value
    keys = [k for k, _ in pairs]
    if not all(isinstance(k, str) for k in keys):
        raise _Unreadable("a model type that is not a string")
    return keys


def _mentions(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == _MAPPING for n in ast.walk(node))


def _read_mapping(path: Path, folder: Path, *, depth: int) -> list[str]:
    """Replay the module-level statements of ``path`` that build ``CONFIG_MAPPING_NAMES``: a literal
    ``OrderedDict([...])``/``{...}``, ``OrderedDict(**{...}, **CONFIG_MAPPING_NAMES)``, ``.update({...})``,
    and ``from .module import CONFIG_MAPPING_NAMES`` (read from that file). Anything else that touches the
    name raises :class:`_Unreadable`, so a layout this does not know is never half-read."""
    if depth > 3:
        raise _Unreadable("imports nest too deeply")
    keys: list[str] | None = None
    for stmt in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(stmt, ast.ImportFrom) and any(a.name == _MAPPING for a in stmt.names):
            if stmt.level != 1 or not stmt.module or any(a.asname for a in stmt.names):
                raise _Unreadable(f"{path.name}: import of {_MAPPING} from {stmt.module!r}")
            keys = _read_mapping(folder / f"{stmt.module}.py", folder, depth=depth + 1)
        elif (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id == _MAPPING
        ):
            call = stmt.value
            if isinstance(call, ast.Dict):
                keys = _literal_keys(call)
                continue
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id in ("OrderedDict", "dict")
            ):
                raise _Unreadable(f"{path.name}: {_MAPPING} assigned from {ast.dump(call)[:80]}")
            new: list[str] = []
            for arg in call.args:
                new += _literal_keys(arg)
            for kw in call.keywords:
                if kw.arg is not None:
                    new.append(kw.arg)
                elif isinstance(kw.value, ast.Name) and kw.value.id == _MAPPING and keys is not None:
                    new += keys
                else:
                    new += _literal_keys(kw.value)
            keys = new
        elif (
            isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Attribute)
            and isinstance(stmt.value.func.value, ast.Name)
            and stmt.value.func.value.id == _MAPPING
        ):
            if stmt.value.func.attr != "update" or keys is None or len(stmt.value.args) != 1:
                raise _Unreadable(f"{path.name}: {_MAPPING}.{stmt.value.func.attr}(...)")
            keys += _literal_keys(stmt.value.args[0])
        elif isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)) and any(
            _mentions(t) for t in getattr(stmt, "targets", [getattr(stmt, "target", None)]) if t is not None
        ):
            raise _Unreadable(f"{path.name}: line {stmt.lineno} changes {_MAPPING}")
    if keys is None:
        raise _Unreadable(f"{path.name} does not define {_MAPPING}")
    return keys
