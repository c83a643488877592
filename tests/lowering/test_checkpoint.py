"""Weights by name: safetensors and DCP folders read with their names and shapes checked (one process),
and for real on gloo ranks through the shipped entry point (``python -m distplan.lowering.train``):
identical initial parameters whatever the plan, a safetensors folder on 4 ranks giving the single-device
first loss, and a run saved under one plan resumed under another continuing the single-device loss curve."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lowering_helpers import cli_env, cut, layout_plan
from safetensors.torch import save_file

from distplan.errors import LoweringError
from distplan.lowering._model import resolve_source
from distplan.lowering.checkpoint import match_names, open_weights
from distplan.lowering.init import initialize, tensor_slots
from distplan.lowering.runtime import _make_optimizer
from distplan.plan import Plan
from distplan.tracer import resolve_model


# ---------------------------------------------------------------------------------------------- one process
def _slots(spec: str = "gpt2-tiny"):  # type: ignore[no-untyped-def]
    return tensor_slots(resolve_model(spec, batch=1, seq=8, device="meta").module)


def test_names_and_shapes_are_checked_naming_the_tensors() -> None:
    slots = _slots()
    full = {a: s.shape for s in slots.values() if s.persistent for a in s.aliases[:1]}
    # A tied weight may be stored under any of its names (Hugging Face keeps the embedding).
    assert match_names(slots, full)["transformer.wte.weight"] == "transformer.wte.weight"
    renamed = {("lm_head.weight" if k == "transformer.wte.weight" else k): v for k, v in full.items()}
    assert match_names(slots, renamed)["transformer.wte.weight"] == "lm_head.weight"
    # A base-model checkpoint (no "transformer." prefix) of the head model.
    base = {k.removeprefix("transformer."): v for k, v in full.items()}
    got = match_names(slots, base, base_prefix="transformer")
    assert got["transformer.h.0.attn.c_attn.weight"] == "h.0.attn.c_attn.weight"
    missing = {k: v for k, v in full.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(
        LoweringError, match=r"1 tensor\(s\) of the model are missing .*transformer.h.1.mlp.c_fc.bias"
    ):
        match_names(slots, missing)
    with pytest.raises(
        LoweringError, match=r"1 tensor\(s\) of the checkpoint are not in the model: extra.bias"
    ):
        match_names(slots, {**full, "extra.bias": (3,)})
    wrong = {**full, "transformer.ln_f.weight": (65,)}
    with pytest.raises(LoweringError, match=r"transformer.ln_f.weight \[65\] vs the model's \[64\]"):
        match_names(slots, wrong)


def test_safetensors_folders_and_dcp_folders_are_read_by_name(tmp_path: Path) -> None:
    a, b = torch.randn(3, 4), torch.arange(5.0)
    # Sharded Hugging Face folder: index + two shards; a rank reads only what it asks for.
    save_file({"x.a": a}, tmp_path / "s1.safetensors")
    save_file({"x.b": b}, tmp_path / "s2.safetensors")
    index = {"weight_map": {"x.a": "s1.safetensors", "x.b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    wf = open_weights(tmp_path)
    assert wf.kind == "safetensors" and wf.shapes == {"x.a": (3, 4), "x.b": (5,)}
    assert list(wf.read(["x.b"])) == ["x.b"] and torch.equal(wf.read(["x.b"])["x.b"], b)
    # A flat DCP folder.
    d = tmp_path / "dcp"
    dcp.save({"x.a": a, "x.b": b}, checkpoint_id=str(d), no_dist=True)
    wf = open_weights(d)
    assert wf.kind == "dcp" and wf.shapes == {"x.a": (3, 4), "x.b": (5,)}
    assert torch.equal(wf.read(["x.a"])["x.a"], a)
    # What is not a checkpoint says what was looked for.
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoweringError, match=r"not a checkpoint folder: it has no model\.safetensors"):
        open_weights(tmp_path / "empty")
    with pytest.raises(LoweringError, match="does not exist"):
        open_weights(tmp_path / "nope")
    index["weight_map"]["x.c"] = "s3.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoweringError, match=r"names shard.* that do not exist: s3\.safetensors"):
        open_weights(tmp_path)


# ---------------------------------------------------------------------------------------------- gloo ranks
def _train(plan: Plan, tmp: Path, nproc: int, *args: str) -> list[tuple[int, float]]:
    """Run the shipped entry point under torchrun on CPU ranks; the (step, loss) lines it printed."""
    path = tmp / f"plan-{plan.id[:8]}.json"
    plan.save(path)
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(Path(__file__).parent)])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "distplan.lowering.train",
        "--plan",
        str(path),
        "--device",
        "cpu",
        "--seq",
        "8",
        "--timeout",
        "120",
        *args,
    ]
    r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [(int(k), float(v)) for k, v in re.findall(r"^step (\d+) loss ([-\d.e]+)", r.stdout, flags=re.M)]


def _reference(spec: str, gb: int, steps: int, *, optimizer: str, lr: float, seed: int = 0) -> list[float]:
    """The single-device run that never stops: reproducible init, the entry point's fixed batch."""
    bundle = resolve_model(spec, batch=1, seq=8, device="meta", seed=seed)
    initialize(bundle.module, seed=seed)
    source = resolve_source(bundle, batch=1, seq=8)
    batch = source.sample(gb, seed=seed + 1)
    opt = _make_optimizer(optimizer, list(bundle.module.parameters()), lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = source.loss(source.select(bundle.module(*batch.args, **batch.kwargs)), batch.target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _read_dcp_model(path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata()
    names = [p[1] for k, p in md.planner_data.items() if p[0] == "model"]
    shapes = {
        p[1]: tuple(md.state_dict_metadata[k].size) for k, p in md.planner_data.items() if p[0] == "model"
    }
    want = {n: torch.empty(shapes[n]) for n in names}
    dcp.load({"model": want}, checkpoint_id=str(path), no_dist=True)
    return want


@pytest.mark.slow
def test_initial_parameters_are_identical_by_name_whatever_the_plan(tmp_path: Path) -> None:
    """Two plans (other cuts, stages, replicas) save, before any step, the very tensors the single-device
    reproducible initialisation draws (so also the same tensors as each other, launch after launch)."""
    spec = "gpt2-tiny"
    a = layout_plan(spec, f"gpipe m2x1 | 0:{cut(spec, 0.5)}@0 | {cut(spec, 0.5)}:{{n}}@1", global_batch=2)
    b = layout_plan(spec, f"gpipe m2x2 | 0:{cut(spec, 0.3)}@0,1 | {cut(spec, 0.3)}:{{n}}@2,3", global_batch=4)
    want = initialize(resolve_model(spec, batch=1, seq=8, device="meta").module, seed=0)
    persistent = {n for n, s in _slots(spec).items() if s.persistent}
    got = []
    for i, (plan, nproc) in enumerate([(a, 2), (b, 4)]):
        _train(plan, tmp_path, nproc, "--model", spec, "--steps", "0", "--save", f"init{i}")
        got.append(_read_dcp_model(tmp_path / f"init{i}"))
    for saved in got:
        assert set(saved) == persistent
        for n in persistent:
            assert torch.equal(saved[n], want[n]), n


@pytest.mark.slow
def test_safetensors_folder_on_four_ranks_gives_the_single_device_first_loss(tmp_path: Path) -> None:
    """A random-weight GPT-2 written as a sharded Hugging Face folder, loaded by name on a 4-rank plan
    (2 stages x 2 replicas), gives the first loss of the model Hugging Face loads from the same folder."""
    from transformers import AutoModelForCausalLM

    spec = "gpt2-tiny"
    writer = resolve_model(spec, batch=1, seq=8, device="cpu", seed=123)  # other weights than seed 0's
    folder = tmp_path / "hf"
    writer.module.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    plan = layout_plan(
        spec, f"1f1b m2x2 | 0:{cut(spec, 0.6)}@0,1 | {cut(spec, 0.6)}:{{n}}@2,3", global_batch=4
    )
    losses = _train(plan, tmp_path, 4, "--model", spec, "--checkpoint", str(folder), "--steps", "1")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    source = resolve_source(resolve_model(spec, batch=1, seq=8, device="meta"), batch=1, seq=8)
    batch = source.sample(4, seed=1)
    with torch.no_grad():
        want = float(source.loss(hf(input_ids=batch.args[0]).logits, batch.target))
    assert [k for k, _ in losses] == [0]
    assert losses[0][1] == pytest.approx(want, rel=1e-5)
    assert abs(want - _reference(spec, 4, 1, optimizer="sgd", lr=1e-3)[0]) > 1e-3  # not the fresh init's


@pytest.mark.slow
def test_save_under_one_plan_resume_under_another(tmp_path: Path) -> None:
    """Adam, 2 steps under plan A (2 stages, 1 replica), saved; resumed under plan B (2 other stages, 2
    replicas, 4 ranks) for 2 more: the losses are those of one device that never stopped. The same
    checkpoint fine-tuned from (weights only) gives the loss of step 2."""
    spec = "gpt2-tiny"
    a = layout_plan(spec, f"1f1b m4x1 | 0:{cut(spec, 0.4)}@0 | {cut(spec, 0.4)}:{{n}}@1", global_batch=4)
    b = layout_plan(spec, f"gpipe m2x2 | 0:{cut(spec, 0.7)}@0,1 | {cut(spec, 0.7)}:{{n}}@2,3", global_batch=4)
    ref = _reference(spec, 4, 4, optimizer="adam", lr=3e-3)
    opts = ("--model", spec, "--optimizer", "adam", "--lr", "0.003")
    first = _train(a, tmp_path, 2, *opts, "--steps", "2", "--save", "ck")
    assert json.loads((tmp_path / "ck" / "distplan.json").read_text())["step"] == 2
    resumed = _train(b, tmp_path, 4, *opts, "--steps", "2", "--resume", "ck")
    assert [k for k, _ in first + resumed] == [0, 1, 2, 3]
    for (k, got), want in zip(first + resumed, ref, strict=True):
        assert got == pytest.approx(want, rel=1e-5), (k, got, want)
    # Adam's state came back: a fresh optimizer from the same weights takes another second step.
    tuned = _train(a, tmp_path, 2, *opts, "--steps", "2", "--checkpoint", "ck")
    assert tuned[0][1] == pytest.approx(ref[2], rel=1e-5)
    assert abs(tuned[1][1] - ref[3]) > 1e-4 * abs(ref[3])


@pytest.mark.slow
def test_resume_across_tensor_parallel_pipeline_and_sharded_plans(tmp_path: Path) -> None:
    """Adam under tensor parallelism (1 stage, tp 2: DTensor shards), resumed as a 2-stage pipeline, then as
    one stage fully sharded over 2 replicas (FSDP2): DCP reshards each time and the losses stay those of one
    device that never stopped."""
    spec = "gpt2-tiny"
    tp = layout_plan(spec, "gpipe m2x2 | 0:{n}@0,1 tp2", global_batch=4)
    pp = layout_plan(spec, f"gpipe m2x2 | 0:{cut(spec, 0.5)}@0 | {cut(spec, 0.5)}:{{n}}@1", global_batch=4)
    fs = layout_plan(spec, "gpipe m2x2 | 0:{n}@0,1 sh=full", global_batch=4)
    ref = _reference(spec, 4, 6, optimizer="adam", lr=3e-3)
    opts = ("--model", spec, "--optimizer", "adam", "--lr", "0.003")
    got = _train(tp, tmp_path, 2, *opts, "--steps", "2", "--save", "a")
    got += _train(pp, tmp_path, 2, *opts, "--steps", "2", "--resume", "a", "--save", "b")
    got += _train(fs, tmp_path, 2, *opts, "--steps", "2", "--resume", "b")
    assert [k for k, _ in got] == [0, 1, 2, 3, 4, 5]  # one line per step (the first tensor-parallel rank)
    for (k, loss), want in zip(got, ref, strict=True):
        assert loss == pytest.approx(want, rel=1e-5), (k, loss, want)
