"""Ray dispatch on a real local Ray cluster: two nodes, placement groups, a lost worker."""

from __future__ import annotations

import time

import pytest

from autotune.config import TrialConfig, load_model
from trial_runners.dispatch import Finished, RayDispatcher


def _config(**kw: object) -> dict:
    return TrialConfig(model=load_model("tiny-gpt"), **kw).to_dict()  # type: ignore[arg-type]


def _drain(d: RayDispatcher, limit: float = 240.0) -> list[Finished]:
    out: list[Finished] = []
    deadline = time.monotonic() + limit
    while d.running and time.monotonic() < deadline:
        out += d.wait(1.0)
    assert not d.running, "trials did not finish"
    return out


def test_two_node_cluster_runs_trials_on_both_nodes(two_nodes: str) -> None:
    """Each node has one CPU, so two one-rank trials at once must land on different nodes."""
    with RayDispatcher(address=two_nodes) as d:
        assert d.nodes() == 2
        for key in range(2):
            d.submit(key, _config(), steps=1, seed=key, timeout=120)
        assert d.running == 2
        done = _drain(d)
    assert sorted(f.key for f in done) == [0, 1]
    assert all(f.result.ok for f in done), [f.result.error for f in done]
    nodes = {f.worker.split("/")[1] for f in done if f.worker}
    assert len(nodes) == 2


def test_a_lost_worker_is_retried_once_then_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTUNE_INJECT_FAULT", "lost@0:pp=2")
    with RayDispatcher(num_cpus=2) as d:
        d.submit("retried", _config(pp=2), steps=1, seed=0, timeout=120)
        (once,) = _drain(d)
    assert once.result.status == "ok" and once.attempt == 2
    monkeypatch.setenv("AUTOTUNE_INJECT_FAULT", "lost@0:pp=2;lost@1:pp=2")
    with RayDispatcher(num_cpus=2) as d:
        d.submit("lost-twice", _config(pp=2), steps=1, seed=0, timeout=120)
        (twice,) = _drain(d)
    assert twice.result.status == "failed" and twice.attempt == 2
    assert twice.result.error is not None
    assert "worker lost" in twice.result.error and "after one retry" in twice.result.error


def test_a_trial_wider_than_any_node_spans_nodes_and_trains_as_on_one(two_nodes: str) -> None:
    """World size 2 on nodes of 1 CPU: ranks on both nodes meet over TCP; same losses as locally."""
    from trial_runners.trial import run_trial

    config = _config(pp=2, num_microbatches=4)
    local = run_trial(TrialConfig.from_dict(config), steps=1, seed=3, timeout=120)
    with RayDispatcher(address=two_nodes) as d:
        d.submit("wide", config, steps=1, seed=3, timeout=120)
        (done,) = _drain(d)
    assert done.result.status == "ok", done.result.error
    assert done.worker is not None and len(done.worker.split(",")) == 2  # one part per node
    assert done.result.losses == local.losses
    assert [s.peak_activation_bytes for s in done.result.stages] == [
        s.peak_activation_bytes for s in local.stages
    ]


def test_a_rank_dying_on_one_node_fails_the_spanning_trial_at_once(
    two_nodes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOTUNE_INJECT_FAULT", "crash@1:pp=2")
    started = time.monotonic()
    with RayDispatcher(address=two_nodes) as d:
        d.submit("wide", _config(pp=2, num_microbatches=4), steps=1, seed=0, timeout=300)
        (done,) = _drain(d)
    assert done.result.status == "failed" and "rank 1 died" in (done.result.error or "")
    assert time.monotonic() - started < 120  # the other node's ranks were not left to time out


def test_a_trial_queued_for_resources_is_not_timed_out_by_its_wait() -> None:
    """Four two-rank trials on two CPUs run one after another, the last starting well after its
    own 12 s + 1 s would have run out had the clock started at submission."""
    with RayDispatcher(num_cpus=2, grace=1.0) as d:
        assert (d.capacity(2), d.capacity(1)) == (1, 2)
        for key in range(4):
            d.submit(key, _config(pp=2), steps=1, seed=key, timeout=12)
        done = _drain(d)
    assert sorted(f.key for f in done) == [0, 1, 2, 3]
    assert all(f.result.ok for f in done), [f.result.error for f in done]
