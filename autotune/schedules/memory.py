"""What a stage holds over its program: the IR's memory semantics, in one place.

A forward or a load adds one of the stage's own micro-batches, a stash adds one of the
partner's, a backward removes one of its own (where a weight-gradient step W of the micro-batch
follows on the stage, W removes it instead: the IR's `takes_over`). A rank that runs several
model chunks counts each chunk's micro-batches apart, as they differ in size.

Evictions and returns keep their memory until their transfer is waited on. That wait is lazy:
it happens just before an allocating action (F, LD, ST) that would otherwise take the stage
above its cap (with no cap: before every allocating action), or at the end of the step; then
every outgoing transfer is waited on and freed. Lazy waits let a stage with room under its cap
keep computing while its evictions and returns are still on the wire.

The executor, the validator and the simulator all take their release points from
`release_points`, and the executor's measured `peak_activation_bytes` equals `peak_resident`
with each stage's bytes per micro-batch, exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

from autotune.schedules.ir import SEMANTICS, Action, taken_over

# Per kind, from the IR's table: (own, partner) micro-batches it adds to what the stage holds
# and to what it has outgoing (freed at the next release).
_EFFECT = {kind: (*row.held, *row.outgoing) for kind, row in SEMANTICS.items()}
_NONE = (0, 0, 0, 0)
_TAKES_OVER = {kind: row.takes_over for kind, row in SEMANTICS.items() if row.takes_over is not None}


def release_points(program: Sequence[Action], cap: int | None) -> tuple[bool, ...]:
    """For each action: wait for and free the stage's outgoing EV/RS transfers before it?"""
    return _release_points(tuple(program), cap)


@functools.lru_cache(maxsize=256)  # the validator, simulator, encoder and executor all ask
def _release_points(program: tuple[Action, ...], cap: int | None) -> tuple[bool, ...]:
    return tuple(release for release, _, _ in _walk(program, cap))


def _effects(program: Sequence[Action]) -> list[tuple[int, int, int, int]]:
    """Each action's memory effect (own, partner held; own, partner outgoing), with `takes_over`
    applied: an action whose effect a later action of its micro-batch takes over has none."""
    moved = taken_over(program)
    if not moved:
        return [_EFFECT[a.kind] for a in program]
    out = []
    for a in program:
        if a in moved:
            out.append(_NONE)
        else:
            out.append(_EFFECT[_TAKES_OVER.get(a.kind, a.kind)])
    return out


def _walk(program: Sequence[Action], cap: int | None) -> Iterator[tuple[bool, int, int]]:
    """For each action: whether it is a release point, then the (own, partner) micro-batches the
    stage holds after it, by the rules above."""
    for release, own, partner, _ in _walk_chunks(program, cap, chunks=1):
        yield release, own, partner


def _walk_chunks(
    program: Sequence[Action], cap: int | None, *, chunks: int
) -> Iterator[tuple[bool, int, int, tuple[int, ...]]]:
    """`_walk`, and the own micro-batches held per chunk (all in chunk 0 where `chunks` is 1)."""
    own = partner = out_own = out_partner = 0
    per_chunk = [0] * chunks
    out_chunk = [0] * chunks
    for action, (d_own, d_partner, o_own, o_partner) in zip(program, _effects(program), strict=True):
        # an allocating action that would take the stage above its cap waits for its outgoing
        release = (
            (d_own > 0 or d_partner > 0)
            and out_own + out_partner > 0
            and (cap is None or own + partner + 1 > cap)
        )
        if release:
            own, partner, out_own, out_partner = own - out_own, partner - out_partner, 0, 0
            if chunks > 1:
                per_chunk = [a - b for a, b in zip(per_chunk, out_chunk, strict=True)]
                out_chunk = [0] * chunks
        own += d_own
        partner += d_partner
        out_own += o_own
        out_partner += o_partner
        if chunks == 1:
            yield release, own, partner, (own,)
            continue
        per_chunk[action.chunk] += d_own
        out_chunk[action.chunk] += o_own
        yield release, own, partner, tuple(per_chunk)


Sizes = int | Sequence[int]  # bytes of one own micro-batch: one size, or one per chunk


def resident_trace(
    program: Sequence[Action], *, own: Sizes = 1, partner: int = 1, cap: int | None = None
) -> list[int]:
    """What the stage holds after each action (units of `own` / `partner`, `own` one per chunk
    where the rank runs several; releases as above)."""
    sizes = (own,) if isinstance(own, int) else tuple(own)
    return [
        sum(n * size for n, size in zip(held, sizes, strict=True)) + b * partner
        for _, _, b, held in _walk_chunks(program, cap, chunks=len(sizes))
    ]


def peak_resident(
    program: Sequence[Action], *, own: Sizes = 1, partner: int = 1, cap: int | None = None
) -> int:
    """The most the stage holds at any point of `program`."""
    sizes = (own,) if isinstance(own, int) else tuple(own)
    points = peak_candidates(tuple(program), cap, len(sizes))
    weights = (*sizes, partner)
    return max((sum(n * w for n, w in zip(point, weights, strict=True)) for point in points), default=0)


@functools.lru_cache(maxsize=65536)
def peak_candidates(
    program: tuple[Action, ...], cap: int | None, chunks: int = 1
) -> tuple[tuple[int, ...], ...]:
    """The micro-batch counts the stage holds at some point (own per chunk, then the partner's),
    keeping only those that can be the peak for some non-negative sizes (so a peak costs a few
    multiplications): the points no other point matches or beats in every count."""
    walk = _walk_chunks(program, cap, chunks=chunks)
    points = {(*held, b) for _, _, b, held in walk} if program else {(0,) * (chunks + 1)}
    front: list[tuple[int, ...]] = []
    for point in sorted(points, reverse=True):  # a dominating point sorts before what it dominates
        if not any(all(x >= y for x, y in zip(kept, point, strict=True)) for kept in front):
            front.append(point)
    return tuple(sorted(front))
