"""Migrations: from empty, and from revisions 0001 and 0002 with data, to head, on both backends;
the models agree with the migrated schema; the store's tables sit beside Optuna's."""

from __future__ import annotations

from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from storage import Store, StoreError, migrate
from storage.engine import open_engine
from storage.models import Base
from tests.storage_tests import cases

TABLES = {
    f"autotune_{t}"
    for t in (
        "fingerprints",
        "studies",
        "configs",
        "predictions",
        "trials",
        "trial_stages",
        "profiles",
        "timelines",
        "leases",
    )
}


def _tables(url: str) -> set[str]:
    engine = open_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_an_empty_database_upgrades_to_head(store_url: str) -> None:
    assert migrate.current(store_url) is None
    migrate.upgrade(store_url)
    assert migrate.current(store_url) == migrate.head() == "0003"
    assert _tables(store_url) == TABLES | {"autotune_alembic_version"}
    migrate.upgrade(store_url)  # a no-op at head
    assert migrate.current(store_url) == "0003"


def test_opening_a_store_migrates_unless_told_not_to(store_url: str) -> None:
    with pytest.raises(StoreError, match="holds no autotune data|no database at"):
        Store(store_url, migrate=False)
    Store(store_url).close()
    Store(store_url, migrate=False).close()
    assert migrate.current(store_url) == "0003"


_ROWS_0001 = [
    "INSERT INTO autotune_fingerprints (hash, info, created) VALUES ('fp', '{\"gpu\": \"H100\"}', :now)",
    "INSERT INTO autotune_studies (id, name, space, model, cluster, fingerprint_hash, created) "
    "VALUES (1, 's1', '{\"pp\": [1, 2]}', 'gpt-small', 'h100x8', 'fp', :now)",
    "INSERT INTO autotune_configs (hash, config) VALUES ('cfg', '{\"pp\": 2}')",
    "INSERT INTO autotune_trials (id, study_id, config_hash, fingerprint_hash, status, step_time_s, losses, "
    "attempt, started_at, finished_at) VALUES (7, 1, 'cfg', 'fp', 'ok', 0.25, '[3.5, 3.25]', 1, :now, :now)",
    "INSERT INTO autotune_trial_stages (trial_id, stage, peak_activation_bytes, peak_memory_bytes, "
    "evicted_bytes) VALUES (7, 0, 4294967296, 8589934592, 0)",
]


def test_a_database_at_0001_with_a_trial_upgrades_and_keeps_it(store_url: str) -> None:
    migrate.upgrade(store_url, "0001")
    assert migrate.current(store_url) == "0001"
    assert _tables(store_url) == TABLES - {"autotune_profiles", "autotune_timelines", "autotune_leases"} | {
        "autotune_alembic_version"
    }
    engine = open_engine(store_url)
    with engine.begin() as conn:
        for sql in _ROWS_0001:
            conn.execute(text(sql), {"now": datetime(2026, 1, 2, 3, 4, 5)})
    engine.dispose()
    with Store(store_url) as store:
        assert migrate.current(store_url) == migrate.head()
        trial = store.trial(7)
        assert (trial.study, trial.config, trial.status, trial.step_time_s, trial.losses) == (
            "s1", {"pp": 2}, "ok", 0.25, [3.5, 3.25],
        )  # fmt: skip
        assert trial.stages == [{"stage": 0, "peak_activation_bytes": 2**32, "peak_memory_bytes": 2**33,
                                 "evicted_bytes": 0, "predicted_peak_memory_bytes": None}]  # fmt: skip
        store.save_timeline(7, [{"action": "1F0"}])
        store.save_profile("fp", "gpt-small", {"layers": [1.0]})
        assert store.timeline(7) == [{"action": "1F0"}] and store.profile("fp", "gpt-small") == {
            "layers": [1.0]
        }
        assert store.measured("cfg", "fp") == trial


def _snapshot(store: Store) -> tuple[object, ...]:
    return (store.studies(), store.trials(), store.predictions(), store.timeline(1), store.profile("x", "m"))


def test_a_database_at_0002_with_studies_and_trials_upgrades_to_0003_and_keeps_every_row(
    store_url: str,
) -> None:
    """Written by the previous code: every row of 0002's tables is there, unchanged, after 0003."""
    migrate.upgrade(store_url, "0002")
    with Store(store_url, migrate=False) as old:  # the store's 0002 tables are today's
        fp = cases.study(old, "s1")
        cases.study(old, "s2", model="gpt-medium", hw=cases.A100)
        old.save_predictions("s1", [(cases.config(pp=p), cases.predicted(pp=p)) for p in (1, 2, 4)])
        for i, status in enumerate(["ok", "oom", "running"]):
            tid = old.start_trial(
                "s1", config=cases.config(pp=1 + i), fingerprint=fp, predicted=cases.predicted()
            )
            if status != "running":
                old.finish_trial(tid, cases.result(status, pp=1 + i))
        old.save_timeline(1, [{"action": "1F0"}])
        old.save_profile(fp, "gpt-small", {"layers": [1.0]})
        before = _snapshot(old)
    rows = {table: _count(store_url, table) for table in TABLES - {"autotune_leases"}}
    assert migrate.current(store_url) == "0002"
    assert (rows["autotune_trials"], rows["autotune_trial_stages"]) == (3, 1)
    with Store(store_url, read_only=True) as reader:  # a read-only command, before the upgrade
        assert _snapshot(reader) == before and reader.leases() == [] and reader.lease("s1") is None
        reader.check_lease_free("s1")
    with Store(store_url) as store:
        assert migrate.current(store_url) == "0003"
        assert _snapshot(store) == before and store.profile(fp, "gpt-small") == {"layers": [1.0]}
        assert {table: _count(store_url, table) for table in rows} == rows
        assert store.leases() == []
        assert store.acquire_lease("s1", holder="h", host="x", pid=1).study == "s1"


def _count(url: str, table: str) -> int:
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def test_the_models_match_the_migrated_schema(store_url: str) -> None:
    migrate.upgrade(store_url)
    engine = open_engine(store_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": migrate.VERSION_TABLE, "compare_type": True}
        )
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


def test_a_database_from_a_newer_autotune_is_refused(store_url: str) -> None:
    migrate.upgrade(store_url)
    engine = open_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = 'f00d'"))
    engine.dispose()
    with pytest.raises(StoreError, match="at revision f00d"):
        Store(store_url)


def test_the_store_lives_beside_optuna_in_one_database(store_url: str) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with Store(store_url) as store:
        fp = cases.study(store)
        tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
        storage = optuna.storages.RDBStorage(store_url)
        study = optuna.create_study(study_name="s1", storage=storage)
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        store.finish_trial(tid, cases.result("ok"))
    names = _tables(store_url)
    assert names >= TABLES and {"studies", "trials", "alembic_version"} <= names
    assert {n for n in names if n.startswith("autotune_")} == TABLES | {"autotune_alembic_version"}
    assert migrate.current(store_url) == migrate.head()
    with Store(store_url) as store:
        assert store.trial(tid).status == "ok"
    assert len(optuna.load_study(study_name="s1", storage=store_url).trials) == 2
