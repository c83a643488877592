"""Every command refuses a bad option before its long work, named as the option, and writes its output
one way (``distplan.presentation.cli_support``): parent folders made, an unwritable path one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distplan.errors import DistplanError
from distplan.presentation.cli_support import check_output, parse_overrides, write_output

# Runs each command line through the real entry point in one process, then says whether torch was loaded:
# a refusal that comes before tracing loads none of it.
_RUN_ALL = r"""
import contextlib, io, json, sys
from distplan.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    results.append({"argv": argv, "code": code, "err": err.getvalue()})
print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""


def test_bad_options_are_refused_before_any_tracing_and_named_as_options(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    cases = {
        # PlanRequest fields, built through distplan.request.as_request before the model is traced.
        ("plan", "gpt2-xl", "--global-batch", "10", "--microbatches", "3"): "error: --microbatches: ",
        ("plan", "gpt2-xl", "--time-limit", "0"): "error: --time-limit: ",
        ("plan", "gpt2-xl", "--schedule", "zigzag"): "error: --schedule: ",
        ("plan", "gpt2-xl", "--cluster", "no-such-preset"): "no-such-preset",
        ("plan", "gpt2-xl", "--recompute", "none,sometimes"): "error: --recompute: ",
        ("plan", "gpt2-xl", "--shard", ""): "error: --shard: ",
        ("demo", "--global-batch", "0", "--no-validate"): "error: --global-batch: ",
        ("demo", "--time-limit", "7200", "--no-validate"): "error: --time-limit: ",
        # The size the model would be traced at, from the same table of ranges.
        ("plan", "gpt2-xl", "--seq", "0"): "error: --seq: ",
        ("lower", "missing.json", "--model", "gpt2", "--out", "run", "--seq", "0"): "error: --seq: ",
        # Outputs that cannot be written, before the work that would fill them.
        ("plan", "gpt2-xl", "--out", "a-file/plan.json"): "error: --out 'a-file/plan.json': ",
        ("demo", "--report", "a-folder", "--no-validate"): "error: --report 'a-folder' is a folder",
        ("report", "missing.json", "--out", "a-folder"): "error: --out 'a-folder' is a folder",
        ("lower", "missing.json", "--model", "gpt2", "--out", "a-file"): "error: --out 'a-file' is a file",
        ("trace", "gpt2-xl", "--out", "a-file/graph.json"): "error: --out 'a-file/graph.json': ",
        ("simulate", "missing.json", "--timeline", "a-folder"): "error: --timeline 'a-folder' is a folder",
        ("profile", "--out", "a-folder"): "error: --out 'a-folder' is a folder",
    }
    argvs = [list(c) for c in cases]
    r = subprocess.run(
        [sys.executable, "-c", _RUN_ALL, json.dumps(argvs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for (argv, expected), got in zip(cases.items(), out["results"], strict=True):
        assert got["code"] == 2, (argv, got)
        assert expected in got["err"], (argv, got["err"])
        assert "Traceback" not in got["err"] and len(got["err"].strip().splitlines()) <= 3, got["err"]
    assert out["torch"] is False, "a refused command traced a model (torch was loaded)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"], "a refusal wrote something"


def test_write_output_makes_folders_and_says_an_os_error_in_one_line(tmp_path: Path) -> None:
    text = tmp_path / "a" / "b" / "out.json"
    assert write_output(text, '{"k": 1}') == text and json.loads(text.read_text()) == {"k": 1}
    raw = write_output(tmp_path / "c" / "p.png", b"\x89PNG")
    assert raw.read_bytes() == b"\x89PNG"
    (tmp_path / "f").write_text("")
    with pytest.raises(DistplanError) as e:
        write_output(tmp_path / "f" / "x.json", "{}", option="--out")
    msg = str(e.value)
    assert msg.startswith("cannot write --out ") and "x.json" in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no "caused by" line repeating it


def test_check_output_refuses_without_creating_anything(tmp_path: Path) -> None:
    deep = tmp_path / "new" / "deeper" / "plan.json"
    assert check_output(deep, option="--out") == deep and not (tmp_path / "new").exists()
    assert check_output(tmp_path / "run", option="--out", folder=True) == tmp_path / "run"
    (tmp_path / "file").write_text("")
    with pytest.raises(DistplanError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "deeper" / "x.json", option="--out")
    with pytest.raises(DistplanError, match=r"--out '.*file' is a file; give a folder"):
        check_output(tmp_path / "file", option="--out", folder=True)
    with pytest.raises(DistplanError, match="is a folder; give a file name"):
        check_output(tmp_path, option="--report")


def test_set_options_read_json_values_and_keep_bare_words() -> None:
    assert parse_overrides(["num_hidden_layers=2", "hidden_act=gelu", "tie=true", "sizes=[1, 2]"]) == {
        "num_hidden_layers": 2,
        "hidden_act": "gelu",
        "tie": True,
        "sizes": [1, 2],
    }
    with pytest.raises(DistplanError, match="--set expects KEY=VALUE"):
        parse_overrides(["=3"])
