"""The simulator: replays the per-stage programs the executor runs, with durations.

Each stage's compute is one sequential thread over its program. Sends and receives are posted
where the program puts them, each taking the thread the stage's `post` time (the executor's
`isend` / `irecv` call); a transfer starts when both ends are posted and its link is free (one
transfer at a time per directed link), and takes its duration.
The thread waits where the executor waits: a forward for its input, a backward for its output
gradient and for a load, an eviction for its activation send, a return for its stash, and an
allocating action (F, LD, ST) for the stage's outgoing evictions and returns. Memory follows
`autotune.schedules.memory`, the same semantics the executor's accounting has, so the
predicted per-stage peaks equal the measured ones.

A rank that runs several model chunks (the interleaved schedule) is one thread over all of
them: `costs` are then per virtual stage (rank s's chunk c is stage c * p + s), transfers are
named by virtual stages and use their ranks' link, and a rank's tail, static bytes and memory
are its chunks' together.

A discrete-event loop: the stage with the earliest clock acts next, so posts, and therefore
link order, happen in time order. A program set that stalls is reported as a deadlock with
the grid.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from autotune.schedules.ir import SEMANTICS, Action, Kind, Schedule, taken_over
from autotune.schedules.memory import peak_resident, release_points
from autotune.schedules.render import grid
from autotune.timeline import Span


@dataclass(frozen=True)
class StageCosts:
    """Durations (seconds) and sizes (bytes) of one pipeline stage's work per micro-batch.

    `wgt` is the part of `bwd` that computes the weight gradients: where a schedule runs them
    apart (a W action), its B costs `bwd - wgt` and its W `wgt`.
    `send_act` is the time to move one activation (or its gradient) between this stage and the
    next; `evict` the time to move one of this stage's micro-batches' saved activations over
    the BPipe pair link (both directions). `post` is the stage's thread time to post one send
    or receive (the call, not the transfer). `tail` is work after the stage's last backward (the
    data-parallel gradient all-reduce and the optimizer step).
    """

    fwd: float
    bwd: float
    wgt: float = 0.0
    send_act: float = 0.0
    evict: float = 0.0
    act_bytes: int = 0
    static_bytes: int = 0
    tail: float = 0.0
    post: float = 0.0


@dataclass
class SimResult:
    step_time: float
    bubble_fraction: float
    stage_busy: list[float]
    stage_end: list[float]
    peak_activation_bytes: list[int]
    peak_memory_bytes: list[int]
    exposed_transfer: list[float]  # time each stage's compute waited on BPipe transfers
    spans: list[Span] = field(default_factory=list)


# What a compute action costs (the IR's `cost`: a StageCosts field), or, for one whose share of
# the work a later action takes over (a backward whose weight gradients a W computes:
# `taken_over`), its cost less the taker's. The simulator and the fast path's compiler both take
# it from `compute_op`.
COSTS = ("fwd", "bwd", "wgt")
REST = len(COSTS)  # op: the rest of a cost whose share is taken over (bwd - wgt)
_TAKER_COST: dict[Kind, str] = {
    row.takes_over: row.cost
    for row in SEMANTICS.values()
    if row.takes_over is not None and row.cost is not None
}


def compute_op(action: Action, split: set[Action]) -> int:
    """The op of `action` (a compute action): the index of its cost in COSTS, or REST where a
    later action of its micro-batch takes over a share (`split`: its program's `taken_over`)."""
    if action in split:
        return REST
    cost = SEMANTICS[action.kind].cost
    assert cost is not None, f"{action} is not a compute action"
    return COSTS.index(cost)


def compute_time(cost: StageCosts, action: Action, split: set[Action]) -> float:
    """How long `action` (a compute action) takes with the stage's `cost`."""
    row = SEMANTICS[action.kind]
    own = float(getattr(cost, row.cost or ""))
    return own - float(getattr(cost, _TAKER_COST[action.kind])) if action in split else own


class DeadlockError(RuntimeError):
    """The programs stall: the message says who waits for what, with the grid."""

    def __init__(self, message: str, schedule: Schedule, stage: int, step: int) -> None:
        super().__init__(f"{message}\n{grid(schedule.programs, mark=(stage, step), window=8)}")
        self.stage, self.step = stage, step


TransferKey = tuple[str, int, int, int]  # (family, micro-batch, source, destination virtual stage)


def stage_transfers(
    schedule: Schedule, stage: int
) -> tuple[list[list[TransferKey]], list[TransferKey | None]]:
    """For each action of the stage's program: the transfers that must be complete before it
    runs, as the executor waits, and the transfer it posts one end of (None for compute).

    An action waits for the transfers of its `waits_for` actions the stage posted earlier (the
    IR's table: a forward for its input, a backward for its output gradient and its load, an
    eviction for its activation send, a return for its stash) and, at a release point
    (`release_points`), first for the stage's evictions and returns posted since the last one.
    What a stage waits for depends only on its own program, so the simulator and the fast
    path's compiler both take it from here."""
    p = schedule.num_stages
    program = schedule.programs[stage]
    # per kind and chunk, on this stage: what it waits for, and the transfer it posts (family,
    # whether it sends, this end's and the peer's virtual stage, whether it is outgoing), from
    # the IR's table
    rules: dict[tuple[Kind, int], tuple[tuple[Kind, ...], str | None, bool, int, int | None, bool]] = {}
    for c in range(schedule.virtual_stages):
        for kind, row in SEMANTICS.items():
            other = schedule.peer(kind, stage, c)
            there = None if other is None else schedule.virtual_stage(*other)
            rules[kind, c] = (
                row.waits_for, row.family, row.sends, c * p + stage, there, row.outgoing != (0, 0)
            )  # fmt: skip
    waits: list[list[TransferKey]] = []
    posts: list[TransferKey | None] = []
    wait, post = waits.append, posts.append
    outgoing: list[TransferKey] = []
    posted: dict[Action, TransferKey] = {}  # the stage's own transfer actions so far
    for action, release in zip(program, release_points(program, schedule.cap), strict=True):
        kind, k, c = action
        if release:
            out, outgoing = outgoing, []
        else:
            out = []
        waits_for, family, sends, here, peer, goes_out = rules[kind, c]
        for earlier in waits_for:
            waited = posted.get(Action(earlier, k, c))
            if waited is not None:
                out.append(waited)
        wait(out)
        if family is None:
            post(None)
            continue
        assert peer is not None, f"stage {stage} has no peer for {action}"
        key: TransferKey = (family, k, here, peer) if sends else (family, k, peer, here)
        posted[action] = key
        if goes_out:
            outgoing.append(key)
        post(key)
    return waits, posts


class _Transfer:
    __slots__ = ("posted", "end", "waiters")

    def __init__(self) -> None:
        self.posted: list[float] = []
        self.end: float | None = None
        self.waiters: list[int] = []


class _Replay:
    def __init__(self, schedule: Schedule, costs: list[StageCosts], record: bool) -> None:
        self.schedule, self.costs, self.record = schedule, costs, record
        p = schedule.num_stages
        self.rank = [g % p for g in range(len(costs))]  # of each virtual stage
        self.transfers: dict[TransferKey, _Transfer] = {}
        self.link_free: dict[tuple[str, int, int], float] = {}
        self.pc = [0] * p
        self.clock = [0.0] * p
        self.busy = [0.0] * p
        self.exposed = [0.0] * p
        self.transfer_end = [0.0] * p  # the latest end of a transfer each stage takes part in
        self.spans: list[Span] = []
        self.heap = [(0.0, s) for s in range(p)]
        transfers = [stage_transfers(schedule, s) for s in range(p)]
        self.waits = [waits for waits, _ in transfers]
        self.split = [taken_over(program) for program in schedule.programs]
        self.posts = [posts for _, posts in transfers]

    def duration(self, key: TransferKey) -> float:
        family, _, src, dst = key
        if family in ("act", "grad"):
            return self.costs[min(src, dst)].send_act
        evictor = src if family == "evict" else dst
        return self.costs[evictor].evict

    def post(self, key: TransferKey, at: float) -> None:
        transfer = self.transfers.setdefault(key, _Transfer())
        transfer.posted.append(at)
        if len(transfer.posted) < 2:
            return
        family, mb, src_stage, dst_stage = key
        src, dst = self.rank[src_stage], self.rank[dst_stage]
        link = ("pair" if family in ("evict", "load") else "p2p", src, dst)
        start = max(*transfer.posted, self.link_free.get(link, 0.0))
        transfer.end = start + self.duration(key)
        self.link_free[link] = transfer.end
        for end in (src, dst):
            if transfer.end > self.transfer_end[end]:
                self.transfer_end[end] = transfer.end
        if self.record:
            label = (
                f"{family} {mb}"
                if self.schedule.virtual_stages == 1
                else f"{family} {mb}.{src_stage // self.schedule.num_stages}"
            )
            self.spans.append(Span(src, label, start, transfer.end, "transfer", dst))
        for stage in transfer.waiters:
            heapq.heappush(self.heap, (max(self.clock[stage], transfer.end), stage))
        transfer.waiters.clear()

    def step(self, stage: int) -> None:
        program = self.schedule.program(stage)
        action = program[self.pc[stage]]
        now = self.clock[stage]
        ready = now
        bpipe_wait = 0.0
        for key in self.waits[stage][self.pc[stage]]:
            transfer = self.transfers.get(key)
            if transfer is None or transfer.end is None:
                self.transfers.setdefault(key, _Transfer()).waiters.append(stage)
                return  # woken by `post` when the transfer is scheduled
            if transfer.end > ready:
                if key[0] in ("evict", "load"):
                    bpipe_wait = max(bpipe_wait, transfer.end - now)
                ready = transfer.end
        if ready > now:
            self.exposed[stage] += bpipe_wait
            self.clock[stage] = ready
            heapq.heappush(self.heap, (ready, stage))
            if self.record:
                self.spans.append(Span(stage, f"wait {action}", now, ready, "wait"))
            return
        cost = self.costs[self.schedule.virtual_stage(stage, action.chunk)]
        if action.kind.is_compute:
            duration = compute_time(cost, action, self.split[stage])
            self.busy[stage] += duration
            if self.record:
                self.spans.append(Span(stage, str(action), now, now + duration, "compute"))
            self.clock[stage] = now + duration
        else:
            posts = self.posts[stage][self.pc[stage]]
            assert posts is not None
            posted = now + cost.post  # the transfer is posted when the call returns
            self.clock[stage] = posted
            self.post(posts, posted)
        self.pc[stage] += 1
        if self.pc[stage] < len(program):
            heapq.heappush(self.heap, (self.clock[stage], stage))

    def run(self) -> None:
        while self.heap:
            at, stage = heapq.heappop(self.heap)
            if at < self.clock[stage] or self.pc[stage] >= len(self.schedule.program(stage)):
                continue  # a stale wake-up
            self.step(stage)
        stuck = [s for s in range(self.schedule.num_stages) if self.pc[s] < len(self.schedule.program(s))]
        if stuck:
            s = stuck[0]
            waits = "; ".join(f"stage {t} at {self.schedule.program(t)[self.pc[t]]}" for t in stuck)
            raise DeadlockError(f"deadlock: no stage can proceed ({waits})", self.schedule, s, self.pc[s])

    def finish_time(self, stage: int) -> float:
        """When the stage's compute and every transfer it takes part in are done."""
        return max(self.clock[stage], self.transfer_end[stage])


def simulate(schedule: Schedule, costs: list[StageCosts], *, record: bool = False) -> SimResult:
    """Replay `schedule` with per-stage `costs` (per virtual stage, p * V of them, where ranks run
    several chunks); `record` keeps the timeline spans. What it reports is per rank."""
    p, v = schedule.num_stages, schedule.virtual_stages
    if len(costs) != p * v:
        raise ValueError(f"need costs for {p * v} stages, got {len(costs)}")
    replay = _Replay(schedule, costs, record)
    replay.run()
    chunks = [[costs[c * p + s] for c in range(v)] for s in range(p)]  # each rank's
    finish = [replay.finish_time(s) for s in range(p)]
    ends = [finish[s] + sum(cost.tail for cost in chunks[s]) for s in range(p)]
    makespan = max(finish)
    step_time = max(ends)
    peaks = []
    for s in range(p):
        partner = schedule.partner[s]
        partner_bytes = costs[partner].act_bytes if partner is not None else 0
        own = [cost.act_bytes for cost in chunks[s]]
        peaks.append(peak_resident(schedule.program(s), own=own, partner=partner_bytes, cap=schedule.cap))
    static = [sum(cost.static_bytes for cost in chunks[s]) for s in range(p)]
    return SimResult(
        step_time=step_time,
        bubble_fraction=1.0 - sum(replay.busy) / (p * makespan) if makespan > 0 else 0.0,
        stage_busy=replay.busy,
        stage_end=ends,
        peak_activation_bytes=peaks,
        peak_memory_bytes=[peaks[s] + static[s] for s in range(p)],
        exposed_transfer=replay.exposed,
        spans=replay.spans,
    )
