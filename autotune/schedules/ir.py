"""The schedule IR: an action is data, a schedule is one ordered program of actions per stage.

Every schedule (GPipe, 1F1B, BPipe, ...) is written as per-stage programs of these actions; the
executor runs them on torch.distributed, the validator checks them, renderers draw them. Pure
Python: no torch, no ray.

Actions and their text tokens (k is the micro-batch index):

    F3   forward of micro-batch 3            B3   backward of micro-batch 3
    SF3  send its activation to stage s+1    RF3  receive the activation from stage s-1
    SB3  send its input gradient to s-1      RB3  receive the output gradient from s+1
    EV3  evict micro-batch 3's saved activations to the paired stage (BPipe evictor)
    LD3  load them back from the paired stage before B3 (evictor)
    ST3  stash the partner's micro-batch 3 (acceptor receives it)
    RS3  return the stash to the partner (acceptor sends it back)

Sends and receives are asynchronous: a receive is posted where it stands and waited on just
before the action that needs its data; outgoing bulk transfers (EV, RS) release their memory
when they are waited on, just before the stage's next allocating action (F, LD or ST).
"""

from __future__ import annotations

import enum
import functools
import gc
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def without_gc(function: Callable[P, R]) -> Callable[P, R]:
    """Run `function` with Python's cyclic garbage collector paused (as it was, afterwards).

    Generating, checking and compiling a schedule builds a million small tuples and lists, none
    in a cycle; the collector's passes over them cost about a third of a large schedule's time
    and free nothing."""

    @functools.wraps(function)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        if not gc.isenabled():
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            gc.enable()

    return paused


class Kind(enum.Enum):
    F = "F"
    B = "B"
    SEND_F = "SF"
    RECV_F = "RF"
    SEND_B = "SB"
    RECV_B = "RB"
    EVICT = "EV"
    LOAD = "LD"
    STASH = "ST"
    RESTORE = "RS"

    # Members are singletons: identity hashing (in C) instead of Enum's hash of the name, as
    # actions are hashed millions of times by the validator and the encoders.
    __hash__ = object.__hash__

    # Set below for every member: plain attributes, as they are asked once per action in every
    # pass over a program.
    is_compute: bool  # F, B
    allocates: bool  # F, LD, ST: outgoing bulk transfers (EV, RS) are waited on and freed before it


class Peer(enum.Enum):
    """Whom a transfer action exchanges with: the previous or next stage, or the BPipe partner."""

    PREV = -1
    NEXT = +1
    PARTNER = "partner"


@dataclass(frozen=True)
class Semantics:
    """What one action kind means: the IR's rules in one row, read by the validator, the memory
    model, the simulator, the fast path's compiler and the executor (none keeps a copy).

    `family` is the transfer the action posts one end of (act, grad, evict, load; None for
    compute), with `peer` and whether this end `sends`. `held` is what it adds to the stage's
    resident micro-batches, as (own, partner's); `outgoing` what it sends away, freed when the
    stage next waits on its outgoing transfers. `waits_for`: the stage's own transfer actions of
    the same micro-batch whose transfer must be complete before it runs, where the stage posted
    one earlier (a forward waits for its input, a backward for its gradient and its load, an
    eviction for its activation send, a return for its stash).

    The validator's structure rules: `once`, at most once per micro-batch on a stage (`exactly`:
    once each, compute); `after`, the action of the same micro-batch that must come earlier on
    the stage, and the rule broken otherwise; `posted`, the receive it needs posted earlier
    where the stage has that peer, and what the receive is for."""

    family: str | None = None
    peer: Peer | None = None
    sends: bool = False
    held: tuple[int, int] = (0, 0)
    outgoing: tuple[int, int] = (0, 0)
    waits_for: tuple[Kind, ...] = ()
    once: bool = False
    exactly: bool = False
    after: tuple[Kind, str] | None = None
    posted: tuple[Kind, str] | None = None


FAMILIES = ("act", "grad", "evict", "load")  # a transfer family's index: the executor's message tag

