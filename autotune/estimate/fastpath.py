"""The fast path: the simulator's step time for many configurations at once, with numpy.

With the programs fixed, every time in the simulator is a max-plus recurrence of durations:
an action starts at the max of its stage's clock and the ends of the transfers it waits for,
and ends a duration later; a transfer starts at the max of its two posts and its link's last
end. The only choice the event loop makes is the order of transfers on a link, and that is the
sender's program order (one sender per directed link), so the recurrences can be run in any
order that respects the dependencies. `compile_schedule` fixes one such order once per
(schedule, p, m, cap); `step_times` then runs it over arrays of per-stage durations, one row
per configuration, so screening a space costs one vector operation per action. Tests check it
against `simulate` to floating-point precision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from autotune.estimate.simulate import StageCosts, needed_transfers, transfer_key
from autotune.schedules.ir import Kind, Schedule
from autotune.schedules.memory import release_points

TransferKey = tuple[str, int, int, int]


@dataclass(frozen=True)
class _Op:
    stage: int
    waits: tuple[TransferKey, ...]
    compute: str | None = None  # "fwd" | "bwd"
    post: TransferKey | None = None


@dataclass(frozen=True)
class CompiledSchedule:
    """The schedule's actions in a dependency order, with what each waits for and posts."""

    schedule: Schedule
    ops: tuple[_Op, ...]


@functools.lru_cache(maxsize=4096)
def compile_schedule(schedule: Schedule) -> CompiledSchedule:
    p = schedule.num_stages
    pc = [0] * p
    posted: dict[TransferKey, int] = {}
    outgoing: list[list[TransferKey]] = [[] for _ in range(p)]
    releases = [release_points(prog, schedule.cap) for prog in schedule.programs]
    ops: list[_Op] = []
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            program = schedule.program(s)
            while pc[s] < len(program):
                action = program[pc[s]]
                release = releases[s][pc[s]]
                waits = needed_transfers(schedule, s, action, outgoing[s] if release else [], posted)
                if any(posted.get(key, 0) < 2 for key in waits):
                    break
                if release:
                    outgoing[s] = []
                if action.kind.is_compute:
                    ops.append(_Op(s, tuple(waits), compute="fwd" if action.kind is Kind.F else "bwd"))
                else:
                    key = transfer_key(schedule, s, action)
                    if action.kind in (Kind.EVICT, Kind.RESTORE):
                        outgoing[s].append(key)
                    posted[key] = posted.get(key, 0) + 1
                    ops.append(_Op(s, tuple(waits), post=key))
                pc[s] += 1
                progressed = True
    if any(pc[s] < len(schedule.program(s)) for s in range(p)):
        raise ValueError("the programs deadlock; run simulate() for the grid")
    return CompiledSchedule(schedule, tuple(ops))


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


def _duration(key: TransferKey, arrays: StageArrays) -> np.ndarray:
    family, _, src, dst = key
    if family in ("act", "grad"):
        return arrays.send_act[:, min(src, dst)]
    return arrays.evict[:, src if family == "evict" else dst]


def step_times(schedule: Schedule, arrays: StageArrays) -> tuple[np.ndarray, np.ndarray]:
    """(step time, bubble fraction) of each configuration, all sharing `schedule`."""
    compiled = compile_schedule(schedule)
    n, p = arrays.fwd.shape
    clock = np.zeros((p, n))
    posts: dict[TransferKey, np.ndarray] = {}
    end: dict[TransferKey, np.ndarray] = {}
    link_free: dict[tuple[str, int, int], np.ndarray] = {}
    finish = np.zeros((p, n))
    for op in compiled.ops:
        now = clock[op.stage]
        for key in op.waits:
            np.maximum(now, end[key], out=now)
        if op.compute is not None:
            now += (arrays.fwd if op.compute == "fwd" else arrays.bwd)[:, op.stage]
            continue
        posted = op.post
        assert posted is not None
        if posted not in posts:
            posts[posted] = now.copy()
            continue
        family, _, src, dst = posted
        link = ("pair" if family in ("evict", "load") else "p2p", src, dst)
        start = np.maximum(posts.pop(posted), now)
        if link in link_free:
            np.maximum(start, link_free[link], out=start)
        done = start + _duration(posted, arrays)
        end[posted] = link_free[link] = done
        np.maximum(finish[src], done, out=finish[src])
        np.maximum(finish[dst], done, out=finish[dst])
    np.maximum(finish, clock, out=finish)
    makespan = finish.max(axis=0)
    step = (finish + arrays.tail.T).max(axis=0)
    m = schedule.num_microbatches
    busy = m * (arrays.fwd + arrays.bwd).sum(axis=1)
    bubble = np.where(makespan > 0, 1.0 - busy / (p * np.where(makespan > 0, makespan, 1.0)), 0.0)
    return step, bubble
