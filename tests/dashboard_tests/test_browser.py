"""The dashboard in a real browser: Debian's Chromium driven by Playwright, headless, over
`autotune dashboard` serving a database a real campaign wrote.

From the studies list into a study, a trial and a comparison, by clicking; each chart must hold
the data it was given (points counted in the page's SVG); no request leaves 127.0.0.1, the page
logs no error (a Content-Security-Policy violation would be one), and the database's bytes are
the same afterwards. Screenshots go to the test's folder, and also to `$AUTOTUNE_SCREENSHOTS`
where set (the README's come from there).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.dashboard_tests.conftest import STEPS, STUDY, serving
from tests.dashboard_tests.test_api import digest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: run scripts/system-deps.sh (Debian's chromium)", pytrace=False)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / name), full_page=True)
    extra = os.environ.get("AUTOTUNE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, Path(extra) / name)


def _drawn(page: Any, *ids: str) -> dict[str, int]:
    """Wait until each chart is drawn; the points plotted in each (SVG markers and bars)."""
    for chart in ids:
        page.wait_for_selector(f"#{chart}[data-drawn='1']", timeout=30_000)
    return {c: page.eval_on_selector_all(f"#{c} .point", "els => els.length") for c in ids}


def test_browse_from_the_studies_list_to_a_trial_and_a_comparison(
    browser: Any, seeded: Path, tmp_path: Path
) -> None:
    before = digest(seeded)
    requests: list[str] = []
    problems: list[str] = []
    with serving(seeded) as base:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        page.goto(base + "/")
        rows = page.locator("table.studies tbody tr")
        assert rows.count() == 2
        assert page.locator(f"tr[data-study='{STUDY}'] .verdict").count() == 1
        _shot(page, tmp_path, "dashboard-studies.png")

        page.click(f"table.studies a[href='/studies/{STUDY}']")
        page.wait_for_url(f"**/studies/{STUDY}")
        charts = ("chart-progress", "chart-accuracy", "chart-knobs", "chart-parallel")
        points = _drawn(page, *charts)
        api = page.evaluate(f"fetch('/api/studies/{STUDY}').then(r => r.json())")
        columns = api["points"]  # one list per field
        statuses = columns["status"]
        measured = [
            {"id": i, "schedule": schedule}
            for i, s, schedule in zip(columns["id"], statuses, columns["knobs"]["schedule"], strict=True)
            if s == "ok"
        ]
        failed = [s for s in statuses if s not in ("ok", "running")]
        assert points["chart-progress"] >= len(measured) + len(failed)  # trials (+ best so far: a line)
        assert points["chart-accuracy"] == len(measured)
        assert points["chart-knobs"] >= len(measured)
        assert points["chart-parallel"] >= 2 * len(measured)  # a polyline per trial through >= 2 axes
        page.wait_for_selector("#advice-detail table.reasons", timeout=30_000)
        assert page.locator("#advice-detail table.reasons tr").count() >= 5
        verdict = page.locator("#advice-detail .verdict").text_content()
        assert verdict in ("pays off", "does not pay off", "uncertain")
        assert page.locator("table.trials tbody tr").count() == len(statuses)
        _shot(page, tmp_path, "dashboard-study.png")

        bpipe = next(p for p in measured if p["schedule"] == "bpipe")
        page.click(f"table.trials a[href='/trials/{bpipe['id']}']")
        page.wait_for_url(f"**/trials/{bpipe['id']}")
        points = _drawn(page, "chart-timeline", "chart-memory", "chart-loss")
        timeline = page.evaluate(f"fetch('/api/trials/{bpipe['id']}/timeline').then(r => r.json())")
        assert timeline["measured"] and timeline["simulated"]
        assert points["chart-timeline"] == len(timeline["measured"]) + len(timeline["simulated"])
        pp = timeline["stages"]
        assert points["chart-memory"] >= 2 * pp  # measured and predicted per stage (+ evicted)
        assert points["chart-loss"] == STEPS + 1
        rows = page.eval_on_selector_all("#chart-timeline .ytick", "els => els.map(e => e.textContent)")
        assert len(rows) == 2 * pp and {r.split(" ")[0] for r in rows} == {"measured", "simulated"}
        with page.expect_download() as download:
            page.click("#trace-download")
        trace = Path(download.value.path()).read_text()
        assert '"traceEvents"' in trace
        _shot(page, tmp_path, "dashboard-timeline.png")

        page.click("a[href^='/compare?a=']")
        page.wait_for_url("**/compare?a=*")
        points = _drawn(page, "chart-timelines", "chart-memory-both")
        assert points["chart-timelines"] > points["chart-memory-both"] > 0
        rows = page.eval_on_selector_all("#chart-timelines .ytick", "els => els.map(e => e.textContent)")
        assert len(rows) == 4 * pp  # two trials x measured and simulated x stages, on one axis
        _shot(page, tmp_path, "dashboard-compare.png")
        context.close()

    hosts = {urlparse(u).hostname for u in requests if not u.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, hosts
    assert not problems, problems
    assert digest(seeded) == before