SEMANTICS: dict[Kind, Semantics] = {
    Kind.F: Semantics(
        held=(1, 0), waits_for=(Kind.RECV_F,), once=True, exactly=True, posted=(Kind.RECV_F, "its input")
    ),
    Kind.B: Semantics(
        held=(-1, 0), waits_for=(Kind.RECV_B, Kind.LOAD), once=True, exactly=True,
        after=(Kind.F, "a backward before its forward"), posted=(Kind.RECV_B, "its output gradient"),
    ),
    Kind.SEND_F: Semantics(
        "act", Peer.NEXT, sends=True, once=True, after=(Kind.F, "sends an activation before computing it")
    ),
    Kind.RECV_F: Semantics("act", Peer.PREV, once=True),
    Kind.SEND_B: Semantics(
        "grad", Peer.PREV, sends=True, once=True, after=(Kind.B, "sends a gradient before computing it")
    ),
    Kind.RECV_B: Semantics("grad", Peer.NEXT, once=True),
    Kind.EVICT: Semantics(
        "evict", Peer.PARTNER, sends=True, outgoing=(1, 0), waits_for=(Kind.SEND_F,),
        after=(Kind.F, "evicts activations before they exist"),
    ),
    Kind.STASH: Semantics("evict", Peer.PARTNER, held=(0, 1)),
    Kind.LOAD: Semantics(
        "load", Peer.PARTNER, held=(1, 0), after=(Kind.EVICT, "loads activations that were never evicted")
    ),
    Kind.RESTORE: Semantics(
        "load", Peer.PARTNER, sends=True, outgoing=(0, 1), waits_for=(Kind.STASH,),
        after=(Kind.STASH, "returns a stash it never received"),
    ),
}  # fmt: skip


TRANSFER_KINDS = tuple(kind for kind, row in SEMANTICS.items() if row.family is not None)


def counterpart(kind: Kind) -> Kind:
    """The action on the peer that posts the other end of `kind`'s transfer (SF <-> RF, ...)."""
    row = SEMANTICS[kind]
    return next(k for k, r in SEMANTICS.items() if r.family == row.family and r.sends != row.sends)


def peer_stage(kind: Kind, stage: int, num_stages: int, partner: int | None) -> int | None:
    """The stage `kind` on `stage` exchanges with (None: there is none)."""
    peer = SEMANTICS[kind].peer
    if peer is None:
        return None
    if peer is Peer.PARTNER:
        return partner
    other = stage + int(peer.value)
    return other if 0 <= other < num_stages else None


for _kind in Kind:
    _kind.is_compute = SEMANTICS[_kind].family is None
    _kind.allocates = sum(SEMANTICS[_kind].held) > 0


_BY_TOKEN = {k.value: k for k in Kind}
_TOKEN_OF = {k: k.value for k in Kind}
_TOKEN = re.compile(r"^(SF|RF|SB|RB|EV|LD|ST|RS|F|B)(\d+)$")


class Action(NamedTuple):
    """One step of a stage's program: `kind` applied to micro-batch `mb` (a tuple: hashed and
    compared in C)."""

    kind: Kind
    mb: int

    def __str__(self) -> str:
        return _TOKEN_OF[self.kind] + str(self.mb)

    @classmethod
    def parse(cls, token: str) -> Action:
        match = _TOKEN.match(token.strip())
        if not match:
            raise ValueError(f"not an action token: {token!r} (expected e.g. F3, B3, SF3, EV3)")
        return cls(_BY_TOKEN[match.group(1)], int(match.group(2)))


def F(mb: int) -> Action:  # noqa: N802 - the IR's own vocabulary
    return Action(Kind.F, mb)


def B(mb: int) -> Action:  # noqa: N802
    return Action(Kind.B, mb)


Program = list[Action]


@dataclass(frozen=True)
class Schedule:
    """Per-stage programs plus what a reader needs to interpret them.

    `partner[s]` is the stage that stage s exchanges evicted activations with (BPipe), or None.
    `cap` is the per-stage limit on resident micro-batches (own activations + stashed ones),
    or None where the schedule promises no limit.
    """

    name: str
    num_stages: int
    num_microbatches: int
    programs: tuple[tuple[Action, ...], ...]
    partner: tuple[int | None, ...]
    cap: int | None = None

    def program(self, stage: int) -> tuple[Action, ...]:
        return self.programs[stage]

    def evicted(self, stage: int) -> list[int]:
        """Micro-batches that `stage` evicts at least once, in order of first eviction."""
        seen: dict[int, None] = {}
        for action in self.programs[stage]:
            if action.kind is Kind.EVICT:
                seen.setdefault(action.mb, None)
        return list(seen)


def bpipe_partner(stage: int, num_stages: int) -> int | None:
    """BPipe pairs evictor stage x with acceptor stage p-1-x (the middle of an odd p has none)."""
    other = num_stages - 1 - stage
    return None if other == stage else other
