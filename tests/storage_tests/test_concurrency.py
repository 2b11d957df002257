"""Concurrent writer processes on one fresh database: no errors, no lost or doubled trials."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from storage import Store, migrate
from tests.storage_tests import cases

WRITERS = 4
TRIALS = 50


def _writer(url: str, worker: int) -> list[int]:
    """One campaign process: opens (and so migrates) the store, then runs its trials."""
    with Store(url) as store:
        fp = cases.study(store, "shared")
        ids = []
        for i in range(TRIALS):
            # every writer measures the same configs, so their config rows collide too
            cfg = cases.config(pp=1 + i % 4, micro_batches=i)
            tid = store.start_trial(
                "shared", config=cfg, fingerprint=fp, worker=f"w{worker}", predicted={"n": i}
            )
            store.finish_trial(tid, cases.result("ok" if i % 5 else "oom", pp=1 + i % 4))
            ids.append(tid)
        return ids


def test_concurrent_writer_processes_lose_nothing(store_url: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(WRITERS, mp_context=spawn) as pool:
        futures = [pool.submit(_writer, store_url, w) for w in range(WRITERS)]
        returned = [f.result(timeout=300) for f in futures]
    assert migrate.current(store_url) == migrate.head()
    ids = [i for ids in returned for i in ids]
    assert len(ids) == len(set(ids)) == WRITERS * TRIALS
    with Store(store_url) as store:
        trials = store.trials(study="shared")
        assert sorted(ids) == [t.id for t in trials]
        assert all(t.finished for t in trials) and len(trials) == WRITERS * TRIALS
        assert sum(t.status == "ok" for t in trials) == WRITERS * TRIALS * 4 // 5
        for t in trials:
            assert t.worker is not None and len(t.stages) == (t.config["pp"] if t.status == "ok" else 0)
            assert returned[int(t.worker[1:])][t.predicted["n"]] == t.id  # type: ignore[index]
        assert [s.name for s in store.studies()] == ["shared"]


def test_threads_share_one_store(store_url: str) -> None:
    with Store(store_url) as store:
        fp = cases.study(store, "threads")

        def run(i: int) -> int:
            tid = store.start_trial("threads", config=cases.config(pp=1 + i % 4), fingerprint=fp)
            return store.finish_trial(tid, cases.result("ok", pp=1 + i % 4)).id

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(run, range(80)))
        assert sorted(ids) == [t.id for t in store.trials(study="threads", status="ok")]
