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
from collections.abc import Iterator, Sequence

from autotune.schedules.ir import SEMANTICS, Action

# Per kind, from the IR's table: (own, partner) micro-batches it adds to what the stage holds
# and to what it has outgoing (freed at the next release).
_EFFECT = {kind: (*row.held, *row.outgoing) for kind, row in SEMANTICS.items()}


def release_points(program: Sequence[Action], cap: int | None) -> tuple[bool, ...]:
    """For each action: wait for and free the stage's outgoing EV/RS transfers before it?"""
    return _release_points(tuple(program), cap)


@functools.lru_cache(maxsize=256)  # the validator, simulator, encoder and executor all ask
def _release_points(program: tuple[Action, ...], cap: int | None) -> tuple[bool, ...]:
    return tuple(release for release, _, _ in _walk(program, cap))


def _walk(program: Sequence[Action], cap: int | None) -> Iterator[tuple[bool, int, int]]:
    """For each action: whether it is a release point, then the (own, partner) micro-batches the
    stage holds after it, by the rules above."""
    own = partner = out_own = out_partner = 0
    effect = _EFFECT
    for action in program:
        d_own, d_partner, o_own, o_partner = effect[action[0]]
        # an allocating action that would take the stage above its cap waits for its outgoing
        release = (
            (d_own > 0 or d_partner > 0)
            and out_own + out_partner > 0
            and (cap is None or own + partner + 1 > cap)
        )
        if release:
            own, partner, out_own, out_partner = own - out_own, partner - out_partner, 0, 0
        own += d_own
        partner += d_partner
        out_own += o_own
        out_partner += o_partner
        yield release, own, partner


def resident_trace(
    program: Sequence[Action], *, own: int = 1, partner: int = 1, cap: int | None = None
) -> list[int]:
    """What the stage holds after each action (units of `own` / `partner`; releases as above)."""
    return [a * own + b * partner for _, a, b in _walk(program, cap)]


def peak_resident(
    program: Sequence[Action], *, own: int = 1, partner: int = 1, cap: int | None = None
) -> int:
    """The most the stage holds at any point of `program`."""
    return max((a * own + b * partner for a, b in peak_candidates(tuple(program), cap)), default=0)


@functools.lru_cache(maxsize=65536)
def peak_candidates(program: tuple[Action, ...], cap: int | None) -> tuple[tuple[int, int], ...]:
    """The (own, partner) micro-batch counts the stage holds at some point, keeping only those
    that can be the peak for some non-negative sizes (so a peak costs a few multiplications)."""
    points = {(a, b) for _, a, b in _walk(program, cap)} if program else {(0, 0)}
    # the Pareto front: by own count descending, a point stays if its partner count beats every
    # point with at least as many own micro-batches
    front: list[tuple[int, int]] = []
    best_partner = None
    for point in sorted(points, reverse=True):
        if best_partner is None or point[1] > best_partner:
            front.append(point)
            best_partner = point[1]
    return tuple(sorted(front))
