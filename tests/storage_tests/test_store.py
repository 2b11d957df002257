"""The store's conformance suite: every API method and the contract, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC

import pytest
from sqlalchemy.exc import IntegrityError

from storage import FinishedTrialError, NotFoundError, Store, StoreError, config_hash, fingerprint_hash
from tests.storage_tests import cases
from tests.storage_tests.cases import A100, H100, SPACE


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as st:
        yield st


def test_fingerprints_are_idempotent_and_keyed_by_content(store: Store) -> None:
    fp = store.register_fingerprint(H100)
    assert fp == store.register_fingerprint(dict(reversed(H100.items())))
    assert fp == fingerprint_hash(H100) and len(fp) == 64
    assert store.register_fingerprint(A100) != fp


def test_create_study_is_idempotent_and_listed(store: Store) -> None:
    fp = cases.study(store, "s1")
    again = store.create_study("s1", space=dict(SPACE), model="gpt-small", cluster="h100x8", fingerprint=fp)
    assert again == store.study("s1")
    assert (again.name, again.space, again.model, again.cluster, again.fingerprint) == (
        "s1", SPACE, "gpt-small", "h100x8", fp,
    )  # fmt: skip
    assert again.created.tzinfo is UTC
    cases.study(store, "s2", model="gpt-medium")
    assert [s.name for s in store.studies()] == ["s1", "s2"]
    assert store.study("nope") is None


def test_a_different_study_under_an_existing_name_is_refused(store: Store) -> None:
    fp = cases.study(store, "s1")
    with pytest.raises(StoreError) as e:
        store.create_study("s1", space={"pp": [8]}, model="gpt-small", cluster="h100x8", fingerprint=fp)
    assert e.value.field == "--study" and "space" in e.value.rule and "\n" not in str(e.value)
    with pytest.raises(StoreError, match="model"):
        store.create_study("s1", space=SPACE, model="gpt-large", cluster="h100x8", fingerprint=fp)
    assert store.study("s1").space == SPACE  # type: ignore[union-attr]


def test_unknown_names_raise_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.create_study("s", space=SPACE, model="m", cluster="c", fingerprint="0" * 64)
    fp = cases.study(store)
    with pytest.raises(NotFoundError):
        store.start_trial("nope", config=cases.config(), fingerprint=fp)
    with pytest.raises(NotFoundError):
        store.start_trial("s1", config=cases.config(), fingerprint="0" * 64)
    with pytest.raises(NotFoundError):
        store.trial(12345)
    with pytest.raises(NotFoundError):
        store.save_predictions("nope", [])
    assert store.trials() == []


def test_a_trial_runs_then_finishes_with_predicted_beside_measured(store: Store) -> None:
    fp = cases.study(store)
    pred = cases.predicted(pp=2)
    tid = store.start_trial(
        "s1", config=cases.config(), fingerprint=fp, predicted=pred, optuna_number=3, worker="w0"
    )
    running = store.trial(tid)
    assert (running.status, running.finished, running.finished_at, running.stages) == (
        "running",
        False,
        None,
        [],
    )
    assert running.config == cases.config() and running.config_hash == config_hash(cases.config())
    done = store.finish_trial(tid, cases.result("ok", pp=2))
    assert done == store.trial(tid) and done.finished
    assert (done.status, done.error, done.step_time_s, done.mfu, done.achieved_tflops) == (
        "ok",
        None,
        0.5,
        0.41,
        12.5,
    )
    assert done.tokens_per_s == 4096 / 0.5 and done.losses == [10.8, 10.7, 10.65]
    assert (done.predicted, done.optuna_number, done.attempt, done.worker) == (pred, 3, 1, "w0")
    assert done.stages == [
        {"stage": s, "peak_activation_bytes": 3 * 2**30 + s, "peak_memory_bytes": 5 * 2**30 + s,
         "evicted_bytes": 2**20 * s, "predicted_peak_memory_bytes": 1000 * (s + 1)}
        for s in range(2)
    ]  # fmt: skip
    assert done.started_at.tzinfo is UTC and done.started_at <= done.finished_at  # type: ignore[operator]


def test_a_trial_without_prediction_has_no_predicted_stage_memory(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp, attempt=2)
    done = store.finish_trial(tid, cases.result("ok"))
    assert done.attempt == 2 and done.predicted is None
    assert [st["predicted_peak_memory_bytes"] for st in done.stages] == [None, None]


def test_finishing_records_where_it_ran_and_which_attempt(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
    done = store.finish_trial(tid, cases.result("ok"), attempt=2, worker="node-b/1234")
    assert (done.attempt, done.worker) == (2, "node-b/1234")
    assert store.trial(tid) == done


@pytest.mark.parametrize("status", ["oom", "failed", "timeout"])
def test_failed_trials_keep_their_reason(store: Store, status: str) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
    done = store.finish_trial(tid, cases.result(status))
    assert (done.status, done.error, done.step_time_s, done.losses, done.stages) == (
        status, f"{status} in stage 0", None, [], [],
    )  # fmt: skip


def test_a_finished_trial_never_changes(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
    done = store.finish_trial(tid, cases.result("ok"))
    for again in (cases.result("failed"), cases.result("ok", step_time_s=0.1)):
        with pytest.raises(FinishedTrialError):
            store.finish_trial(tid, again)
    assert store.trial(tid) == done
    store.interrupt_running("s1")
    assert store.trial(tid) == done


def test_finishing_is_atomic(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
    broken = cases.result("ok")
    broken["stages"] = [broken["stages"][0], broken["stages"][0]]  # the same stage twice
    with pytest.raises(IntegrityError):
        store.finish_trial(tid, broken)
    assert (store.trial(tid).status, store.trial(tid).stages) == ("running", [])
    assert store.finish_trial(tid, cases.result("ok")).status == "ok"


def test_finishing_checks_its_input(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
    with pytest.raises(ValueError, match="status"):
        store.finish_trial(tid, {**cases.result("ok"), "status": "running"})
    with pytest.raises(NotFoundError):
        store.finish_trial(tid + 1, cases.result("ok"))
    assert store.trial(tid).status == "running"


def test_non_finite_losses_are_stored_as_null(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
    done = store.finish_trial(tid, {**cases.result("ok"), "losses": [10.0, float("nan"), float("inf")]})
    assert done.losses == [10.0, None, None]


def test_interrupt_running_closes_only_that_studys_running_trials(store: Store) -> None:
    fp = cases.study(store, "s1")
    cases.study(store, "s2")
    a = store.start_trial("s1", config=cases.config(pp=1), fingerprint=fp)
    b = store.start_trial("s1", config=cases.config(pp=2), fingerprint=fp)
    c = store.start_trial("s1", config=cases.config(pp=4), fingerprint=fp)
    other = store.start_trial("s2", config=cases.config(pp=1), fingerprint=fp)
    finished = store.finish_trial(b, cases.result("ok"))
    closed = store.interrupt_running("s1")
    assert [t.id for t in closed] == [a, c]
    assert all((t.status, t.error) == ("failed", "interrupted") and t.finished_at for t in closed)
    assert store.trial(b) == finished and store.trial(other).status == "running"
    assert store.interrupt_running("s1") == []


def test_measured_finds_the_latest_result_in_any_study_on_the_same_hardware(store: Store) -> None:
    h100 = cases.study(store, "s1")
    a100 = cases.study(store, "s2", hw=A100, cluster="a100x8")
    cases.study(store, "s3")
    key = config_hash(cases.config())
    assert store.measured(key, h100) is None
    first = store.start_trial("s1", config=cases.config(), fingerprint=h100)
    assert store.measured(key, h100) is None  # running: nothing measured yet
    store.finish_trial(first, cases.result("ok", step_time_s=0.5))
    store.finish_trial(store.start_trial("s2", config=cases.config(), fingerprint=a100), cases.result("oom"))
    assert store.measured(key, h100).id == first  # type: ignore[union-attr]
    assert store.measured(key, a100).status == "oom"  # type: ignore[union-attr]
    later = store.start_trial("s3", config=cases.config(), fingerprint=h100)
    store.finish_trial(later, cases.result("ok", step_time_s=0.4))
    store.start_trial("s3", config=cases.config(), fingerprint=h100)
    store.interrupt_running("s3")  # an interrupted trial measured nothing
    found = store.measured(key, h100)
    assert (found.id, found.study, found.step_time_s) == (later, "s3", 0.4)  # type: ignore[union-attr]
    assert store.measured(config_hash(cases.config(pp=4)), h100) is None


def test_predictions_are_replaced_and_filtered(store: Store) -> None:
    fp = cases.study(store, "s1")
    cases.study(store, "s2", model="gpt-medium", cluster="a100x8")
    rows = [(cases.config(pp=p), cases.predicted(pp=p, step_time_s=0.1 * p)) for p in (1, 2, 4)]
    store.save_predictions("s1", rows)
    store.save_predictions("s2", rows[:1])
    got = store.predictions("s1")
    assert [(p.rank, p.config, p.predicted) for p in got] == [
        (i + 1, c, pr) for i, (c, pr) in enumerate(rows)
    ]
    assert got[0].config_hash == config_hash(cases.config(pp=1)) and got[0].study == "s1"
    store.save_predictions("s1", rows[1:])
    assert [p.config["pp"] for p in store.predictions("s1")] == [2, 4]
    assert [(p.study, p.rank) for p in store.predictions()] == [("s1", 1), ("s1", 2), ("s2", 1)]
    assert [p.study for p in store.predictions(model="gpt-medium")] == ["s2"]
    assert [p.study for p in store.predictions(cluster="h100x8")] == ["s1", "s1"]
    assert store.predictions("s1", cluster="a100x8") == []
    store.save_predictions("s1", [])
    assert store.predictions("s1") == [] and fp


def test_trials_filter_by_study_model_cluster_hardware_and_status(store: Store) -> None:
    h100 = cases.study(store, "s1")
    a100 = cases.study(store, "s2", model="gpt-medium", cluster="a100x8", hw=A100)
    ids = [store.start_trial("s1", config=cases.config(pp=p), fingerprint=h100) for p in (1, 2)]
    ids.append(store.start_trial("s2", config=cases.config(), fingerprint=a100))
    store.finish_trial(ids[0], cases.result("ok"))

    def pick(**filters: str) -> list[int]:
        return [t.id for t in store.trials(**filters)]

    assert pick() == ids and pick(study="s1") == ids[:2] and pick(study="s2") == ids[2:]
    assert pick(model="gpt-medium") == ids[2:] and pick(cluster="h100x8") == ids[:2]
    assert pick(fingerprint=a100) == ids[2:] and pick(status="running") == ids[1:]
    assert pick(study="s1", status="ok") == ids[:1] and pick(study="s2", model="gpt-small") == []
    assert pick(config_hash=config_hash(cases.config(pp=2))) == ids[1:]


def test_profiles_keep_the_latest_per_hardware_and_model(store: Store) -> None:
    fp = store.register_fingerprint(H100)
    assert store.profile(fp, "gpt-small") is None
    store.save_profile(fp, "gpt-small", {"layers": [1.0, 2.0], "version": 1})
    store.save_profile(fp, "gpt-small", {"layers": [1.5, 2.5], "version": 2})
    store.save_profile(fp, "gpt-medium", {"layers": [3.0], "version": 1})
    assert store.profile(fp, "gpt-small") == {"layers": [1.5, 2.5], "version": 2}
    assert store.profile(fp, "gpt-medium") == {"layers": [3.0], "version": 1}
    assert store.profile(store.register_fingerprint(A100), "gpt-small") is None
    with pytest.raises(NotFoundError):
        store.save_profile("0" * 64, "gpt-small", {})


def test_timelines_round_trip_and_are_replaced(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
    assert store.timeline(tid) is None
    events = [
        {"rank": 0, "action": "1F0", "start": 0.0, "end": 0.01},
        {"rank": 1, "action": "1B0", "start": 0.02},
    ]
    store.save_timeline(tid, events)
    assert store.timeline(tid) == events
    store.save_timeline(tid, {"ranks": 2, "events": events})
    assert store.timeline(tid) == {"ranks": 2, "events": events}
    with pytest.raises(NotFoundError):
        store.save_timeline(tid + 1, [])


def test_records_are_frozen_snapshots(store: Store) -> None:
    fp = cases.study(store)
    tid = store.start_trial("s1", config=cases.config(), fingerprint=fp, predicted=cases.predicted())
    record = store.trial(tid)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "ok"  # type: ignore[misc]
    record.config["pp"] = 99
    record.predicted["stages"].clear()  # type: ignore[index]
    store.finish_trial(tid, cases.result("ok"))
    assert record.status == "running"  # a snapshot: later writes do not reach it
    fresh = store.trial(tid)
    assert fresh.config == cases.config() and fresh.stages[1]["predicted_peak_memory_bytes"] == 2000
    first, second = store.trials()[0], store.trials()[0]
    assert first == second and first.config is not second.config


def test_data_survives_reopening(store_url: str) -> None:
    with Store(store_url) as st:
        fp = cases.study(st)
        tid = st.start_trial("s1", config=cases.config(), fingerprint=fp)
        done = st.finish_trial(tid, cases.result("ok"))
    with Store(store_url) as st:
        assert st.trial(tid) == done and [s.name for s in st.studies()] == ["s1"]
