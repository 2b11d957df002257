"""Leases: one campaign per study. A live holder refuses others, naming itself; a dead one (stale
heartbeat, or a pid gone from this host) is taken over; racing takers get exactly one winner;
`hold` keeps the heartbeat moving and always releases."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from storage import LeaseRecord, Store, StoreError
from storage.engine import open_engine
from storage.lease import hold

HOST = socket.gethostname()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as st:
        yield st


def _age(url: str, study: str, seconds: float) -> None:
    """Make the lease's last heartbeat `seconds` old, as a campaign killed that long ago leaves it."""
    then = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=seconds)
    engine = open_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE autotune_leases SET heartbeat_at = :t WHERE study = :s"), {"t": then, "s": study}
            )
    finally:
        engine.dispose()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_second_campaign_is_refused_naming_the_first(store: Store) -> None:
    me = os.getpid()  # alive, on this host
    first = store.acquire_lease("s1", holder="a" * 32, host=HOST, pid=me)
    assert (first.study, first.holder, first.host, first.pid) == ("s1", "a" * 32, HOST, me)
    assert first.acquired_at == first.heartbeat_at and first.acquired_at.tzinfo is UTC
    for host in ("node-b", HOST):
        with pytest.raises(StoreError) as e:
            store.acquire_lease("s1", holder="b" * 32, host=host, pid=1)
        assert e.value.field == "--study" and "\n" not in str(e.value)
        started = f"{first.acquired_at:%Y-%m-%d %H:%M:%S} UTC"
        assert e.value.rule == (
            f"study 's1' is being run by another campaign (pid {me} on {HOST}, started {started}, "
            "last heartbeat 0 s ago); wait for it to finish, or stop it"
        )
    assert store.lease("s1") == first


def test_the_same_holder_may_take_its_lease_again(store: Store) -> None:
    first = store.acquire_lease("s1", holder="a", host=HOST, pid=os.getpid())
    again = store.acquire_lease("s1", holder="a", host=HOST, pid=os.getpid())
    assert again.acquired_at == first.acquired_at and again.heartbeat_at >= first.heartbeat_at


def test_a_stale_lease_is_taken_over(store: Store) -> None:
    store.acquire_lease("s1", holder="old", host="elsewhere", pid=os.getpid())
    _age(store.url, "s1", 20)
    with pytest.raises(StoreError, match="last heartbeat 20 s ago"):
        store.acquire_lease("s1", holder="new", host=HOST, pid=os.getpid(), stale_after=30)
    _age(store.url, "s1", 31)
    taken = store.acquire_lease("s1", holder="new", host=HOST, pid=os.getpid(), stale_after=30)
    assert (taken.holder, taken.host) == ("new", HOST) and taken.acquired_at == taken.heartbeat_at
    assert store.heartbeat("s1", "old") is False
    store.release_lease("s1", "old")  # not its lease any more: nothing happens
    assert store.lease("s1") == taken and store.heartbeat("s1", "new") is True


def test_a_dead_pid_on_this_host_is_taken_over_at_once(store: Store) -> None:
    dead = _dead_pid()
    store.acquire_lease("here", holder="old", host=HOST, pid=dead)
    assert store.acquire_lease("here", holder="new", host=HOST, pid=os.getpid()).holder == "new"
    store.acquire_lease("there", holder="old", host="other-host", pid=dead)  # cannot tell from here
    with pytest.raises(StoreError, match=f"pid {dead} on other-host"):
        store.acquire_lease("there", holder="new", host=HOST, pid=os.getpid())


def test_release_then_acquire(store: Store) -> None:
    store.acquire_lease("s1", holder="a", host=HOST, pid=os.getpid())
    store.release_lease("s1", "someone-else")
    assert store.lease("s1") is not None
    store.release_lease("s1", "a")
    assert store.lease("s1") is None and store.heartbeat("s1", "a") is False
    assert store.acquire_lease("s1", holder="b", host=HOST, pid=os.getpid()).holder == "b"


