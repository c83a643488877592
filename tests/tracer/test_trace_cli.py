"""``distplan trace`` / ``distplan models`` through the real CLI entry point, good and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distplan.cli import main
from distplan.graph import OpGraph

REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``distplan.cli.main`` in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_trace_json_contract(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "graph.json"
    code, out, err = run_cli(
        ["trace", "gpt2-tiny", "--batch", "2", "--seq", "16", "--json", "--out", str(out_file)], capsys
    )
    assert code == 0, err
    info = json.loads(out)
    for key in ("model", "num_nodes", "num_params", "param_bytes", "fwd_flops", "bwd_flops", "trace_seconds"):
        assert key in info, key
    assert info["model"] == "gpt2-tiny" and info["batch"] == 2 and info["seq"] == 16
    g = OpGraph.load(out_file)
    assert info["num_nodes"] == len(g.nodes)
    assert info["num_params"] == g.num_params and info["param_bytes"] == g.param_bytes == 4 * g.num_params
    assert info["fwd_flops"] == g.fwd_flops > 0 and info["bwd_flops"] == g.bwd_flops
    assert g.nodes[0].outputs[0].shape == (2, 16)


def test_trace_human_summary_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["trace", "llama-tiny", "--seq", "16", "--set", "num_hidden_layers=1"], capsys)
    assert code == 0, err
    assert "largest activations" in out and "per module" in out
    assert "model.layers.0" in out and "model.layers.1" not in out


def test_models_lists_the_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    names = {m["name"] for m in json.loads(out)["models"]}
    assert {"gpt2", "gpt2-xl", "llama-7b", "llama-70b", "bert-base", "mlp-tiny", "gpt-tiny"} <= names


def _assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err  # one paragraph: error, cause, --debug hint
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_unknown_builtin_suggests_names(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["trace", "gpt3"], capsys)
    _assert_clean_error(code, err, "unknown model 'gpt3'", "Did you mean", "'gpt2'", "llama-7b")


def test_broken_config_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": 64,')
    code, _, err = run_cli(["trace", str(cfg)], capsys)
    _assert_clean_error(code, err, "config.json is not valid JSON", "line 1 column 43")


def test_unknown_model_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "lamma", "hidden_size": 64}))
    code, _, err = run_cli(["trace", str(cfg)], capsys)
    _assert_clean_error(code, err, "model_type 'lamma' is not known to transformers", "llama")


def test_inconsistent_config_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 60, "num_attention_heads": 7}))
    code, _, err = run_cli(["trace", str(cfg)], capsys)
    _assert_clean_error(code, err, "invalid llama config", "hidden size (60)", "attention heads (7)")


def test_hf_config_folder_builds_causal_lm(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "auto_map": {"AutoModel": "evil.Model"},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(["trace", str(tmp_path), "--seq", "8", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "causal-lm" and info["name"] == "llama"
    # embedding 100x32 + 4 attention 32x32 + 3 MLP 32x64 + 3 norms + LM head 32x100
    assert info["num_params"] == 100 * 32 + 4 * 32 * 32 + 3 * 32 * 64 + 3 * 32 + 32 * 100


def test_untraceable_forward_names_module_and_line(
    capsys: pytest.CaptureFixture[str], factories: str
) -> None:
    code, _, err = run_cli(["trace", "tracer_test_factories:untraceable"], capsys)
    _assert_clean_error(
        code, err, "could not trace", "module 'gate' (Gate)", "`if x.sum() > 0:`", "data-dependent"
    )


def test_wrong_input_shape(capsys: pytest.CaptureFixture[str], factories: str) -> None:
    code, _, err = run_cli(["trace", "tracer_test_factories:wrong_shape"], capsys)
    _assert_clean_error(code, err, "module '0'", "float32[2, 12]", "[16, 4]")


def test_sequence_longer_than_learned_positions(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["trace", "gpt2-tiny", "--seq", "600"], capsys)
    _assert_clean_error(code, err, "seq 600 is longer than gpt2-tiny's 512 learned positions", "--seq 512")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--batch", "0"], ("batch must be a positive integer, got 0",)),
        (["--set", "num_hidden_layers"], ("--set expects KEY=VALUE",)),
    ],
)
def test_bad_options(args: list[str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["trace", "llama-tiny", *args], capsys)
    _assert_clean_error(code, err, *needles)


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("tracer_test_factories:raises", ("raised RuntimeError: factory exploded on purpose",)),
        ("tracer_test_factories:not_a_module", ("returned int", "expected an nn.Module")),
        ("tracer_test_factories:missing", ("has no attribute 'missing'",)),
        ("no_such_module_xyz:fn", ("cannot import module 'no_such_module_xyz'",)),
    ],
)
def test_bad_factories(
    spec: str, needles: tuple[str, ...], capsys: pytest.CaptureFixture[str], factories: str
) -> None:
    code, _, err = run_cli(["trace", spec], capsys)
    _assert_clean_error(code, err, *needles)


def test_factory_contract(capsys: pytest.CaptureFixture[str], factories: str) -> None:
    # a plain module: inputs inferred from its first Linear; an `example_inputs(batch, seq)` attribute
    code, out, err = run_cli(["trace", "tracer_test_factories:plain_mlp", "--batch", "3", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["num_params"] == 6 * 10 + 10 + 10 * 3 + 3
    assert info["fwd_flops"] == 2 * 3 * (6 * 10 + 10 * 3)
    code, out, err = run_cli(
        ["trace", "tracer_test_factories:with_example_inputs", "--batch", "2", "--seq", "10", "--json"],
        capsys,
    )
    assert code == 0, err
    # Conv1d(3 -> 4, kernel 3) over length 10: 8 outputs x 4 channels x 9 MACs, batch 2
    assert json.loads(out)["fwd_flops"] == 2 * 2 * 8 * 4 * 9


@pytest.mark.slow
def test_real_process_exit_code_and_no_traceback(factories: str) -> None:
    env = {**os.environ, "PYTHONPATH": factories}
    proc = subprocess.run(
        [sys.executable, "-m", "distplan.cli", "trace", "tracer_test_factories:untraceable"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "def forward" not in proc.stderr
    assert "module 'gate' (Gate)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3  # the error, its cause, the --debug hint
    debug = subprocess.run(
        [sys.executable, "-m", "distplan.cli", "trace", "tracer_test_factories:untraceable", "--debug"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
