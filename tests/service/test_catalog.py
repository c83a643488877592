"""The API process's own catalogue: equal to what the workers know, read without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distplan.service.catalog import BUILTIN_MODELS, Catalog, _read_mapping, _Unreadable, load_catalog


def test_builtin_models_are_the_tracer_zoo() -> None:
    from distplan.tracer import list_models

    zoo = [m.to_dict() for m in list_models()]
    assert list(BUILTIN_MODELS) == zoo, (
        "distplan/service/catalog.py BUILTIN_MODELS is stale; set it to:\n" + json.dumps(zoo, indent=4)
    )


def test_hf_model_types_are_the_installed_transformers_mapping() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    types = load_catalog().hf_model_types
    assert types == frozenset(CONFIG_MAPPING_NAMES)
    assert {"llama", "gpt2", "bert", "t5"} <= types


def test_worker_and_api_catalogues_agree() -> None:
    from distplan.service.work import catalog

    assert load_catalog().differences(catalog()) == []
    stale = Catalog(models=BUILTIN_MODELS[:-1], hf_model_types=frozenset({"llama"}))
    lines = stale.differences(catalog())
    assert len(lines) == 2 and "bert-base" in lines[0] and "only the worker knows" in lines[1]


def test_checking_requests_imports_no_torch() -> None:
    # A fresh interpreter, as the API process: build the app, read the catalogue, check one request of each
    # model form. None of it may import torch or transformers (seconds and hundreds of MB per import).
    code = """
import sys
from distplan.service.app import create_app
from distplan.service.catalog import load_catalog
from distplan.service.models import PlanCreate
from distplan.service.settings import Settings
from distplan.service.specs import plan_spec

create_app(Settings())
cat = load_catalog()
node = {"name": "a", "op": "call_function", "target": "aten.mm", "inputs": [],
        "outputs": [{"shape": [4, 4], "dtype": "float32", "nbytes": 64}], "fwd_flops": 1, "bwd_flops": 2}
graph = {"schema_version": 1, "name": "g", "nodes": [node], "outputs": ["a"], "param_bytes": 0}
for model in ({"builtin": "gpt-tiny"}, {"hf_config": {"model_type": "llama"}}, {"graph": graph}):
    body = PlanCreate.model_validate({"model": model, "cluster": "a100x4-t4x4", "global_batch": 8})
    plan_spec(body, settings=Settings(), catalog=cat)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules), len(cat.hf_model_types))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    imported, n_types = r.stdout.split("]")
    assert imported == "[", r.stdout
    assert int(n_types) > 100


def test_mapping_reader_follows_known_layouts_and_refuses_others(tmp_path: Path) -> None:
    (tmp_path / "tables.py").write_text(
        "from collections import OrderedDict\nCONFIG_MAPPING_NAMES = OrderedDict([('a', 'A'), ('b', 'B')])\n"
    )
    (tmp_path / "auto.py").write_text(
        "from .tables import CONFIG_MAPPING_NAMES\n"
        "CONFIG_MAPPING_NAMES.update({'c': 'C'})\n"
        "CONFIG_MAPPING_NAMES = OrderedDict(**{'z': 'Z'}, **CONFIG_MAPPING_NAMES)\n"
    )
    assert _read_mapping(tmp_path / "auto.py", tmp_path, depth=0) == ["z", "a", "b", "c"]
    # A layout the reader does not follow is refused whole, never half-read.
    for source in (
        "CONFIG_MAPPING_NAMES = build_it()\n",
        "CONFIG_MAPPING_NAMES = {'a': 'A'}\nCONFIG_MAPPING_NAMES['b'] = 'B'\n",
        "CONFIG_MAPPING_NAMES = {'a': 'A'}\nCONFIG_MAPPING_NAMES.pop('a')\n",
        "OTHER = {}\n",
    ):
        (tmp_path / "odd.py").write_text(source)
        with pytest.raises(_Unreadable):
            _read_mapping(tmp_path / "odd.py", tmp_path, depth=0)
