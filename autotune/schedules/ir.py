"""The schedule IR: an action is data, a schedule is one ordered program of actions per stage.

Every schedule (GPipe, 1F1B, BPipe, ...) is written as per-stage programs of these actions; the
executor runs them on torch.distributed, the validator checks them, renderers draw them. Pure
Python: no torch, no ray.

Actions and their text tokens (k is the micro-batch index):

    F3   forward of micro-batch 3            B3   backward of micro-batch 3
    W3   its weight gradients (then B3 computes only the input gradient; zero-bubble schedules)
    SF3  send its activation to stage s+1    RF3  receive the activation from stage s-1
    SB3  send its input gradient to s-1      RB3  receive the output gradient from s+1
    EV3  evict micro-batch 3's saved activations to the paired stage (BPipe evictor)
    LD3  load them back from the paired stage before B3 (evictor)
    ST3  stash the partner's micro-batch 3 (acceptor receives it)
    RS3  return the stash to the partner (acceptor sends it back)

Every action also names the model chunk it works on (`chunk`, 0 unless the schedule runs
several chunks per rank, as the interleaved schedule does): rank s's chunk c is virtual stage
c * p + s of p * V, and "previous" and "next" stage are the virtual stages either side (F3.1 is
the forward of micro-batch 3 on the rank's chunk 1).

Sends and receives are asynchronous: a receive is posted where it stands and waited on just
before the action that needs its data; outgoing bulk transfers (EV, RS) release their memory
when they are waited on, just before the stage's next allocating action (F, LD or ST).
"""

from __future__ import annotations

import enum
import functools
import gc
import re
from collections.abc import Callable, Sequence
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
    W = "W"
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
    is_compute: bool  # F, B, W
    allocates: bool  # F, LD, ST: outgoing bulk transfers (EV, RS) are waited on and freed before it


class Peer(enum.Enum):
    """Whom a transfer action exchanges with: the previous or next (virtual) stage, or the BPipe
    partner."""

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
    where the stage has that peer, and what the receive is for. `takes_over`: where a stage's
    program holds this action for a micro-batch, the memory effect of that kind's action of the
    micro-batch moves here (a weight-gradient step keeps what the input-gradient step would free),
    and with it that share of the work. `cost`: for a compute action, the stage's cost it takes
    (a `StageCosts` field: fwd, bwd, wgt; one whose share another takes over costs the rest)."""

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
    takes_over: Kind | None = None
    cost: str | None = None


FAMILIES = ("act", "grad", "evict", "load")  # a transfer family's index: the executor's message tag

SEMANTICS: dict[Kind, Semantics] = {
    Kind.F: Semantics(
        held=(1, 0), waits_for=(Kind.RECV_F,), once=True, exactly=True, posted=(Kind.RECV_F, "its input"),
        cost="fwd",
    ),
    Kind.B: Semantics(
        held=(-1, 0), waits_for=(Kind.RECV_B, Kind.LOAD), once=True, exactly=True,
        after=(Kind.F, "a backward before its forward"), posted=(Kind.RECV_B, "its output gradient"),
        cost="bwd",
    ),
    Kind.W: Semantics(
        once=True, after=(Kind.B, "a weight gradient before its input gradient"), takes_over=Kind.B,
        cost="wgt",
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


def peer_of(
    kind: Kind, stage: int, chunk: int, num_stages: int, virtual_stages: int, partner: int | None
) -> tuple[int, int] | None:
    """The (rank, chunk) that `kind` on rank `stage`'s chunk `chunk` exchanges with (None: there
    is none): the virtual stage before or after c * p + s, or the BPipe partner's same chunk."""
    peer = SEMANTICS[kind].peer
    if peer is None:
        return None
    if peer is Peer.PARTNER:
        return None if partner is None else (partner, chunk)
    other = chunk * num_stages + stage + int(peer.value)
    if not 0 <= other < num_stages * virtual_stages:
        return None
    return other % num_stages, other // num_stages


for _kind in Kind:
    _kind.is_compute = SEMANTICS[_kind].family is None
    _kind.allocates = sum(SEMANTICS[_kind].held) > 0


def taken_over(program: Sequence[Action]) -> set[Action]:
    """The actions of `program` whose memory effect (and share of the work: a backward whose
    weight gradient comes apart) a later action of the same micro-batch takes over."""
    return {
        Action(row.takes_over, a.mb, a.chunk)
        for a in program
        if (row := SEMANTICS[a.kind]).takes_over is not None
    }


_BY_TOKEN = {k.value: k for k in Kind}
_TOKEN_OF = {k: k.value for k in Kind}
_TOKEN = re.compile(rf"^({'|'.join(sorted(_BY_TOKEN, key=len, reverse=True))})(\d+)(?:\.(\d+))?$")


class Action(NamedTuple):
    """One step of a stage's program: `kind` applied to micro-batch `mb` on the rank's model
    chunk `chunk` (a tuple: hashed and compared in C)."""

    kind: Kind
    mb: int
    chunk: int = 0

    def __str__(self) -> str:
        token = _TOKEN_OF[self.kind] + str(self.mb)
        return f"{token}.{self.chunk}" if self.chunk else token

    @classmethod
    def parse(cls, token: str) -> Action:
        match = _TOKEN.match(token.strip())
        if not match:
            raise ValueError(f"not an action token: {token!r} (expected e.g. F3, B3, SF3, EV3, F3.1)")
        return cls(_BY_TOKEN[match.group(1)], int(match.group(2)), int(match.group(3) or 0))


def F(mb: int, chunk: int = 0) -> Action:  # noqa: N802 - the IR's own vocabulary
    return Action(Kind.F, mb, chunk)


def B(mb: int, chunk: int = 0) -> Action:  # noqa: N802
    return Action(Kind.B, mb, chunk)


Program = list[Action]


@dataclass(frozen=True)
class Schedule:
    """Per-stage programs plus what a reader needs to interpret them.

    `partner[s]` is the stage that stage s exchanges evicted activations with (BPipe), or None.
    `cap` is the per-stage limit on resident micro-batches (own activations + stashed ones),
    or None where the schedule promises no limit. `virtual_stages` is how many model chunks each
    rank runs (V: the model is cut into p * V stages; `programs` stays one per rank).
    """

    name: str
    num_stages: int
    num_microbatches: int
    programs: tuple[tuple[Action, ...], ...]
    partner: tuple[int | None, ...]
    cap: int | None = None
    virtual_stages: int = 1

    def program(self, stage: int) -> tuple[Action, ...]:
        return self.programs[stage]

    def virtual_stage(self, stage: int, chunk: int) -> int:
        """The model stage (of p * V) that rank `stage` runs as its chunk `chunk`."""
        return chunk * self.num_stages + stage

    def peer(self, kind: Kind, stage: int, chunk: int = 0) -> tuple[int, int] | None:
        """The (rank, chunk) that `kind` on rank `stage`'s chunk exchanges with (see `peer_of`)."""
        return peer_of(kind, stage, chunk, self.num_stages, self.virtual_stages, self.partner[stage])

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