def test_leases_are_frozen_records_listed_by_study(store: Store) -> None:
    for study in ("s2", "s1"):
        store.acquire_lease(study, holder=study * 3, host=HOST, pid=os.getpid())
    leases = store.leases()
    assert [(r.study, r.holder) for r in leases] == [("s1", "s1s1s1"), ("s2", "s2s2s2")]
    assert all(isinstance(r, LeaseRecord) for r in leases) and store.lease("nope") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        leases[0].holder = "x"  # type: ignore[misc]


def _race(url: str, take: Callable[[Store, int], LeaseRecord], n: int = 6) -> list[LeaseRecord | StoreError]:
    """`n` threads, each with its own store (its own engine and connections), take at once."""
    stores = [Store(url) for _ in range(n)]
    barrier = threading.Barrier(n)
    outcomes: list[LeaseRecord | StoreError] = [StoreError("-", "did not run")] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = take(stores[i], i)
        except StoreError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for st in stores:
        st.close()
    return outcomes


def test_racing_campaigns_get_exactly_one_winner(store: Store) -> None:
    def take(st: Store, i: int) -> LeaseRecord:
        return st.acquire_lease("s1", holder=f"h{i}", host=f"node-{i}", pid=os.getpid())

    for _ in range(2):  # a free lease, then a stale one
        outcomes = _race(store.url, take)
        won = [o for o in outcomes if isinstance(o, LeaseRecord)]
        lost = [o for o in outcomes if isinstance(o, StoreError)]
        assert len(won) == 1 and len(lost) == 5, outcomes
        assert all(f"on {won[0].host}," in e.rule for e in lost)
        assert store.lease("s1") == won[0]
        _age(store.url, "s1", 120)


def test_hold_keeps_the_heartbeat_moving_and_releases(store: Store) -> None:
    with hold(store.url, "s1", interval=0.2) as held:
        first = store.lease("s1")
        assert first is not None and (first.holder, first.host, first.pid) == (held.holder, HOST, os.getpid())
        beats = {first.heartbeat_at}

        def moved_twice() -> bool:
            beats.add(store.lease("s1").heartbeat_at)  # type: ignore[union-attr]
            return len(beats) >= 3

        _wait_for(moved_twice)
        with pytest.raises(StoreError, match=f"pid {os.getpid()} on {HOST}"), hold(store, "s1"):
            pass
        assert not held.lost and store.lease("s1").holder == held.holder  # type: ignore[union-attr]
    assert store.lease("s1") is None


@pytest.mark.parametrize("error", [RuntimeError("trial failed"), KeyboardInterrupt()])
def test_hold_releases_when_the_block_raises(store: Store, error: BaseException) -> None:
    with pytest.raises(type(error)), hold(store, "s1", interval=0.2):
        assert store.lease("s1") is not None
        raise error
    assert store.lease("s1") is None
    with hold(store, "s1"):  # free again
        pass


def test_hold_notices_a_takeover(store: Store) -> None:
    with hold(store, "s1", interval=0.2) as held:
        _age(store.url, "s1", 120)
        thief = store.acquire_lease("s1", holder="thief", host="elsewhere", pid=1)
        _wait_for(lambda: held.lost)
    assert store.lease("s1") == thief  # leaving the block released nothing of the thief's


def test_a_read_only_store_tells_whether_the_lease_is_free(store: Store) -> None:
    with Store(store.url, read_only=True) as reader:
        reader.check_lease_free("s1")  # no lease at all
        store.acquire_lease("s1", holder="a", host="elsewhere", pid=1)
        with pytest.raises(StoreError) as e:
            reader.check_lease_free("s1")
        lease = reader.lease("s1")
        assert lease is not None and e.value.field == "--study"
        assert e.value.rule.startswith("study 's1' is being run by another campaign (pid 1 on elsewhere, ")
        _age(store.url, "s1", 120)
        reader.check_lease_free("s1")  # stale: the next campaign will take it over
    store.acquire_lease("s2", holder="b", host=HOST, pid=_dead_pid())
    store.check_lease_free("s2")  # its process is gone from this host
