"""The dashboard's speed at 10,000 trials, beside optuna-dashboard's on the same database.

A fresh SQLite file gets `--trials` trials written through the store API (each started and
finished as a campaign does, with its prediction and per-stage memory), and the same trials as
an Optuna study of the same name (what a campaign's Optuna tables hold), so both dashboards
read one database. Then, in one run, alternating the two sides round by round:

- ours: `GET /api/studies/{name}/trials` with paging (a page of 50 at a random offset, sorted by
  tokens/s) and a knob filter (`schedule=bpipe`), through the ASGI app in-process;
- optuna-dashboard's: its study API, `GET /api/studies/{id}?after=0` (what its study page
  polls: every trial), through its WSGI app in-process;

p50 and p95 latency over `--reps` requests each. Then the study page's time to its first chart
in Chromium (headless, Debian's; navigation start to the first chart drawn), median of
`--page-reps` loads over `autotune dashboard` serving a copy of the file: repeat views (the
server keeps a study's points while the store is unchanged) and first views after a change (one
more trial recorded just before, as a running campaign does).

    python -m benchmarks.bench_dashboard [--trials 10000] [--reps 100] [--page-reps 5] [--json PATH]
        [--db PATH [--seed-only]] [--quick]

Targets: our trials API p95 <= 100 ms at 10,000 trials and faster than optuna-dashboard's; the
first chart <= 1 s (both views).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STUDY = "bench"
KNOB_VALUES = {
    "tp": (1, 2, 4, 8), "pp": (1, 2, 4, 8), "dp": (1, 2, 4, 8), "micro_batch_size": (1, 2, 4, 8),
    "schedule": ("1f1b", "gpipe", "bpipe"), "recompute": ("none", "selective", "full"),
    "flash_attention": (True, False),
}  # fmt: skip


def _config(knobs: dict[str, Any]) -> dict[str, Any]:
    world = knobs["tp"] * knobs["pp"] * knobs["dp"]
    m = 64
    return {"model": "gpt3-175b", "family": "gpt", "num_layers": 96, "hidden_size": 12288, "num_heads": 96,
            "num_kv_heads": 96, "seq_len": 2048, "vocab_size": 51200, "ffn_hidden_size": 49152, **knobs,
            "num_microbatches": m, "global_batch_size": knobs["micro_batch_size"] * m * knobs["dp"],
            "device": "cuda", "memory_limit": None, "bpipe_cap": 0, "world_size": world}  # fmt: skip


FINGERPRINT = {"device": "cuda", "gpus": [{"name": "H100"}] * 8, "cpus": 64}
COMBOS = [dict(zip(KNOB_VALUES, v, strict=True)) for v in itertools.product(*KNOB_VALUES.values())]


def write_trial(store: Any, fp: str, rng: random.Random, number: int) -> tuple[int, dict[str, Any], Any]:
    """One trial started and finished through the store API, as a campaign records it: its id,
    knobs and result (ok, or out of memory / failed)."""
    from autotune.results import StageResult, Status, TrialResult

    knobs = COMBOS[rng.randrange(len(COMBOS))]
    cfg = _config(knobs)
    predicted = {"tokens_per_s": rng.uniform(1e4, 1e5), "step_time_s": rng.uniform(1, 30)}
    tid = store.start_trial(STUDY, config=cfg, fingerprint=fp, predicted=predicted, optuna_number=number)
    status = rng.choices([Status.OK, Status.OOM, Status.FAILED], weights=[8, 1, 1])[0]
    if status is Status.OK:
        tps = predicted["tokens_per_s"] * rng.uniform(0.7, 1.2)
        stages = tuple(StageResult(s, 2**33 + s, 2**34 + s, 0) for s in range(int(knobs["pp"])))
        result = TrialResult(status, None, cfg, 2048 * 64 / tps, tps, 100.0, 0.4, (11.0, 10.9), stages)
    else:
        result = TrialResult.failure(cfg, status=status, reason="out of memory on stage 0")
    store.finish_trial(tid, result)
    return tid, knobs, result


def seed(url: str, trials: int, rng: random.Random) -> float:
    """`trials` finished trials through the store API, and an Optuna study mirroring them."""
    import optuna

    from storage import Store

    start = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions: dict[str, optuna.distributions.BaseDistribution] = {
        k: optuna.distributions.CategoricalDistribution(list(v)) for k, v in KNOB_VALUES.items()
    }
    frozen = []
    with Store(url) as store:  # autotune's tables first, then Optuna's beside them, as a campaign does
        ostudy = optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
        fp = store.register_fingerprint(FINGERPRINT)
        space = {"objective": "tokens_per_s", "knobs": {k: list(v) for k, v in KNOB_VALUES.items()}}
        store.create_study(STUDY, space=space, model="gpt3-175b", cluster="h100-8x", fingerprint=fp)
        for i in range(trials):
            tid, knobs, result = write_trial(store, fp, rng, i)
            frozen.append(optuna.trial.create_trial(
                params=knobs, distributions=distributions, value=result.tokens_per_s if result.ok else None,
                state=optuna.trial.TrialState.COMPLETE if result.ok else optuna.trial.TrialState.FAIL,
                user_attrs={"trial_id": tid},
            ))  # fmt: skip
        ostudy.add_trials(frozen)
    return time.perf_counter() - start


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50_ms": 1e3 * statistics.median(ordered),
            "p95_ms": 1e3 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}  # fmt: skip


def api_latencies(url: str, reps: int, rng: random.Random) -> dict[str, dict[str, float]]:
    from fastapi.testclient import TestClient
    from optuna_dashboard import wsgi

    from autotune.dashboard.app import create_app
    from storage import Store

    store = Store(url, read_only=True)
    ours = TestClient(create_app(store))
    theirs = wsgi(url)
    total = ours.get(f"/api/studies/{STUDY}/trials", params={"limit": 1}).json()["total"]
    bpipe = ours.get(f"/api/studies/{STUDY}/trials", params={"limit": 1, "schedule": "bpipe"}).json()["total"]
    study_id = _optuna_study_id(theirs)

    def our_call() -> None:
        params = {"limit": 50, "offset": rng.randrange(max(1, bpipe - 50)), "sort": "tokens_per_s",
                  "order": "desc", "schedule": "bpipe"}  # fmt: skip
        response = ours.get(f"/api/studies/{STUDY}/trials", params=params)
        assert response.status_code == 200 and len(response.json()["trials"]) == 50, response.text[:200]

    def their_call() -> None:
        body = _wsgi_get(theirs, f"/api/studies/{study_id}", "after=0")
        assert len(json.loads(body)["trials"]) == total

    times: dict[str, list[float]] = {"ours": [], "optuna-dashboard": []}
    calls: dict[str, Callable[[], None]] = {"ours": our_call, "optuna-dashboard": their_call}
    for side in calls:  # warm both (imports, caches, the first query plan)
        calls[side]()
    for rep in range(reps):
        for side in ("ours", "optuna-dashboard") if rep % 2 == 0 else ("optuna-dashboard", "ours"):
            start = time.perf_counter()
            calls[side]()
            times[side].append(time.perf_counter() - start)
    store.close()
    return {side: _percentiles(t) for side, t in times.items()}


def _wsgi_get(app: Any, path: str, query: str = "") -> bytes:
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
    assert status and status[0].startswith("200"), (status, body[:200])
    return body


def _optuna_study_id(app: Any) -> int:
    studies = json.loads(_wsgi_get(app, "/api/studies"))["study_summaries"]
    return int(next(s["study_id"] for s in studies if s["study_name"] == STUDY))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serving(url: str, port: int | None = None) -> Iterator[str]:
    if port is None:
        port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "autotune.cli", "dashboard", "--storage", url, "--port",
                             str(port)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(base + "/api/studies", timeout=60).close()
                break
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def _first_chart_ms(page: Any, base: str) -> float:
    page.goto(f"{base}/studies/{STUDY}")
    page.wait_for_selector(".chart[data-drawn='1']", timeout=120_000)
    # dashboard.js marks the first chart drawn; marks count from the navigation's start
    ms = float(page.evaluate("performance.getEntriesByName('autotune:first-chart')[0].startTime"))
    # the rest of the page (every chart, the verdict) before the next load, so that one does not
    # wait behind this one's requests
    page.wait_for_selector("#advice-detail[data-drawn='1']", timeout=300_000)
    page.wait_for_function("[...document.querySelectorAll('.chart')].every((c) => c.dataset.drawn)")
    return ms


def first_chart(db: Path, reps: int, rng: random.Random) -> dict[str, float]:
    """Navigation start to the study page's first chart drawn, in Chromium; median of `reps`,
    for a repeat view (nothing changed since the last one: the server keeps the study's points)
    and for the first view after a change (one more trial recorded through the store API, as a
    running campaign does, just before the page is opened). On a copy of `db`, served by
    `autotune dashboard`; the browser keeps plotly.js cached, as a user's does."""
    from playwright.sync_api import sync_playwright

    from storage import Store

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    repeat: list[float] = []
    first: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-view-") as tmp:
        copy = Path(tmp) / db.name
        shutil.copyfile(db, copy)
        url = f"sqlite:///{copy}"
        with sync_playwright() as p, _serving(url) as base, Store(url) as writer:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            _first_chart_ms(page, base)  # warm: plotly.js cached, the points built, the verdict computed
            fp = writer.register_fingerprint(FINGERPRINT)
            for rep in range(reps):
                repeat.append(_first_chart_ms(page, base) / 1e3)
                write_trial(writer, fp, rng, 10**6 + rep)
                first.append(_first_chart_ms(page, base) / 1e3)
            browser.close()
    return {
        "first_chart_s": statistics.median(repeat),
        "first_view_s": statistics.median(first),
        "runs": reps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--page-reps", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--db", type=Path, default=None, help="keep the seeded file here; reused where it exists")
    p.add_argument("--quick", action="store_true", help="a smoke test: 300 trials, 10 requests, 1 page load")
    p.add_argument("--seed-only", action="store_true", help="with --db: write the trials and stop")
    a = p.parse_args(argv)
    if a.quick:
        a.trials, a.reps, a.page_reps = 300, 10, 1
    rng = random.Random(0)
    folder = Path(tempfile.mkdtemp(prefix="autotune-bench-dashboard-"))
    try:
        db = a.db or folder / "bench.db"
        url = f"sqlite:///{db}"
        if a.db is not None and a.db.exists():
            print(f"the trials already in {db}")
        else:
            seconds = seed(url, a.trials, rng)
            print(f"wrote {a.trials:,} trials through the store API (and an Optuna study): {seconds:.0f} s")
        if a.seed_only:
            return 0
        report(db, a, rng)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def report(db: Path, a: argparse.Namespace, rng: random.Random) -> None:
    url = f"sqlite:///{db}"
    api = api_latencies(url, a.reps, rng)
    for side, fig in api.items():
        print(f"{side:>17}: p50 {fig['p50_ms']:7.1f} ms   p95 {fig['p95_ms']:7.1f} ms")
    chart = first_chart(db, a.page_reps, rng)
    repeat, first = chart["first_chart_s"], chart["first_view_s"]
    print(f"study page, first chart in Chromium: {repeat:.2f} s repeat view, "
          f"{first:.2f} s first view after a change (medians of {chart['runs']})")  # fmt: skip
    ours, theirs = api["ours"]["p95_ms"], api["optuna-dashboard"]["p95_ms"]
    met = ours <= 100 and ours < theirs and max(chart["first_chart_s"], chart["first_view_s"]) <= 1.0
    print(f"ours / optuna-dashboard's p95: {ours / theirs:.3f}")
    print(
        "target (p95 <= 100 ms and below optuna-dashboard's; first chart <= 1 s): "
        + ("met" if met else "NOT met")
    )
    if a.json:
        a.json.write_text(json.dumps({"api": api, "page": chart, "met": met}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
