"""What a stage holds over its program: the IR's memory semantics, in one place.

A forward or a load adds one of the stage's own micro-batches, a stash adds one of the
partner's, a backward removes one of its own. Evictions and returns keep their memory until
their transfer is waited on. That wait is lazy: it happens just before an allocating action
(F, LD, ST) that would otherwise take the stage above its cap (with no cap: before every
allocating action), or at the end of the step; then every outgoing transfer is waited on and
freed. Lazy waits let a stage with room under its cap keep computing while its evictions and
returns are still on the wire.

The executor, the validator and the simulator all take their release points from
`release_points`, and the executor's measured `peak_activation_bytes` equals `peak_resident`
with each stage's bytes per micro-batch, exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from autotune.schedules.ir import Action, Kind


def release_points(program: Sequence[Action], cap: int | None) -> tuple[bool, ...]:
    """For each action: wait for and free the stage's outgoing EV/RS transfers before it?"""
    return _release_points(tuple(program), cap)


@functools.lru_cache(maxsize=256)  # the validator, simulator, encoder and executor all ask
def _release_points(program: tuple[Action, ...], cap: int | None) -> tuple[bool, ...]:
    held, pending = 0, 0
    points = []
    for action in program:
        kind = action.kind
        release = kind.allocates and pending > 0 and (cap is None or held + 1 > cap)
        if release:
            held, pending = held - pending, 0
        points.append(release)
        if kind.allocates:
            held += 1
        elif kind is Kind.B:
            held -= 1
        elif kind is Kind.EVICT or kind is Kind.RESTORE:
            pending += 1
    return tuple(points)


def resident_trace(
    program: Sequence[Action], *, own: int = 1, partner: int = 1, cap: int | None = None
) -> list[int]:
    """What the stage holds after each action (units of `own` / `partner`; releases as above)."""
    held, pending = 0, 0
    trace = []
    for action, release in zip(program, release_points(program, cap), strict=True):
        if release:
            held, pending = held - pending, 0
        if action.kind in (Kind.F, Kind.LOAD):
            held += own
        elif action.kind is Kind.STASH:
            held += partner
        elif action.kind is Kind.B:
            held -= own
        elif action.kind is Kind.EVICT:
            pending += own
        elif action.kind is Kind.RESTORE:
            pending += partner
        trace.append(held)
    return trace


def peak_resident(
    program: Sequence[Action], *, own: int = 1, partner: int = 1, cap: int | None = None
) -> int:
    """The most the stage holds at any point of `program`."""
    return max((a * own + b * partner for a, b in peak_candidates(tuple(program), cap)), default=0)


@functools.lru_cache(maxsize=65536)
def peak_candidates(program: tuple[Action, ...], cap: int | None) -> tuple[tuple[int, int], ...]:
    """The (own, partner) micro-batch counts the stage holds at some point, keeping only those
    that can be the peak for some non-negative sizes (so a peak costs a few multiplications).

    One pass with `resident_trace`'s rules, counting own and partner micro-batches apart."""
    own = partner = 0  # held
    out_own = out_partner = 0  # outgoing (EV: own, RS: partner), freed at the next release
    held = pending = 0  # in micro-batches, as `release_points` counts them
    points = {(0, 0)} if not program else set()
    for action in program:
        kind = action.kind
        if kind.allocates and pending > 0 and (cap is None or held + 1 > cap):
            held, pending = held - pending, 0
            own, partner, out_own, out_partner = own - out_own, partner - out_partner, 0, 0
        if kind is Kind.F or kind is Kind.LOAD:
            own += 1
            held += 1
        elif kind is Kind.STASH:
            partner += 1
            held += 1
        elif kind is Kind.B:
            own -= 1
            held -= 1
        elif kind is Kind.EVICT:
            out_own += 1
            pending += 1
        elif kind is Kind.RESTORE:
            out_partner += 1
            pending += 1
        points.add((own, partner))
    # the Pareto front: by own count descending, a point stays if its partner count beats every
    # point with at least as many own micro-batches
    front: list[tuple[int, int]] = []
    best_partner = None
    for point in sorted(points, reverse=True):
        if best_partner is None or point[1] > best_partner:
            front.append(point)
            best_partner = point[1]
    return tuple(sorted(front))
