"""The fast path: the simulator's step time for many configurations at once.

With the programs fixed, every time in the simulator is a max-plus recurrence of durations:
an action starts at the max of its stage's clock and the ends of the transfers it waits for,
and ends a duration later; a transfer starts at the max of its two posts and its link's last
end. The only choice the event loop makes is the order of transfers on a link, and that is the
sender's program order (one sender per directed link), so the recurrences can be run in any
order that respects the dependencies. `compile_schedule` fixes one such order once per
(schedule, p, m, cap) and encodes it as integer arrays (each action's stage, kind, the
transfers it waits for or posts; each transfer's link and duration); `step_times` replays
those arrays for every configuration in a compiled loop (numba), a few nanoseconds per action,
so screening a space of thousands of configurations takes a fraction of a second. Tests check
it against `simulate` to floating-point precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.estimate.simulate import StageCosts, needed_transfers, transfer_key
from autotune.schedules.ir import Kind, Schedule
from autotune.schedules.memory import release_points

TransferKey = tuple[str, int, int, int]  # (family, micro-batch, source, destination)

FWD, BWD, POST = 0, 1, 2  # op kinds
SEND, EVICTOR, ACCEPTOR = (
    0,
    1,
    2,
)  # what a transfer's duration is: send_act[min(src, dst)], evict[src], evict[dst]


@dataclass(frozen=True)
class CompiledSchedule:
    """A schedule's actions in a dependency order, as arrays the replay loop reads.

    Ops: `stage`, `kind` (FWD, BWD, POST), `slot` (the transfer a POST posts one end of, else
    -1) and the transfers each waits for (`wait_slots[wait_ptr[i]:wait_ptr[i + 1]]`).
    Transfers (slots): `src`, `dst`, `link` (one index per directed link and family: p2p or the
    BPipe pair link), and the duration's source (`duration_kind` of `duration_stage`).
    """

    name: str
    num_stages: int
    num_microbatches: int
    stage: np.ndarray
    kind: np.ndarray
    slot: np.ndarray
    wait_ptr: np.ndarray
    wait_slots: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    link: np.ndarray
    duration_kind: np.ndarray
    duration_stage: np.ndarray
    num_links: int

    @property
    def num_ops(self) -> int:
        return len(self.stage)


def _order(schedule: Schedule) -> list[tuple[int, int, tuple[TransferKey, ...], TransferKey | None]]:
    """(stage, kind, waits, posted transfer) of every action, in an order that respects every
    dependency: stage by stage, each as far as the transfers it waits for have both ends posted.

    What an action waits for depends only on its own stage's program (`needed_transfers`: a
    backward waits for a load its own stage posted earlier), so it is worked out once per action."""
    p = schedule.num_stages
    everything: set[TransferKey] = set()
    programs: list[list[tuple[int, int, tuple[TransferKey, ...], TransferKey | None]]] = []
    for s, program in enumerate(schedule.programs):
        keys = [None if a.kind.is_compute else transfer_key(schedule, s, a) for a in program]
        everything.update(k for k in keys if k is not None)
        programs.append([(s, 0, (), key) for key in keys])
    for s, program in enumerate(schedule.programs):
        outgoing: list[TransferKey] = []
        own_posts: set[TransferKey] = set()
        releases = release_points(program, schedule.cap)
        for i, (action, release) in enumerate(zip(program, releases, strict=True)):
            waits = tuple(needed_transfers(schedule, s, action, outgoing if release else [], own_posts))
            if release:
                outgoing = []
            key = programs[s][i][3]
            if key is not None:
                own_posts.add(key)
                if action.kind in (Kind.EVICT, Kind.RESTORE):
                    outgoing.append(key)
            kind = POST if key is not None else (FWD if action.kind is Kind.F else BWD)
            programs[s][i] = (s, kind, waits, key)
    pc = [0] * p
    posted: dict[TransferKey, int] = dict.fromkeys(everything, 0)
    ops: list[tuple[int, int, tuple[TransferKey, ...], TransferKey | None]] = []
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            program_ops = programs[s]
            i = pc[s]
            while i < len(program_ops):
                op = program_ops[i]
                if any(posted.get(key, 0) < 2 for key in op[2]):
                    break
                if op[3] is not None:
                    posted[op[3]] += 1
                ops.append(op)
                i += 1
            if i > pc[s]:
                pc[s] = i
                progressed = True
    if any(pc[s] < len(programs[s]) for s in range(p)):
        raise ValueError("the programs deadlock; run simulate() for the grid")
    return ops


def _encode(schedule: Schedule) -> CompiledSchedule:
    ops = _order(schedule)
    slots: dict[TransferKey, int] = {}
    links: dict[tuple[bool, int, int], int] = {}
    src: list[int] = []
    dst: list[int] = []
    link: list[int] = []
    duration_kind: list[int] = []
    duration_stage: list[int] = []

    def slot_of(key: TransferKey) -> int:
        if key not in slots:
            family, _, a, b = key
            pair = family in ("evict", "load")
            slots[key] = len(src)
            src.append(a)
            dst.append(b)
            link.append(links.setdefault((pair, a, b), len(links)))
            if not pair:
                duration_kind.append(SEND)
                duration_stage.append(min(a, b))
            elif family == "evict":
                duration_kind.append(EVICTOR)
                duration_stage.append(a)
            else:
                duration_kind.append(ACCEPTOR)
                duration_stage.append(b)
        return slots[key]

    wait_ptr = [0]
    wait_slots: list[int] = []
    post_slot: list[int] = []
    for _, _, waits, post in ops:
        wait_slots += [slot_of(key) for key in waits]
        wait_ptr.append(len(wait_slots))
        post_slot.append(slot_of(post) if post is not None else -1)

    def array(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.int64)

    return CompiledSchedule(
        name=schedule.name,
        num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches,
        stage=array([op[0] for op in ops]),
        kind=array([op[1] for op in ops]),
        slot=array(post_slot),
        wait_ptr=array(wait_ptr),
        wait_slots=array(wait_slots),
        src=array(src),
        dst=array(dst),
        link=array(link),
        duration_kind=array(duration_kind),
        duration_stage=array(duration_stage),
        num_links=len(links),
    )


_COMPILED: dict[tuple[str, int, int, int | None], CompiledSchedule] = {}


def compile_schedule(schedule: Schedule) -> CompiledSchedule:
    """The fast path's arrays for `schedule` (cached per name, sizes and cap)."""
    key = (schedule.name, schedule.num_stages, schedule.num_microbatches, schedule.cap)
    compiled = _COMPILED.get(key)
    if compiled is None:
        if len(_COMPILED) >= 1024:
            _COMPILED.clear()
        compiled = _COMPILED[key] = _encode(schedule)
    return compiled


