"""One campaign per study: hold the study's lease for as long as a `with` block runs.

    with hold(url, "my-study") as lease:   # StoreError if another live campaign runs it
        ...                               # lease.lost turns True if it was taken over

`hold` takes the lease (a random holder id, this host, this pid), keeps its heartbeat fresh
from a daemon thread with a store of its own (its own engine and connections: it never waits
for a connection of the campaign's pool), and releases it when the block ends, by an exception
or Ctrl-C too. A campaign
killed outright (SIGKILL, a lost machine) cannot release it: its heartbeat stops, and after
`stale_after` seconds the next campaign takes it over (at once, on the same host, when the
holder's pid is gone).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from autotune.redact import mask_secrets
from storage.base import BaseStore
from storage.engine import is_persistent
from storage.store import Store

log = logging.getLogger(__name__)


class HeldLease:
    """The lease a `hold` block holds: `holder` is its id; `lost` turns True once a heartbeat
    found it taken over (the campaign should then stop: another one runs the study)."""

    def __init__(self, study: str, holder: str) -> None:
        self.study = study
        self.holder = holder
        self._lost = threading.Event()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()


@contextmanager
def hold(
    store: str | BaseStore, study: str, *, interval: float = 5.0, stale_after: float = 30.0
) -> Iterator[HeldLease]:
    """Hold `study`'s lease in the store at `store` (a URL, or an open store) while the block runs.

    Heartbeats every `interval` seconds; `stale_after` is how old another campaign's heartbeat
    must be before its lease is taken over. `StoreError` (field `--study`) if a live campaign
    holds it.
    """
    with ExitStack() as stack:
        main = Store(store) if isinstance(store, str) else store
        if isinstance(store, str):
            stack.callback(main.close)
        held = HeldLease(study, uuid.uuid4().hex)
        main.acquire_lease(
            study, holder=held.holder, host=socket.gethostname(), pid=os.getpid(), stale_after=stale_after
        )
        try:
            # a store of its own; an in-memory database lives in `main`'s one connection: share it
            beats = Store(main.url) if is_persistent(main.url) else main
            stop = threading.Event()
            own = beats is not main
            thread = threading.Thread(
                target=_beat, args=(beats, held, interval, stop, own), name=f"lease {study}", daemon=True
            )
            thread.start()
        except BaseException:
            main.release_lease(study, held.holder)
            raise
        try:
            yield held
        except BaseException:
            _stop(thread, stop, interval)
            _release_quietly(main, held)  # the block's exception is the one to see
            raise
        _stop(thread, stop, interval)
        main.release_lease(study, held.holder)


def _stop(thread: threading.Thread, stop: threading.Event, interval: float) -> None:
    """Stop the heartbeats before the release; one stuck behind a lock is left to finish alone."""
    stop.set()
    thread.join(timeout=max(1.0, interval))


def _beat(store: BaseStore, held: HeldLease, interval: float, stop: threading.Event, own: bool) -> None:
    try:
        while not stop.wait(interval):
            try:
                mine = store.heartbeat(held.study, held.holder)
            except Exception as e:  # a passing database problem: try again; the lease outlives it
                log.warning("lease heartbeat of study %r failed: %s", held.study, _one_line(e))
                continue
            if not mine and not stop.is_set():  # after the release, a last heartbeat finds nothing
                held._lost.set()
                log.warning("the lease of study %r was taken over by another campaign", held.study)
                return
    finally:
        if own:
            store.close()


def _release_quietly(store: BaseStore, held: HeldLease) -> None:
    try:
        store.release_lease(held.study, held.holder)
    except Exception as e:  # it goes stale instead, and the next campaign takes it over
        log.warning("could not release the lease of study %r: %s", held.study, _one_line(e))


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return mask_secrets(lines[0] if lines else type(e).__name__)
