"""The dashboard's pages and JSON API over a database a real campaign wrote: what they answer,
that they never write, what they refuse, and `autotune dashboard`'s own refusals."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from autotune.advise import bpipe_payoff
from autotune.cli import build_parser
from autotune.config import KNOBS
from autotune.dashboard.app import create_app
from autotune.timeline import KINDS
from storage import Store
from tests.dashboard_tests.conftest import CLI, ENV, ROOT, STEPS, STUDY, free_port, serving

WRITES = ("POST", "PUT", "PATCH", "DELETE")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def client(seeded: Path) -> Iterator[TestClient]:
    with Store(f"sqlite:///{seeded}", read_only=True) as store, TestClient(create_app(store)) as c:
        yield c


def ok_trials(c: TestClient) -> list[dict[str, Any]]:
    rows = c.get(f"/api/studies/{STUDY}/trials", params={"status": "ok", "limit": 500}).json()["trials"]
    assert rows, "the seeded campaign measured nothing"
    return rows


def test_the_studies_list_has_counts_best_and_verdict(client: TestClient) -> None:
    listing = client.get("/api/studies").json()
    by_name = {s["name"]: s for s in listing["studies"]}
    assert set(by_name) == {STUDY, "llama-65b-h100"}
    dash = by_name[STUDY]
    assert dash["model"] == "tiny-gpt" and dash["cluster"] == "cpu-local" and "cores" in dash["hardware"]
    assert sum(dash["counts"].values()) == dash["trials"] == 3 and dash["counts"]["ok"] >= 2
    assert dash["best"]["measured"] and dash["best"]["trial_id"] in {t["id"] for t in ok_trials(client)}
    assert dash["verdict"]["verdict"] in ("pays off", "does not pay off", "uncertain")
    planned = by_name["llama-65b-h100"]
    assert planned["trials"] == 0 and planned["best"]["measured"] is False
    assert planned["verdict"]["basis"] == "predictions" and planned["hardware"].startswith("planned")
    assert listing["storage"].startswith("sqlite:///")


def test_a_study_gives_every_trial_as_a_point_with_its_prediction(client: TestClient) -> None:
    study = client.get(f"/api/studies/{STUDY}").json()
    columns = study["points"]  # one list per field, in trial order; `knobs` one per knob
    assert set(columns["knobs"]) == set(KNOBS)
    assert {len(v) for k, v in columns.items() if k != "knobs"} | {
        len(v) for v in columns["knobs"].values()
    } == {3}
    assert columns["id"] == sorted(columns["id"])
    points = [
        {
            **{k: v[i] for k, v in columns.items() if k != "knobs"},
            "knobs": {k: v[i] for k, v in columns["knobs"].items()},
        }
        for i in range(3)
    ]
    assert all(p["own"] for p in points)
    for p in points:
        assert p["predicted_tokens_per_s"] > 0
        if p["status"] == "ok":
            assert p["prediction_error"] == pytest.approx(p["tokens_per_s"] / p["predicted_tokens_per_s"] - 1)
    assert study["space_knobs"]["schedule"] == ["1f1b", "bpipe"]


def test_trials_are_paged_sorted_and_filtered_in_the_database(client: TestClient) -> None:
    url = f"/api/studies/{STUDY}/trials"
    every = client.get(url).json()
    assert every["total"] == 3 and [t["id"] for t in every["trials"]] == sorted(
        t["id"] for t in every["trials"]
    )
    pages = [client.get(url, params={"limit": 1, "offset": i}).json() for i in range(4)]
    assert [p["total"] for p in pages] == [3] * 4 and [len(p["trials"]) for p in pages] == [1, 1, 1, 0]
    assert [p["trials"][0]["id"] for p in pages[:3]] == [t["id"] for t in every["trials"]]
    fastest = client.get(url, params={"sort": "tokens_per_s", "order": "desc", "status": "ok"}).json()[
        "trials"
    ]
    speeds = [t["tokens_per_s"] for t in fastest]
    assert speeds == sorted(speeds, reverse=True)
    bpipe = client.get(url, params={"schedule": "bpipe"}).json()
    assert bpipe["trials"] and all(t["knobs"]["schedule"] == "bpipe" for t in bpipe["trials"])
    mbs = client.get(url, params={"micro_batch_size": 1, "schedule": "1f1b"}).json()
    assert all(
        t["knobs"]["micro_batch_size"] == 1 and t["knobs"]["schedule"] == "1f1b" for t in mbs["trials"]
    )
    assert bpipe["total"] + client.get(url, params={"schedule": "1f1b"}).json()["total"] == 3
    assert client.get(url, params={"flash_attention": "false"}).json()["total"] == 0  # tiny-gpt: flash on


def test_a_trial_has_its_memory_loss_and_both_timelines(client: TestClient) -> None:
    for row in ok_trials(client):
        t = client.get(f"/api/trials/{row['id']}").json()
        pp, m = t["config"]["pp"], t["config"]["num_microbatches"]
        assert len(t["stages"]) == pp and all(s["peak_memory_bytes"] > 0 for s in t["stages"])
        assert all(s["predicted_peak_memory_bytes"] for s in t["stages"]) and len(t["losses"]) == STEPS + 1
        tl = client.get(f"/api/trials/{row['id']}/timeline").json()
        assert tl["simulated_source"] == "stored" and tl["stages"] == pp
        for source in ("measured", "simulated"):
            spans = tl[source]
            assert {s["kind"] for s in spans} <= set(KINDS)
            for stage in range(pp):  # every forward and backward of the step, on every stage
                computes = [s["label"] for s in spans if s["stage"] == stage and s["kind"] == "compute"]
                assert sorted(computes) == sorted([f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)])
            assert all(0 <= s["start"] <= s["end"] for s in spans)
        assert tl["measured_step_s"] <= t["step_time_s"] * 3  # the recorded step is one of the measured ones
        if t["knobs"]["schedule"] == "bpipe":
            assert any(s["label"].startswith("EV") for s in tl["measured"])
        trace = client.get(f"/api/trials/{row['id']}/timeline", params={"format": "chrome"})
        assert "attachment" in trace.headers["content-disposition"]
        events = trace.json()["traceEvents"]
        complete = [e for e in events if e["ph"] == "X"]
        assert {e["pid"] for e in complete} == {1, 2} and len(complete) == len(tl["measured"]) + len(
            tl["simulated"]
        )
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in complete)


def test_compare_defaults_to_the_trials_counterpart(client: TestClient) -> None:
    rows = ok_trials(client)
    bpipe = [r for r in rows if r["knobs"]["schedule"] == "bpipe"]
    assert bpipe, "the campaign measured no BPipe trial"
    detail = client.get(f"/api/trials/{bpipe[0]['id']}").json()
    assert detail["counterpart"] is not None
    both = client.get("/api/compare", params={"a": bpipe[0]["id"]}).json()
    assert both["b"]["id"] == detail["counterpart"] and both["b"]["knobs"]["schedule"] == "1f1b"
    assert [tl["trial"] for tl in both["timelines"]] == [bpipe[0]["id"], detail["counterpart"]]
    page = client.get("/compare", params={"a": bpipe[0]["id"]})
    assert page.status_code == 200 and f"/trials/{detail['counterpart']}" in page.text


def test_the_advice_is_autotune_advise_s(client: TestClient, seeded: Path) -> None:
    api = client.get(f"/api/studies/{STUDY}/advice").json()
    assert api == json.loads(json.dumps(bpipe_payoff(storage=f"sqlite:///{seeded}", study=STUDY).to_dict()))
    cli = subprocess.run([*CLI, "advise", "--storage", f"sqlite:///{seeded}", "--study", STUDY, "--json"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cli.returncode == 0 and json.loads(cli.stdout) == api


def test_every_page_renders(client: TestClient) -> None:
    trial = ok_trials(client)[0]["id"]
    for url in (
        "/",
        f"/studies/{STUDY}",
        "/studies/llama-65b-h100",
        f"/trials/{trial}",
        f"/compare?a={trial}",
        f"/studies/{STUDY}?sort=tokens_per_s&order=desc&status=ok&schedule=bpipe",
    ):
        page = client.get(url)
        assert page.status_code == 200, (url, page.text[:300])
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert not re.search(r"""(src|href)=["']https?://""", page.text), url  # nothing from elsewhere


