"""The fast path: the simulator's step time for many configurations at once.

With the programs fixed, every time in the simulator is a max-plus recurrence of durations:
an action starts at the max of its stage's clock and the ends of the transfers it waits for,
and ends a duration later; a transfer starts at the max of its two posts and its link's last
end. The only choice the event loop makes is the order of transfers on a link, and that is the
sender's program order (one sender per directed link), so the recurrences can be run in any
order that respects the dependencies. `compiled_schedule(name, p, m, cap, V)` fixes one such
order once and encodes it as integer arrays (each action's stage, kind, the transfers it waits
for or posts; each transfer's link and duration), kept in memory and on disk
(`schedule_cache`); `compile_schedule(schedule)` does the same for a given Schedule object.
`step_times` replays those arrays for every configuration in a compiled loop (numba), a few
nanoseconds per action, so screening a space of thousands of configurations takes a fraction
of a second. Tests check it against `simulate` to floating-point precision.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.estimate import schedule_cache
from autotune.estimate.simulate import COSTS, REST, StageCosts, compute_op, stage_transfers
from autotune.schedules.ir import FAMILIES, Kind, Schedule, taken_over, without_gc
from autotune.schedules.memory import peak_candidates
from autotune.schedules.registry import generate

TransferKey = tuple[str, int, int, int]  # (family, micro-batch, source, destination)

# op kinds: a compute action's (`simulate.compute_op`: the index of its cost in COSTS, or REST,
# bwd - wgt), or a post
FWD, BWD, WGT = (COSTS.index(name) for name in ("fwd", "bwd", "wgt"))
POST = REST + 1
# What a transfer's duration is: send_act[min(src, dst)], evict[src] or evict[dst].
SEND, EVICTOR, ACCEPTOR = 0, 1, 2


@dataclass(frozen=True)
class CompiledSchedule:
    """A schedule's actions in a dependency order, as arrays the replay loop reads.

    Ops: `stage` (the rank), `column` (its virtual stage: whose durations it takes), `kind`
    (FWD, BWD, WGT, REST, POST), `slot` (the transfer a POST posts one end of, else -1) and the transfers
    each waits for (`wait_slots[wait_ptr[i]:wait_ptr[i + 1]]`).
    Transfers (slots): `src`, `dst` (ranks), `link` (one index per directed link and family:
    p2p or the BPipe pair link), and the duration's source (`duration_kind` of the virtual stage
    `duration_stage`).
    What the memory report needs: each stage's BPipe `partner` (-1: none), the micro-batch
    counts (own per chunk, then the partner's) that can be its peak
    (`peak_pairs[peak_ptr[s]:peak_ptr[s + 1]]`) and how many evictions its program has.
    """

    name: str
    num_stages: int
    num_microbatches: int
    cap: int | None
    stage: np.ndarray
    column: np.ndarray
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
    partner: np.ndarray
    peak_pairs: np.ndarray  # (K, V + 1)
    peak_ptr: np.ndarray
    evictions: np.ndarray
    virtual_stages: int = 1

    def __post_init__(self) -> None:  # the memory report's view, as plain Python (read per config)
        pairs = [tuple(int(x) for x in row) for row in self.peak_pairs]
        ptr = [int(x) for x in self.peak_ptr]
        peaks = [tuple(pairs[ptr[s] : ptr[s + 1]]) for s in range(self.num_stages)]
        object.__setattr__(self, "_peaks", peaks)
        object.__setattr__(self, "_partners", [None if q < 0 else int(q) for q in self.partner])
        object.__setattr__(self, "_evictions", [int(e) for e in self.evictions])

    @property
    def num_ops(self) -> int:
        return len(self.stage)

    def peaks(self, stage: int) -> tuple[tuple[int, ...], ...]:
        """Micro-batch counts (own per chunk, then the partner's) one of which is the stage's
        peak, for any sizes."""
        return self._peaks[stage]  # type: ignore[attr-defined, no-any-return]

    def partner_of(self, stage: int) -> int | None:
        return self._partners[stage]  # type: ignore[attr-defined, no-any-return]

    def evictions_of(self, stage: int) -> int:
        return self._evictions[stage]  # type: ignore[attr-defined, no-any-return]

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: np.asarray(getattr(self, f), dtype=np.int64) for f in _ARRAY_FIELDS}


_ARRAY_FIELDS = (
    "stage", "column", "kind", "slot", "wait_ptr", "wait_slots", "src", "dst", "link", "duration_kind",
    "duration_stage", "partner", "peak_pairs", "peak_ptr", "evictions",
)  # fmt: skip
_STORED = (*_ARRAY_FIELDS, "sizes")  # and (p, m, cap or -1, number of links, V)


_FAMILY = {family: i for i, family in enumerate(FAMILIES)}  # evict and load use the BPipe pair link


def _dependency_order(
    stage_of: np.ndarray, slot: np.ndarray, wait_ptr: np.ndarray, wait_slots: np.ndarray,
    stage_ptr: np.ndarray, num_slots: int,
) -> np.ndarray:  # fmt: skip
    """Indices of the ops (stage by stage in program order) in an order that respects every
    dependency: stage by stage, each as far as the transfers it waits for have both ends posted;
    -1 at the end where the programs deadlock."""
    p = len(stage_ptr) - 1
    posted = np.zeros(num_slots, dtype=np.int64)
    pc = stage_ptr[:-1].copy()
    order = np.full(len(stage_of), -1, dtype=np.int64)
    n = 0
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            i = pc[s]
            end = stage_ptr[s + 1]
            while i < end:
                blocked = False
                for w in range(wait_ptr[i], wait_ptr[i + 1]):
                    if posted[wait_slots[w]] < 2:
                        blocked = True
                        break
                if blocked:
                    break
                if slot[i] >= 0:
                    posted[slot[i]] += 1
                order[n] = i
                n += 1
                i += 1
            if i > pc[s]:
                pc[s] = i
                progressed = True
    return order


@without_gc
def _encode(schedule: Schedule) -> CompiledSchedule:
    """The schedule's actions as arrays, in a dependency order, with their transfers' slots."""
    p = schedule.num_stages
    per_stage = [stage_transfers(schedule, s) for s in range(p)]
    kinds: list[int] = []
    for program in schedule.programs:
        split = taken_over(program)
        kinds += [compute_op(a, split) if a.kind.is_compute else POST for a in program]
    columns = [a.chunk * p + s for s, program in enumerate(schedule.programs) for a in program]
    waits = [w for stage_waits, _ in per_stage for w in stage_waits]
    posts = [key for _, stage_posts in per_stage for key in stage_posts]
    # slots: each transfer numbered once; both its ends post it
    index = {key: i for i, key in enumerate(dict.fromkeys(k for k in posts if k is not None))}
    try:
        wait_slots = [index[key] for w in waits for key in w]
    except KeyError:  # a wait for a transfer no program posts
        raise ValueError("the programs deadlock; run simulate() for the grid") from None

    def array(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.int64)

    stage_ptr = array(list(itertools.accumulate([len(program) for program in schedule.programs], initial=0)))
    stage_of = np.repeat(np.arange(p, dtype=np.int64), np.diff(stage_ptr))
    slot = array([-1 if key is None else index[key] for key in posts])
    counts = array([len(w) for w in waits])
    wait_ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    wait_flat = array(wait_slots)
    order = _order_kernel(stage_of, slot, wait_ptr, wait_flat, stage_ptr, len(index))
    if len(order) and order[-1] < 0:
        raise ValueError("the programs deadlock; run simulate() for the grid")
    # the ops, and the slots each waits for, in that order
    ordered_counts = counts[order]
    ordered_ptr = np.concatenate(([0], np.cumsum(ordered_counts))).astype(np.int64)
    gather = np.repeat(wait_ptr[:-1][order] - ordered_ptr[:-1], ordered_counts) + np.arange(
        int(ordered_ptr[-1]), dtype=np.int64
    )
    src, dst, link, duration_kind, duration_stage = _transfer_arrays(list(index), p)
    v = schedule.virtual_stages
    peaks = [peak_candidates(program, schedule.cap, v) for program in schedule.programs]
    pairs = np.array([point for stage_peaks in peaks for point in stage_peaks], dtype=np.int64)
    return CompiledSchedule(
        name=schedule.name,
        num_stages=p,
        num_microbatches=schedule.num_microbatches,
        cap=schedule.cap,
        stage=stage_of[order],
        column=array(columns)[order],
        kind=array(kinds)[order],
        slot=slot[order],
        wait_ptr=ordered_ptr,
        wait_slots=wait_flat[gather],
        src=src,
        dst=dst,
        link=link,
        duration_kind=duration_kind,
        duration_stage=duration_stage,
        num_links=int(link.max()) + 1 if len(link) else 0,
        partner=array([-1 if q is None else q for q in schedule.partner]),
        peak_pairs=pairs.reshape(-1, v + 1),
        peak_ptr=array(list(itertools.accumulate([len(x) for x in peaks], initial=0))),
        evictions=array([sum(1 for a in program if a.kind is Kind.EVICT) for program in schedule.programs]),
        virtual_stages=v,
    )


def _transfer_arrays(keys: list[TransferKey], p: int) -> tuple[np.ndarray, ...]:
    """Per transfer (slot): its source and destination ranks, its link (one per directed pair
    of ranks and family: p2p or the BPipe pair link), and whose duration it takes (a virtual
    stage's: the keys name virtual stages)."""
    family = np.array([_FAMILY[k[0]] for k in keys], dtype=np.int64)
    src_stage = np.array([k[2] for k in keys], dtype=np.int64)
    dst_stage = np.array([k[3] for k in keys], dtype=np.int64)
    src, dst = src_stage % p, dst_stage % p
    pair = family >= _FAMILY["evict"]
    evict = family == _FAMILY["evict"]
    _, link = np.unique((pair * p + src) * p + dst, return_inverse=True)
    duration_kind = np.where(pair, np.where(evict, EVICTOR, ACCEPTOR), SEND)
    duration_stage = np.where(pair, np.where(evict, src_stage, dst_stage), np.minimum(src_stage, dst_stage))
    as_int = [a.astype(np.int64).reshape(-1) for a in (link, duration_kind, duration_stage)]
    return (src, dst, *as_int)


ScheduleKey = tuple[str, int, int, int | None, int]  # name, p, m, cap (None: default), V
_COMPILED: dict[ScheduleKey, CompiledSchedule] = {}


def compiled_schedule(
    name: str, p: int, m: int, cap: int | None = None, virtual_stages: int = 1
) -> CompiledSchedule:
    """The fast path's arrays for schedule `name` with p stages, m micro-batches and V chunks per
    rank: from memory, else from the on-disk cache (`schedule_cache`), else generated and
    compiled (and stored)."""
    key = (name, p, m, cap, virtual_stages)
    compiled = _COMPILED.get(key)
    if compiled is None:
        stored = _stored_name(name, virtual_stages)
        compiled = _from_disk(name, stored, p, m, cap, virtual_stages)
        if compiled is None:
            compiled = _encode(generate(name, p, m, cap=cap, virtual_stages=virtual_stages))
            schedule_cache.store(stored, p, m, cap, {**compiled.arrays(), "sizes": _sizes(compiled)})
        _remember(key, compiled)
    return compiled


def _stored_name(name: str, virtual_stages: int) -> str:
    """The on-disk cache's name for a schedule with V chunks per rank."""
    return name if virtual_stages == 1 else f"{name}-v{virtual_stages}"


def compile_schedule(schedule: Schedule) -> CompiledSchedule:
    """The fast path's arrays for this `schedule` object (kept while it is the one asked about:
    a hand-made schedule with a generated one's name and sizes gets its own arrays)."""
    entry = _BY_OBJECT.get(id(schedule))
    if entry is not None and entry[0] is schedule:
        return entry[1]
    compiled = _encode(schedule)
    if len(_BY_OBJECT) >= 1024:
        _BY_OBJECT.clear()
    _BY_OBJECT[id(schedule)] = (schedule, compiled)
    return compiled


_BY_OBJECT: dict[int, tuple[Schedule, CompiledSchedule]] = {}


def _remember(key: ScheduleKey, compiled: CompiledSchedule) -> None:
    if len(_COMPILED) >= 1024:
        _COMPILED.clear()
    _COMPILED[key] = compiled


def _sizes(c: CompiledSchedule) -> np.ndarray:
    return np.array(
        [c.num_stages, c.num_microbatches, -1 if c.cap is None else c.cap, c.num_links, c.virtual_stages],
        dtype=np.int64,
    )


def _from_disk(
    name: str, stored: str, p: int, m: int, cap: int | None, virtual_stages: int
) -> CompiledSchedule | None:
    data = schedule_cache.load(stored, p, m, cap, _STORED)
    if data is None:
        return None
    sizes = data.pop("sizes")
    if sizes.shape != (5,) or int(sizes[0]) != p or int(sizes[1]) != m or int(sizes[4]) != virtual_stages:
        return None
    stored_cap = None if int(sizes[2]) < 0 else int(sizes[2])
    if cap is not None and stored_cap != cap:
        return None
    return CompiledSchedule(
        name=name, num_stages=p, num_microbatches=m, cap=stored_cap, num_links=int(sizes[3]),
        virtual_stages=virtual_stages, **data,
    )  # fmt: skip


def _replay(
    fwd: np.ndarray,
    bwd: np.ndarray,
    wgt: np.ndarray,
    send: np.ndarray,
    evict: np.ndarray,
    post: np.ndarray,
    stage: np.ndarray,
    column: np.ndarray,
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
    num_ranks: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Two (N, p) arrays, per configuration (rows of the (N, p V) duration arrays, one column
    per virtual stage; `p` the ranks, as many as the partner array has): when each
    stage's compute and every transfer it takes part in are done, and how long each stage's
    compute waited on BPipe transfers (evictions, stashes, loads, returns: the simulator's
    `exposed_transfer`). The simulator's recurrences, in the compiled order; times start at 0,
    so an unused link's clock can start at 0 too."""
    n = fwd.shape[0]
    p = num_ranks
    num_slots = len(src)
    out = np.empty((n, p))
    exposed = np.zeros((n, p))
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
            bpipe_wait = 0.0
            for w in range(wait_ptr[i], wait_ptr[i + 1]):
                t = wait_slots[w]
                ready = end[t]
                if ready > now:
                    if duration_kind[t] != SEND and ready - clock[s] > bpipe_wait:
                        bpipe_wait = ready - clock[s]
                    now = ready
            if now > clock[s]:
                exposed[c, s] += bpipe_wait
            k = kind[i]
            if k == FWD:
                clock[s] = now + fwd[c, column[i]]
                continue
            if k == BWD:
                clock[s] = now + bwd[c, column[i]]
                continue
            if k == REST:
                clock[s] = now + (bwd[c, column[i]] - wgt[c, column[i]])
                continue
            if k == WGT:
                clock[s] = now + wgt[c, column[i]]
                continue
            now += post[c, column[i]]  # the post call; the transfer is posted when it returns
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
    return out, exposed


def _compiled(function: Any) -> Any:
    """`function` compiled by numba (cached on disk beside this file), or as plain Python where
    numba cannot be imported (correct, about a hundred times slower)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return function
    return numba.njit(cache=True, nogil=True)(function)


_kernel = _compiled(_replay)
_order_kernel = _compiled(_dependency_order)


@dataclass(frozen=True)
class StageArrays:
    """Per-stage durations of N configurations, seconds: each array is (N, p V), one column per
    virtual stage, but `tail`, (N, p): each rank's chunks' tails together."""

    fwd: np.ndarray
    bwd: np.ndarray
    send_act: np.ndarray
    evict: np.ndarray
    tail: np.ndarray
    post: np.ndarray
    wgt: np.ndarray | None = None  # None: zeros

    @classmethod
    def from_costs(cls, rows: list[list[StageCosts]], num_stages: int | None = None) -> StageArrays:
        """From each configuration's costs per virtual stage (`num_stages` ranks: as many as
        there are costs where each rank runs one chunk)."""

        def grab(field: str) -> np.ndarray:
            return np.array([[getattr(c, field) for c in row] for row in rows], dtype=float)

        tail = grab("tail")
        p = num_stages or tail.shape[1]
        tail = tail.reshape(len(rows), -1, p).sum(axis=1)  # column c * p + s is rank s's chunk c
        return cls(grab("fwd"), grab("bwd"), grab("send_act"), grab("evict"), tail, grab("post"), grab("wgt"))


@dataclass(frozen=True)
class Replayed:
    """What the fast path gives for N configurations sharing a schedule: (N,) step times and
    bubble fractions, (N, p) finish times and BPipe-transfer waits (`exposed`), seconds."""

    step: np.ndarray
    bubble: np.ndarray
    finish: np.ndarray
    exposed: np.ndarray


def replay(schedule: Schedule | CompiledSchedule, arrays: StageArrays) -> Replayed:
    """The simulator's step time, bubble, finish times and exposed BPipe transfer time of each
    configuration (rows of `arrays`), all sharing `schedule`."""
    finish, exposed = _finish_and_exposed(schedule, arrays)
    p, m = schedule.num_stages, schedule.num_microbatches
    makespan = finish.max(axis=1)
    step = (finish + arrays.tail).max(axis=1)
    busy = m * (arrays.fwd + arrays.bwd).sum(axis=1)
    bubble = np.where(makespan > 0, 1.0 - busy / (p * np.where(makespan > 0, makespan, 1.0)), 0.0)
    return Replayed(step, bubble, finish, exposed)


def finish_times(schedule: Schedule | CompiledSchedule, arrays: StageArrays) -> np.ndarray:
    """(N, p): when each stage of each configuration is done with compute and transfers."""
    return _finish_and_exposed(schedule, arrays)[0]


def _finish_and_exposed(
    schedule: Schedule | CompiledSchedule, arrays: StageArrays
) -> tuple[np.ndarray, np.ndarray]:
    c = schedule if isinstance(schedule, CompiledSchedule) else compile_schedule(schedule)
    return _kernel(*kernel_args(c, arrays))  # type: ignore[no-any-return]


def kernel_args(c: CompiledSchedule, arrays: StageArrays) -> tuple[Any, ...]:
    """What the replay loop (`_replay`, compiled or not) takes for this schedule and these costs."""
    durations = [
        np.ascontiguousarray(a, dtype=np.float64)
        for a in (
            arrays.fwd, arrays.bwd, np.zeros_like(arrays.fwd) if arrays.wgt is None else arrays.wgt,
            arrays.send_act, arrays.evict, arrays.post,
        )
    ]  # fmt: skip
    return (
        *durations, c.stage, c.column, c.kind, c.slot, c.wait_ptr, c.wait_slots, c.src, c.dst, c.link,
        c.duration_kind, c.duration_stage, c.num_links, c.num_stages,
    )  # fmt: skip


def step_times(schedule: Schedule | CompiledSchedule, arrays: StageArrays) -> tuple[np.ndarray, np.ndarray]:
    """(step time, bubble fraction) of each configuration, all sharing `schedule`."""
    out = replay(schedule, arrays)
    return out.step, out.bubble


__all__ = [
    "CompiledSchedule", "Replayed", "StageArrays", "compile_schedule", "compiled_schedule", "finish_times",
    "replay", "step_times",
]  # fmt: skip