def _replay(
    fwd: np.ndarray,
    bwd: np.ndarray,
    send: np.ndarray,
    evict: np.ndarray,
    stage: np.ndarray,
    kind: np.ndarray,
    slot: np.ndarray,
    wait_ptr: np.ndarray,
    wait_slots: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    link: np.ndarray,
    duration_kind: np.ndarray,
    duration_stage: np.ndarray,
    num_links: int,
) -> np.ndarray:
    """(N, p): when each stage's compute and every transfer it takes part in are done, per
    configuration (rows of the (N, p) duration arrays). The simulator's recurrences, in the
    compiled order; times start at 0, so an unused link's clock can start at 0 too."""
    n, p = fwd.shape
    num_slots = len(src)
    out = np.empty((n, p))
    clock = np.empty(p)
    finish = np.empty(p)
    first = np.empty(num_slots)
    end = np.empty(num_slots)
    posted = np.empty(num_slots, dtype=np.bool_)
    link_free = np.empty(num_links)
    for c in range(n):
        clock[:] = 0.0
        finish[:] = 0.0
        posted[:] = False
        link_free[:] = 0.0
        for i in range(len(stage)):
            s = stage[i]
            now = clock[s]
            for w in range(wait_ptr[i], wait_ptr[i + 1]):
                ready = end[wait_slots[w]]
                if ready > now:
                    now = ready
            k = kind[i]
            if k == FWD:
                clock[s] = now + fwd[c, s]
                continue
            if k == BWD:
                clock[s] = now + bwd[c, s]
                continue
            clock[s] = now
            t = slot[i]
            if not posted[t]:
                posted[t] = True
                first[t] = now
                continue
            start = max(first[t], now, link_free[link[t]])
            dk = duration_kind[t]
            done = start + (send[c, duration_stage[t]] if dk == SEND else evict[c, duration_stage[t]])
            end[t] = done
            link_free[link[t]] = done
            a, b = src[t], dst[t]
            if done > finish[a]:
                finish[a] = done
            if done > finish[b]:
                finish[b] = done
        for s in range(p):
            out[c, s] = max(clock[s], finish[s])
    return out


def _compiled_replay() -> Any:
    """`_replay` compiled by numba (cached on disk beside this file), or as plain Python where
    numba cannot be imported (correct, about a hundred times slower)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return _replay
    return numba.njit(cache=True, nogil=True)(_replay)


_kernel = _compiled_replay()


@dataclass(frozen=True)
class StageArrays:
    """Per-stage durations of N configurations: each array is (N, p), seconds."""

    fwd: np.ndarray
    bwd: np.ndarray
    send_act: np.ndarray
    evict: np.ndarray
    tail: np.ndarray

    @classmethod
    def from_costs(cls, rows: list[list[StageCosts]]) -> StageArrays:
        def grab(field: str) -> np.ndarray:
            return np.array([[getattr(c, field) for c in row] for row in rows], dtype=float)

        return cls(grab("fwd"), grab("bwd"), grab("send_act"), grab("evict"), grab("tail"))


def finish_times(schedule: Schedule, arrays: StageArrays) -> np.ndarray:
    """(N, p): when each stage of each configuration is done with compute and transfers."""
    c = compile_schedule(schedule)
    durations = [
        np.ascontiguousarray(a, dtype=np.float64)
        for a in (arrays.fwd, arrays.bwd, arrays.send_act, arrays.evict)
    ]
    return _kernel(  # type: ignore[no-any-return]
        *durations, c.stage, c.kind, c.slot, c.wait_ptr, c.wait_slots, c.src, c.dst, c.link,
        c.duration_kind, c.duration_stage, c.num_links,
    )  # fmt: skip


def step_times(schedule: Schedule, arrays: StageArrays) -> tuple[np.ndarray, np.ndarray]:
    """(step time, bubble fraction) of each configuration, all sharing `schedule`."""
    finish = finish_times(schedule, arrays)
    p, m = schedule.num_stages, schedule.num_microbatches
    makespan = finish.max(axis=1)
    step = (finish + arrays.tail).max(axis=1)
    busy = m * (arrays.fwd + arrays.bwd).sum(axis=1)
    bubble = np.where(makespan > 0, 1.0 - busy / (p * np.where(makespan > 0, makespan, 1.0)), 0.0)
    return step, bubble


__all__ = ["CompiledSchedule", "StageArrays", "compile_schedule", "finish_times", "step_times"]
