"""The report page's content (without a browser) and the ``distplan report`` command."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from presentation_handmade import gpt_like_graph, handmade_plan, handmade_timeline

from distplan.presentation.formatting import device_ranges, format_bytes, format_seconds, layer_summary
from distplan.presentation.pictures import render_timeline_svg
from distplan.presentation.report import (
    baseline_rows,
    best_baseline,
    equal_split_speedup,
    model_runs,
    render_report,
)

DISTPLAN = [sys.executable, "-m", "distplan.cli"]


def test_page_shows_every_stage_and_device_and_is_self_contained() -> None:
    graph = gpt_like_graph()
    plan = handmade_plan(graph)
    page = render_report(plan, graph=graph, timeline=handmade_timeline(plan))
    for s in plan.stages:
        assert f'<tr class="stage-row" data-stage="{s.index}">' in page
    for d in range(plan.request.cluster.num_devices):
        assert (
            page.count(f'class="device{"" if d in plan.devices_used else " unused"}" data-device="{d}"') == 1
        )
    # Nothing is fetched: no URLs, no external scripts, styles or images.
    assert not re.search(r"(src|href)\s*=", page)
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page
    # Summary numbers: 500 ms equal split / 250 ms plan = 2.00x; best baseline 300 ms -> 1.20x.
    assert "2.00×" in page and "1.20×" in page
    assert "does not fit in memory" in page  # data_parallel is None


def test_page_escapes_names() -> None:
    graph = gpt_like_graph()
    plan = handmade_plan(graph)
    evil = replace(plan, graph=replace(plan.graph, name="<script>alert(1)</script>"))
    page = render_report(evil)
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_model_runs_cover_the_graph_in_order_with_the_plans_stages() -> None:
    graph = gpt_like_graph()
    plan = handmade_plan(graph)
    runs = model_runs(plan, graph)
    assert runs[0].start == 0 and runs[-1].end == len(graph.nodes)
    for a, b in itertools.pairwise(runs):
        assert a.end == b.start
    for r in runs:
        st = plan.stages[r.stage]
        assert st.start <= r.start and r.end <= st.end
    # 12 layers fit under the run limit: each transformer layer is its own tile (or split at a cut).
    layer_runs = {r.module for r in runs if r.module.startswith("transformer.h.")}
    assert len(layer_runs) >= 12


def test_timeline_svg_is_valid_xml_with_one_shape_per_event() -> None:
    plan = handmade_plan()
    tl = handmade_timeline(plan)
    svg = render_timeline_svg(tl, title="t")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    events = [r for r in root.iter(f"{ns}rect") if "ev" in (r.get("class") or "").split()]
    assert len(events) == len(tl.events)
    rows = [g for g in root.iter(f"{ns}g") if g.get("class") == "tl-row"]
    assert [int(g.get("data-device", -1)) for g in rows] == list(tl.devices)
    # The last event ends at the right edge of the plot (x + width == label column + plot width).
    right = max(float(r.get("x", 0)) + float(r.get("width", 0)) for r in events)
    assert abs(right - (250 + 1100 - 250 - 20)) < 1.0


def test_baseline_rows_and_speedups() -> None:
    plan = handmade_plan()
    rows = baseline_rows(plan)
    assert [r.name for r in rows] == ["homogeneous_dp", "param_balanced", "equal_layers", "data_parallel"]
    assert [r.speedup for r in rows[:3]] == [0.3 / 0.25, 0.4 / 0.25, 0.5 / 0.25]
    assert rows[3].speedup is None
    eq = equal_split_speedup(plan)
    best = best_baseline(plan)
    assert eq is not None and eq.name == "equal_layers"
    assert best is not None and best.name == "homogeneous_dp"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISTPLAN_PROGRESS": "0"}
    return subprocess.run([*DISTPLAN, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_report_command_writes_page_svg_and_png(tmp_path: Path) -> None:
    graph = gpt_like_graph()
    plan = handmade_plan(graph)
    plan.save(tmp_path / "plan.json")
    graph.save(tmp_path / "graph.json")
    (tmp_path / "timeline.json").write_text(json.dumps(handmade_timeline(plan).to_dict()))
    r = _run(
        "report", "plan.json", "--graph", "graph.json", "--timeline", "timeline.json", "--out", "out/r.html",
        "--timeline-svg", "out/t.svg", "--timeline-png", "out/t.png", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "out/r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "transformer.h.11" in page
    ET.fromstring((tmp_path / "out/t.svg").read_text())
    png = (tmp_path / "out/t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    # The Chrome trace `distplan simulate --timeline` writes is read back too (the help says so).
    assert _run("simulate", "plan.json", "--timeline", "trace.json", cwd=tmp_path).returncode == 0
    r = _run("report", "plan.json", "--timeline", "trace.json", "--out", "from_trace.html", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "from_trace.html").read_text().count('class="tl-row"') == len(plan.devices_used)
    # Without --timeline the command simulates the plan itself (the planner's simulator).
    r = _run("report", "plan.json", "--out", "sim.html", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "sim.html").read_text()
    assert page.count('class="tl-row"') == len(plan.devices_used)
    assert 'class="ev ev-bwd"' in page


def test_report_command_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    r = _run("report", "missing.json", cwd=tmp_path)
    assert r.returncode == 2
    assert "cannot read plan file 'missing.json'" in r.stderr and "Traceback" not in r.stderr

    (tmp_path / "plan.json").write_text('{"schema_version": 1, "stages": 3}')
    r = _run("report", "plan.json", cwd=tmp_path)
    assert r.returncode == 2 and "plan.json" in r.stderr and "Traceback" not in r.stderr

    graph = gpt_like_graph()
    handmade_plan(graph).save(tmp_path / "good.json")
    (tmp_path / "tl.json").write_text("{not json")
    r = _run("report", "good.json", "--timeline", "tl.json", cwd=tmp_path)
    assert r.returncode == 2 and "tl.json" in r.stderr and "not valid JSON" in r.stderr

    # A graph the plan is not for.
    gpt_like_graph(layers=3).save(tmp_path / "other.json")
    r = _run("report", "good.json", "--graph", "other.json", cwd=tmp_path)
    assert r.returncode == 2 and "but was given graph" in r.stderr


def test_short_forms_for_tables() -> None:
    gpt2 = ["transformer", "transformer.wte", "transformer.wpe", "transformer.drop"]
    gpt2 += [f"transformer.h.{i}.{m}" for i in range(9) for m in ("ln_1", "attn", "mlp")]
    assert layer_summary(gpt2) == "wte, wpe, drop, h.0–h.8"
    assert layer_summary(["transformer.h.9.mlp", "transformer.h.10.attn", "transformer.ln_f", "lm_head"]) == (
        "h.9–h.10, ln_f, lm_head"
    )
    llama = ["model", "model.embed_tokens", "model.layers.0.self_attn", "model.layers.2.mlp", "model.norm"]
    assert layer_summary(llama) == "embed_tokens, layers.0, layers.2, norm"  # a gap is not a range
    assert layer_summary([f"enc.layer.{i}" for i in range(40)] + ["head"], max_chars=20) == (
        "layer.0–layer.39, head"
    )
    assert device_ranges((0, 1, 2, 3, 8, 10, 11)) == "d0–d3, d8, d10–d11"
    assert [format_seconds(x) for x in (None, 0.0, 5e-4, 0.0123, 0.528, 3.774)] == [
        "-", "0 s", "500 µs", "12.3 ms", "528 ms", "3.77 s",
    ]  # fmt: skip
    assert [format_bytes(x) for x in (512, 3 * 2**20 + 2**19, 78 * 2**30)] == ["512 B", "3.5 MiB", "78 GiB"]
