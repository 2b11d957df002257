"""Schedule generators: pure functions of integers that return per-stage programs.

`generate(name, p, m, cap=None)` is the one entry point. Each generator first writes the
compute order (F/B) of every stage, BPipe then plans evictions and loads on its evictor stages
and places the acceptor's stash/return actions, and `insert_communication` adds the
point-to-point sends and receives. Adding a schedule means adding one compute-order function.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math

from autotune.schedules.ir import Action, B, F, Kind, Program, bpipe_partner
from autotune.schedules.memory import peak_resident, release_points


def gpipe_order(p: int, m: int, stage: int) -> Program:
    """All forwards, then all backwards (in forward order, as GPipe's flush does)."""
    return [F(k) for k in range(m)] + [B(k) for k in range(m)]


def one_f_one_b_order(p: int, m: int, stage: int) -> Program:
    """PipeDream-flush / Megatron 1F1B: p-s-1 warm-up forwards, then one F one B, then drain."""
    warmup = min(p - stage - 1, m)
    order: Program = [F(k) for k in range(warmup)]
    for k in range(m - warmup):
        order += [F(warmup + k), B(k)]
    order += [B(k) for k in range(m - warmup, m)]
    return order


def zb_h1_order(p: int, m: int, stage: int) -> Program:
    """Zero-bubble ZB-H1 (Qi et al., ICLR 2024): 1F1B's order with each backward split into the
    input gradient B, which the previous stage waits for, and the weight gradient W, which no
    one waits for. Stage s holds back up to s weight gradients in the steady state and runs them
    in its cool-down, in the waits 1F1B leaves there: a stage holds at most p micro-batches, as
    1F1B's first stage does, and the bubble shrinks to about a third of 1F1B's."""
    warmup = min(p - stage - 1, m)
    order: Program = [F(k) for k in range(warmup)]
    held: collections.deque[int] = collections.deque()  # backwards whose W is still to run
    for k in range(m - warmup):
        order += [F(warmup + k), B(k)]
        held.append(k)
        if len(held) > stage:
            order.append(Action(Kind.W, held.popleft()))
    for k in range(m - warmup, m):
        order.append(B(k))
        held.append(k)
        order.append(Action(Kind.W, held.popleft()))
    order += [Action(Kind.W, k) for k in held]
    return order


def interleaved_order(p: int, m: int, stage: int, virtual_stages: int) -> Program:
    """Megatron-LM's interleaved 1F1B (`forward_backward_pipelining_with_interleaving`): the
    rank runs V model chunks; its i-th forward is chunk (i mod pV) // p of micro-batch
    (i // pV) * p + i mod p, its i-th backward the same micro-batch on chunk V - 1 - that; it
    warms up with 2 (p - s - 1) + (V - 1) p forwards (all m V where m = p), then alternates one
    forward and one backward, then drains. Needs m to be a multiple of p."""
    v = virtual_stages
    total = m * v

    def unit(i: int, forward: bool) -> tuple[int, int]:
        chunk = (i % (p * v)) // p
        return (i // (p * v)) * p + i % p, chunk if forward else v - 1 - chunk

    warmup = total if m == p else min((p - stage - 1) * 2 + (v - 1) * p, total)
    order: Program = [F(*unit(i, True)) for i in range(warmup)]
    for i in range(total - warmup):
        order += [F(*unit(warmup + i, True)), B(*unit(i, False))]
    order += [B(*unit(i, False)) for i in range(total - warmup, total)]
    return order


def unit_timeline(orders: list[Program], fwd: float = 1.0, bwd: float = 2.0) -> list[list[float]]:
    """End time of every compute action with unit costs and free communication.

    A forward waits for the previous stage's forward of the same micro-batch, a backward for
    the next stage's backward. Used to line up actions across stages (BPipe's acceptor side).
    """
    p = len(orders)
    m = 1 + max((action.mb for order in orders for action in order), default=-1)
    ends: list[list[float]] = [[0.0] * len(o) for o in orders]
    # when stage s's forward / backward of each micro-batch ends (None: not yet); the stages
    # beyond either end are done at 0
    none: list[float | None] = [None] * m
    zero: list[float | None] = [0.0] * m
    fwd_end = [zero, *[list(none) for _ in range(p)], zero]  # fwd_end[s + 1] is stage s's
    bwd_end = [zero, *[list(none) for _ in range(p)], zero]
    forward = Kind.F
    cursor = [0] * p
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            order, row, i = orders[s], ends[s], cursor[s]
            n = len(order)
            before, after, own_f, own_b = fwd_end[s], bwd_end[s + 2], fwd_end[s + 1], bwd_end[s + 1]
            previous = row[i - 1] if i else 0.0
            while i < n:
                kind, mb, _ = order[i]
                is_f = kind is forward
                ready = before[mb] if is_f else after[mb]
                if ready is None:
                    break
                previous = (ready if ready > previous else previous) + (fwd if is_f else bwd)
                row[i] = previous
                if is_f:
                    own_f[mb] = previous
                else:
                    own_b[mb] = previous
                i += 1
            if i > cursor[s]:
                cursor[s] = i
                progressed = True
    if any(c < len(o) for c, o in zip(cursor, orders, strict=True)):
        raise ValueError("compute orders deadlock: a stage waits for a micro-batch never produced")
    return ends


def plan_evictions(order: Program, cap: int, *, hoist: bool = True) -> Program:
    """Insert EV/LD into one evictor stage's compute order so it never holds more than `cap`.

    Greedy over the compute order with Belady's rule: when a forward (or a load) needs a slot,
    evict the resident micro-batch whose backward is furthest away. With `hoist`, the eviction
    is issued one compute action early so its transfer overlaps that compute; without, it is
    issued just before the action that needs the slot (the fallback when the acceptor has no
    room to take it early).
    After each backward, the next backward's micro-batch is loaded back as soon as a slot is
    free, so the load overlaps at least one compute action when memory allows.
    Counting follows the IR: an eviction frees its slot at the next allocating action.
    """
    b_pos = {a.mb: i for i, a in enumerate(order) if a.kind is Kind.B}
    next_b = collections.deque(a.mb for a in order if a.kind is Kind.B)
    out: Program = []
    resident: set[int] = set()
    away: set[int] = set()
    last_touch: dict[int, int] = {}  # of micro-batches not yet done (resident or away)
    last_compute = 0  # index in `out` of the latest compute action

    def evict_one(exclude: int) -> None:
        nonlocal last_compute
        candidates = [mb for mb in resident if mb != exclude]
        if not candidates:
            raise ValueError(f"cap {cap} leaves no room to run micro-batch {exclude}")
        victim = max(candidates, key=lambda mb: b_pos[mb])
        where = len(out)
        if hoist:
            where = max(last_touch[victim] + 1, last_compute)
        out.insert(where, Action(Kind.EVICT, victim))
        for mb, idx in last_touch.items():
            if idx >= where:
                last_touch[mb] = idx + 1
        if last_compute >= where:
            last_compute += 1
        resident.discard(victim)
        away.add(victim)

    def load(mb: int) -> None:
        while len(resident) + 1 > cap:
            evict_one(exclude=mb)
        out.append(Action(Kind.LOAD, mb))
        last_touch[mb] = len(out) - 1
        resident.add(mb)
        away.discard(mb)

    for action in order:
        if action.kind is Kind.F:
            while len(resident) + 1 > cap:
                evict_one(exclude=action.mb)
            out.append(action)
            last_compute = last_touch[action.mb] = len(out) - 1
            resident.add(action.mb)
            continue
        if action.mb in away:
            load(action.mb)
        out.append(action)
        last_compute = len(out) - 1
        resident.discard(action.mb)
        last_touch.pop(action.mb, None)
        next_b.popleft()
        if next_b and next_b[0] in away and len(resident) + 1 <= cap:
            load(next_b[0])
    return out


def place_acceptor_actions(
    evictor: Program,
    acceptor: Program,
    evictor_ends: list[float],
    acceptor_ends: list[float],
    *,
    lead: int = 0,
) -> Program:
    """Put ST/RS on the acceptor at the last gap that is no later than the evictor's EV/LD;
    a stash `lead` gaps earlier still, so its receive is posted before the eviction is sent.

    Gaps are the points between the acceptor's compute actions; `*_ends` are unit-time end
    times of each compute action (see `unit_timeline`).
    """
    t = 0.0
    idx = 0
    events: list[tuple[float, Action]] = []
    for action in evictor:
        if action.kind.is_compute:
            t = evictor_ends[idx]
            idx += 1
            continue
        kind = Kind.STASH if action.kind is Kind.EVICT else Kind.RESTORE
        events.append((t, Action(kind, action.mb)))
    gap_times = [0.0, *acceptor_ends]  # gap i is before acceptor compute action i
    inserts: dict[int, list[Action]] = {}
    for time, act in events:
        gap = bisect.bisect_right(gap_times, time) - 1 if time > 0 else 0
        if act.kind is Kind.STASH:
            gap = max(0, gap - lead)
        inserts.setdefault(gap, []).append(act)
    out: Program = []
    for i, action in enumerate(acceptor):
        out += inserts.pop(i, [])
        out.append(action)
    out += inserts.pop(len(acceptor), [])
    return _order_stash_before_restore(out)


def _order_stash_before_restore(program: Program) -> Program:
    """An RS placed at the same gap as its own ST must come after it (keeps list order stable)."""
    first_rs: dict[int, int] = {}
    for i, action in enumerate(program):
        if action.kind is Kind.RESTORE:
            first_rs.setdefault(action.mb, i)
    late = {i for i, a in enumerate(program) if a.kind is Kind.STASH and first_rs.get(a.mb, i) < i}
    moved = {program[i].mb: program[i] for i in late}
    fixed: Program = []
    for i, action in enumerate(program):
        if i in late:
            continue
        if action.kind is Kind.RESTORE and first_rs[action.mb] == i and action.mb in moved:
            fixed.append(moved[action.mb])
        fixed.append(action)
    return fixed


def insert_communication(programs: list[Program], virtual_stages: int = 1) -> list[Program]:
    """Add point-to-point sends and receives around each stage's compute.

    Sends follow the compute that produced their data. A receive is posted one compute action
    ahead of the compute that needs it (before the preceding compute action), so transfer and
    compute overlap; the executor waits on it just before use. With several chunks per rank the
    first and last stage are virtual stage 0 (rank 0's chunk 0) and p * V - 1.
    """
    p = len(programs)
    last_stage = p * virtual_stages - 1
    out: list[Program] = []
    make = functools.partial(tuple.__new__, Action)  # Action((kind, mb, chunk)) built in C
    for s, program in enumerate(programs):
        compute_idx = [i for i, a in enumerate(program) if a.kind.is_compute]
        recv_before: dict[int, list[Action]] = {}
        for n, i in enumerate(compute_idx):
            kind, mb, c = program[i]
            g = c * p + s
            needs_recv = (kind is Kind.F and g > 0) or (kind is Kind.B and g < last_stage)
            if not needs_recv:
                continue
            where = compute_idx[n - 1] if n > 0 else 0
            # Post before any EV/LD/ST/RS that directly precede that compute action too.
            while where > 0 and not program[where - 1].kind.is_compute:
                where -= 1
            recv = Kind.RECV_F if kind is Kind.F else Kind.RECV_B
            recv_before.setdefault(where, []).append(make((recv, mb, c)))
        result: Program = []
        append = result.append
        for i, action in enumerate(program):
            if i in recv_before:
                result += recv_before[i]
            append(action)
            kind, mb, c = action
            g = c * p + s
            if kind is Kind.F and g < last_stage:
                append(make((Kind.SEND_F, mb, c)))
            elif kind is Kind.B and g > 0:
                append(make((Kind.SEND_B, mb, c)))
        out.append(result)
    return out


def default_cap(num_stages: int) -> int:
    """BPipe's balance point: a pair holds p+1 micro-batches under 1F1B, so each holds half."""
    return math.ceil((num_stages + 1) / 2)


def evict_to_partners(orders: list[Program], cap: int) -> tuple[list[Program], list[int | None]]:
    """BPipe's pass over the compute orders: each stage x over `cap` resident micro-batches
    evicts to its partner p-1-x and loads back before the backward; the partners by stage."""
    p = len(orders)
    ends = unit_timeline(orders)
    partner = [bpipe_partner(s, p) for s in range(p)]
    result = list(orders)
    for x in range(p):
        acceptor = partner[x]
        if acceptor is None or x > acceptor:
            continue
        for hoist, lead in ((True, 1), (True, 0), (False, 0)):
            planned = plan_evictions(orders[x], cap, hoist=hoist)
            if not any(a.kind is Kind.EVICT for a in planned):
                break
            pair = place_acceptor_actions(planned, orders[acceptor], ends[x], ends[acceptor], lead=lead)
            if (hoist or lead) and _pair_over_cap(planned, pair, cap):
                continue
            if lead and _stash_waits(pair, cap):
                continue
            result[x], result[acceptor] = planned, pair
            break
    return result, partner


def _stash_waits(acceptor: Program, cap: int) -> bool:
    """Whether posting a stash early would make the acceptor wait for a return to finish (a
    release at an ST ties the acceptor to the evictor's progress)."""
    releases = release_points(acceptor, cap)
    return any(r and a.kind is Kind.STASH for a, r in zip(acceptor, releases, strict=True))


def _pair_over_cap(evictor: Program, acceptor: Program, cap: int) -> bool:
    """Whether either side of a pair ever holds more than `cap` micro-batches."""
    return max(peak_resident(evictor, cap=cap), peak_resident(acceptor, cap=cap)) > cap