def test_writes_answer_405_on_every_route(client: TestClient) -> None:
    trial = ok_trials(client)[0]["id"]
    routes = [r.path for r in client.app.routes if hasattr(r, "path")]  # type: ignore[attr-defined]
    assert len(routes) >= 12
    for path in routes:
        url = (
            path.replace("{name}", STUDY)
            .replace("{trial_id}", str(trial))
            .replace("{path:path}", "dashboard.js")
        )
        url = "/static/dashboard.js" if path == "/static" else url
        assert client.get(url, params={"a": trial}).status_code == 200, url
        for method in WRITES:
            response = client.request(method, url, params={"a": trial})
            assert response.status_code == 405, (method, url, response.status_code)


def test_unknown_names_are_404_and_bad_parameters_422_naming_them(client: TestClient) -> None:
    for url in (
        "/api/studies/nope",
        "/api/studies/nope/trials",
        "/api/studies/nope/advice",
        "/api/trials/999999",
        "/api/trials/999999/timeline",
        "/api/compare?a=999999",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert re.search("nope|999999", response.json()["detail"]), response.text
    for url in ("/studies/nope", "/trials/999999", "/compare?a=999999"):
        response = client.get(url)
        assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    for params, name in (
        ({"limit": 0}, "limit"),
        ({"sort": "bogus"}, "sort"),
        ({"tp": "x"}, "tp"),
        ({"status": "nope"}, "status"),
        ({"offset": -1}, "offset"),
        ({"order": "up"}, "order"),
        ({"flash_attention": "maybe"}, "flash_attention"),
    ):
        response = client.get(f"/api/studies/{STUDY}/trials", params=params)
        assert response.status_code == 422 and response.json()["detail"].startswith(name), (
            params,
            response.text,
        )
        page = client.get(f"/studies/{STUDY}", params=params)
        assert page.status_code == 422 and name in page.text, params
    assert client.get("/api/trials/abc").status_code == 422


def test_browsing_leaves_the_database_unchanged(seeded: Path, client: TestClient) -> None:
    before = digest(seeded)
    trial = ok_trials(client)[0]["id"]
    for url in ("/", "/api/studies", f"/studies/{STUDY}", f"/api/studies/{STUDY}/advice", f"/trials/{trial}",
                f"/api/trials/{trial}/timeline?format=chrome", f"/compare?a={trial}"):  # fmt: skip
        assert client.get(url).status_code == 200
    assert digest(seeded) == before


def test_optuna_dashboard_still_opens_the_database(seeded: Path) -> None:
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    app = wsgi(f"sqlite:///{seeded}")
    environ: dict[str, Any] = {"PATH_INFO": "/api/studies", "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))  # type: ignore[arg-type]
    assert status[0].startswith("200"), body[:300]
    names = {s["study_name"] for s in json.loads(body)["study_summaries"]}
    assert STUDY in names


def test_the_default_bind_is_this_machine_only(seeded: Path) -> None:
    assert build_parser().parse_args(["dashboard"]).host == "127.0.0.1"
    with serving(seeded) as base:
        port = int(base.rsplit(":", 1)[1])
        listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A"]  # fmt: skip
        assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, not 0.0.0.0
        assert f"00000000:{port:04X}" not in listening


def _dashboard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "dashboard", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_the_command_refuses_what_it_cannot_serve(tmp_path: Path, seeded: Path) -> None:
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    before = digest(foreign)
    port = str(free_port())
    cases = {
        "no autotune data": ("--storage", f"sqlite:///{foreign}", "--port", port),
        "no database at": ("--storage", f"sqlite:///{tmp_path / 'missing.db'}", "--port", port),
        "postgresql": ("--storage", "postgresql://me:secretpw@127.0.0.1:1/db", "--port", port),
        "--port": ("--storage", f"sqlite:///{seeded}", "--port", "0"),
    }
    for expected, args in cases.items():
        proc = _dashboard(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (expected, proc.stderr)
        assert "secretpw" not in proc.stderr + proc.stdout
    assert digest(foreign) == before and not (tmp_path / "missing.db").exists()
    with serving(seeded) as base:  # the port it holds is in use for a second one
        taken = base.rsplit(":", 1)[1]
        proc = _dashboard("--storage", f"sqlite:///{seeded}", "--port", taken)
        assert proc.returncode == 2 and "--port" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_pages_show_a_postgresql_password_masked(postgres_db_url: str) -> None:
    from sqlalchemy.engine import make_url

    # trust authentication accepts any password: the pages must never show it
    url = make_url(postgres_db_url).set(password="secretpw").render_as_string(hide_password=False)
    with Store(url) as writer:
        fp = writer.register_fingerprint({"device": "cpu", "cpu": "test", "cpus": 1, "memory_gib": 1})
        writer.create_study("pg", space={"objective": "tokens_per_s"}, model="tiny-gpt", cluster="cpu-local",
                            fingerprint=fp)  # fmt: skip
    with Store(url, read_only=True) as store, TestClient(create_app(store)) as c:
        for path in (
            "/",
            "/api/studies",
            "/studies/pg",
            "/api/studies/pg",
            "/api/studies/nope",
            "/studies/nope",
        ):
            text = c.get(path).text
            assert "secretpw" not in text, path
        assert "***" in c.get("/").text


def test_the_api_is_documented_by_its_schema(client: TestClient) -> None:
    schema = client.get("/api/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/api/studies",
        "/api/studies/{name}",
        "/api/studies/{name}/trials",
        "/api/trials/{trial_id}",
        "/api/trials/{trial_id}/timeline",
        "/api/studies/{name}/advice",
        "/api/compare",
    } <= paths
    assert all(p.startswith("/api/") for p in paths)
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_a_running_campaigns_pages_reload_by_themselves(seeded: Path) -> None:
    url = f"sqlite:///{seeded}"
    with Store(url, read_only=True) as store, TestClient(create_app(store)) as c:
        assert 'http-equiv="refresh"' not in c.get(f"/studies/{STUDY}").text  # the campaign ended
        with Store(url) as writer:  # a trial starts, as a running campaign's would
            done = writer.trials(study=STUDY)[0]
            running = writer.start_trial(STUDY, config=done.config, fingerprint=done.fingerprint)
        for path in ("/", f"/studies/{STUDY}", f"/trials/{running}"):
            assert 'http-equiv="refresh"' in c.get(path).text, path
        assert c.get(f"/api/studies/{STUDY}").json()["running"] is True
