"""The validator: checks any set of per-stage programs before it runs anywhere.

It checks structure (every micro-batch forward once and backward once, forward first; every
send matched by a receive on the right peer, every eviction by a stash, every load by a
return), then replays the programs under the executor's blocking rules to find deadlocks and
count resident micro-batches per stage against the cap. Errors carry the grid with the failing
step marked.
"""

from __future__ import annotations

from collections import Counter

from autotune.schedules.ir import (
    SEMANTICS,
    Action,
    Kind,
    Peer,
    Schedule,
    counterpart,
    without_gc,
)
from autotune.schedules.memory import release_points, resident_trace
from autotune.schedules.render import grid

# The structure rules are the IR's (`Semantics.once`, `exactly`, `after`, `posted`); an action
# that sends its own micro-batch away (an eviction) leaves it away until one brings it back (a
# load), and one that consumes it (a backward) needs it resident.
_EXACTLY = tuple(kind for kind, row in SEMANTICS.items() if row.exactly)


class ScheduleError(ValueError):
    """A program set that cannot run: the message names the rule, the grid shows where."""

    def __init__(self, message: str, schedule: Schedule, stage: int, step: int) -> None:
        self.message = message
        self.stage = stage
        self.step = step
        self.grid = grid(schedule.programs, mark=(stage, step), window=8)
        super().__init__(f"{message}\n{self.grid}")


@without_gc
def validate(schedule: Schedule) -> dict[int, int]:
    """Raise ScheduleError if `schedule` is broken; return each stage's peak resident count.

    Linear in the number of actions (a 64-stage, 1,000-micro-batch schedule: about a second)."""
    counts = [Counter(program) for program in schedule.programs]
    for stage in range(schedule.num_stages):
        _check_structure(schedule, stage, counts)
    _replay(schedule)
    peaks = {}
    for stage, program in enumerate(schedule.programs):
        trace = resident_trace(program, own=(1,) * schedule.virtual_stages, cap=schedule.cap)
        over = next(
            (i for i, held in enumerate(trace) if schedule.cap is not None and held > schedule.cap), None
        )
        if over is not None:
            raise ScheduleError(
                f"stage {stage}, step {over} ({program[over]}): holds {trace[over]} micro-batches, "
                f"above the cap of {schedule.cap}",
                schedule,
                stage,
                over,
            )
        peaks[stage] = max(trace, default=0)
    return peaks


def _check_structure(schedule: Schedule, stage: int, counts: list[Counter[Action]]) -> None:
    program = schedule.program(stage)
    m, chunks = schedule.num_microbatches, schedule.virtual_stages
    seen: set[Action] = set()
    away: set[tuple[int, int]] = set()
    problem: str | None = None
    step = 0
    mine = counts[stage]
    for step, action in enumerate(program):
        kind, k, c = action
        row = SEMANTICS[kind]
        posted = row.posted
        if not 0 <= k < m:
            problem = f"micro-batch {k} is out of range 0..{m - 1}"
        elif not 0 <= c < chunks:
            problem = f"chunk {c} is out of range 0..{chunks - 1}"
        elif action in seen and row.once:
            problem = f"{action} appears twice"
        elif row.after is not None and Action(row.after[0], k, c) not in seen:
            problem = row.after[1]
        elif (
            posted is not None
            and schedule.peer(posted[0], stage, c) is not None
            and Action(posted[0], k, c) not in seen
        ):
            what = "forward" if kind is Kind.F else "backward"
            problem = f"{what} without a posted receive {Action(posted[0], k, c)} for {posted[1]}"
        elif row.held[0] < 0 and (k, c) in away:
            problem = f"backward of micro-batch {k} while its activations are evicted (no LD{k})"
        if problem is not None:
            raise ScheduleError(f"stage {stage}, step {step} ({action}): {problem}", schedule, stage, step)
        if row.outgoing[0] > 0:
            away.add((k, c))
        elif row.held[0] > 0 and row.family is not None:
            away.discard((k, c))
        if row.family is not None and action not in seen:
            _matched(schedule, stage, step, action, counts)
        seen.add(action)
    for kind in _EXACTLY:
        for c in range(chunks):
            for k in range(m):
                if mine[Action(kind, k, c)] != 1:
                    last = len(program) - 1
                    raise ScheduleError(
                        f"stage {stage}: {Action(kind, k, c)} must appear exactly once, "
                        f"found {mine[Action(kind, k, c)]}",
                        schedule,
                        stage,
                        max(last, 0),
                    )


def _matched(
    schedule: Schedule, stage: int, step: int, action: Action, counts: list[Counter[Action]]
) -> None:
    """Raise if the send, receive, eviction, stash, load or return `action` (first seen at `step`)
    lacks its counterpart on the peer stage, as many times."""
    other_kind = counterpart(action.kind)
    peer = schedule.peer(action.kind, stage, action.chunk)
    if peer is None:
        partnered = SEMANTICS[action.kind].peer is Peer.PARTNER
        raise ScheduleError(
            f"stage {stage}, step {step} ({action}): no peer stage to exchange with "
            f"({'no BPipe partner' if partnered else 'pipeline edge'})",
            schedule,
            stage,
            step,
        )
    theirs_action = Action(other_kind, action.mb, peer[1])
    mine, theirs = counts[stage][action], counts[peer[0]][theirs_action]
    if mine != theirs:
        raise ScheduleError(
            f"stage {stage}, step {step} ({action}): unmatched - {mine} on this stage but {theirs} "
            f"{theirs_action} on stage {peer[0]}",
            schedule,
            stage,
            step,
        )


def _replay(schedule: Schedule) -> None:
    """Run every program under the executor's blocking rules; raise on a deadlock."""
    p = schedule.num_stages
    done: set[tuple[int, Action]] = set()
    pc = [0] * p
    pending: list[list[Action]] = [[] for _ in range(p)]
    releases = [release_points(program, schedule.cap) for program in schedule.programs]

    def blocked_on(s: int, action: Action) -> tuple[int, Action] | None:
        """The first thing `action` waits for that has not happened (None: it can run): a
        transfer is complete when the peer has done the other end. What it waits for is the
        IR's: at a release point the stage's outgoing transfers, then its `waits_for` actions
        posted earlier on the stage."""
        kind, k, c = action
        waited: list[Action] = list(pending[s]) if releases[s][pc[s]] else []
        waited += [w for w in (Action(kind, k, c) for kind in SEMANTICS[kind].waits_for) if (s, w) in done]
        for w in waited:
            peer = schedule.peer(w.kind, s, w.chunk)
            if peer is not None:
                other = (peer[0], Action(counterpart(w.kind), w.mb, peer[1]))
                if other not in done:
                    return other
        return None

    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            program, release, out = schedule.program(s), releases[s], pending[s]
            i, n = pc[s], len(program)
            while i < n:
                action = program[i]
                if blocked_on(s, action) is not None:
                    break
                if release[i]:
                    out.clear()
                if SEMANTICS[action.kind].outgoing != (0, 0):
                    out.append(action)
                done.add((s, action))
                i += 1
                pc[s] = i
                progressed = True
    stuck = [s for s in range(p) if pc[s] < len(schedule.program(s))]
    if stuck:
        waits = []
        for t in stuck:
            action = schedule.program(t)[pc[t]]
            need = blocked_on(t, action)
            assert need is not None
            waits.append(f"stage {t} at {action} waits for {need[1]} on stage {need[0]}")
        raise ScheduleError("deadlock: " + "; ".join(waits), schedule, stuck[0], pc[stuck[0]])
