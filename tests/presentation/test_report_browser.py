"""The report page in a real headless browser (Debian's chromium driven by Playwright).

Checks: the page loads with no console errors and no failed requests, shows every stage and every device,
the hover highlight works, and a full-page screenshot is taken (saved in the test's tmp dir).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, sync_playwright
from presentation_handmade import gpt_like_graph, handmade_plan, handmade_timeline

from distplan.plan import Plan
from distplan.presentation.report import render_report

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), "Debian chromium is required (apt-get install -y chromium; .ci/run does it)"
    return path


def check_page_in_browser(html_file: Path, plan: Plan, screenshot: Path) -> None:
    """Load the page in chromium and assert what a user must see."""
    errors: list[str] = []
    requests: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            errors.append(f"{msg.type}: {msg.text}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(html_file.as_uri(), wait_until="load")

            assert errors == [], errors
            # Self-contained: the only request is the page itself.
            assert requests == [html_file.as_uri()], requests
            assert plan.graph.name in page.title()

            for s in plan.stages:
                for section in ("#cluster", "#stages", "#model", "#timeline"):
                    loc = page.locator(f'{section} [data-stage="{s.index}"]')
                    assert loc.count() >= 1, f"stage {s.index} missing from {section}"
                    assert loc.first.is_visible(), f"stage {s.index} not visible in {section}"
                row = page.locator(f'#stages tr[data-stage="{s.index}"]')
                assert f"stage {s.index}" in row.inner_text()
                # Each of the stage's devices is drawn in the cluster, coloured as that stage.
                for d in s.devices:
                    tile = page.locator(f'#cluster .device[data-device="{d}"]')
                    assert tile.get_attribute("data-stage") == str(s.index)
                    assert f"stage {s.index}" in tile.inner_text()
            # Every device of the cluster is shown, the unused ones as "unused".
            used = set(plan.devices_used)
            for d in range(plan.request.cluster.num_devices):
                tile = page.locator(f'#cluster .device[data-device="{d}"]')
                assert tile.count() == 1, f"device {d} missing"
                assert tile.is_visible()
                assert ("unused" in tile.inner_text()) == (d not in used)
            # Timeline: one row per used device, and drawn events.
            assert page.locator("#timeline .tl-row").count() == len(used)
            assert page.locator("#timeline rect.ev-fwd").count() >= plan.num_microbatches
            assert page.locator("#timeline rect.ev-bwd").count() >= plan.num_microbatches

            page.screenshot(path=str(screenshot), full_page=True)
            # Hovering stage 0's row dims the other stages' elements, leaving stage 0's.
            if plan.num_stages > 1:
                page.locator('#stages tr[data-stage="0"]').hover()
                assert "dim" in (
                    page.locator('#model .tile[data-stage="1"]').first.get_attribute("class") or ""
                )
                assert "dim" not in (
                    page.locator('#model .tile[data-stage="0"]').first.get_attribute("class") or ""
                )

            assert errors == [], errors
        finally:
            browser.close()
    assert screenshot.stat().st_size > 20_000


@pytest.mark.timeout(120)
def test_report_page_in_chromium(tmp_path: Path) -> None:
    graph = gpt_like_graph()
    plan = handmade_plan(graph)
    html_file = tmp_path / "report.html"
    html_file.write_text(render_report(plan, graph=graph, timeline=handmade_timeline(plan)))
    check_page_in_browser(html_file, plan, tmp_path / "report.png")


@pytest.mark.timeout(180)
def test_report_page_of_a_real_plan_in_chromium(tmp_path: Path) -> None:
    """The same checks on what the planner and simulator really produce: a 24-layer transformer graph
    (the planner's torch-free generator) on the four-host mixed preset."""
    from distplan.planner import plan as make_plan
    from distplan.planner import simulate
    from distplan.planner.synthetic import synthetic_transformer

    graph = synthetic_transformer(layers=24, hidden=2048, heads=16, seq=1024, vocab=50000)
    plan = make_plan(graph, cluster="mixed-4host", global_batch=32, time_limit_s=3)
    assert plan.num_stages >= 2
    html_file = tmp_path / "report.html"
    html_file.write_text(render_report(plan, graph=graph, timeline=simulate(plan, graph)))
    check_page_in_browser(html_file, plan, tmp_path / "report.png")
