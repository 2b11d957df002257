"""What a stage holds over its program: the IR's memory semantics, in one place.

A forward or a load adds the stage's own micro-batch, a stash adds one of the partner's, a
backward removes one of its own. Evictions and returns keep their bytes until they are waited
on, just before the stage's next allocating action (F, LD, ST). The validator uses this with
unit sizes (micro-batches); the executor's measured `peak_activation_bytes` equals it with
each stage's bytes per micro-batch, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from autotune.schedules.ir import Action, Kind


def resident_trace(program: Sequence[Action], *, own: int = 1, partner: int = 1) -> list[int]:
    """What the stage holds after each action of `program` (units of `own` / `partner`)."""
    held, pending = 0, 0
    trace = []
    for action in program:
        if action.kind.allocates:
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


def peak_resident(program: Sequence[Action], *, own: int = 1, partner: int = 1) -> int:
    """The most the stage holds at any point of `program`."""
    return max(resident_trace(program, own=own, partner=partner), default=0)
