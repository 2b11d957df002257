"""The schedule registry: what each pipeline schedule is, one row each (torch-free).

A row names the schedule's compute-order generator (each stage's forwards and backwards in
order, before communication is inserted), the fewest micro-batches it runs for p stages (and
whether they must come in multiples of p), whether it runs several model chunks per rank
(`--virtual-stages`), whether it caps the micro-batches a stage holds (and so evicts to a
partner; its default cap), how the placement lays its stages out, and whether BPipe is judged
against it. `generate`, the configuration's checks (`autotune.config.check_schedule`), the
knob's choices, the placement and the advisor's baselines read it; none keeps a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.schedules.generators import (
    default_cap,
    evict_to_partners,
    gpipe_order,
    insert_communication,
    interleaved_order,
    one_f_one_b_order,
    zb_h1_order,
)
from autotune.schedules.ir import Program, Schedule, without_gc


def _any(num_stages: int) -> int:
    return 1


def _one_per_stage(num_stages: int) -> int:
    return num_stages


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule. `order(p, m, stage)` is a stage's compute order (`order(p, m, stage, V)`
    where the schedule is `virtual`: V model chunks per rank, V >= 2); `min_microbatches(p)` the
    fewest micro-batches it runs, `per_stage_groups`: in multiples of p; `capped`: a stage
    holds at most `default_cap(p)` micro-batches (or the configuration's cap) and evicts the
    rest to its partner p-1-x; `folded`: the placement puts partners on neighbouring pipeline
    slots (one node where a pair fits in it);
    `splits_backward`: its programs run weight gradients apart (W), which checkpointed layers
    (recomputation) cannot give; `baseline`: a schedule BPipe is judged against."""

    name: str
    order: Callable[..., Program]
    summary: str
    min_microbatches: Callable[[int], int] = _any
    per_stage_groups: bool = False
    virtual: bool = False
    splits_backward: bool = False
    capped: bool = False
    folded: bool = False
    baseline: bool = True

    def default_cap(self, num_stages: int) -> int:
        """The per-stage cap where the configuration gives none (0 for an uncapped schedule)."""
        return default_cap(num_stages) if self.capped else 0

    def too_few(self, num_stages: int, num_microbatches: int) -> str | None:
        """Why `num_microbatches` is too few for this schedule on `num_stages` stages (None: not)."""
        least = self.min_microbatches(num_stages)
        if num_microbatches < least:
            if least == num_stages:
                return f"{self.name} needs at least as many micro-batches as stages"
            return f"{self.name} needs at least {least} micro-batches"
        if self.per_stage_groups and num_microbatches % num_stages:
            return f"{self.name} needs the micro-batches to be a multiple of the pipeline stages"
        return None

    def bad_virtual_stages(self, virtual_stages: int) -> str | None:
        """Why `virtual_stages` model chunks per rank do not suit this schedule (None: they do)."""
        if self.virtual and virtual_stages < 2:
            return f"{self.name} runs at least 2 model chunks per rank"
        if not self.virtual and virtual_stages != 1:
            takes = "takes" if len(VIRTUAL) == 1 else "take"
            return f"{self.name} runs one model chunk per rank (only {', '.join(VIRTUAL)} {takes} more)"
        return None

    def compute_orders(self, p: int, m: int, virtual_stages: int) -> list[Program]:
        extra: tuple[Any, ...] = (virtual_stages,) if self.virtual else ()
        return [self.order(p, m, s, *extra) for s in range(p)]


SCHEDULE: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        ScheduleSpec(
            "1f1b", one_f_one_b_order, "one forward one backward (PipeDream-Flush, Megatron)",
            min_microbatches=_one_per_stage,
        ),
        ScheduleSpec("gpipe", gpipe_order, "every forward, then every backward (GPipe)"),
        ScheduleSpec(
            "interleaved", interleaved_order,
            "1F1B over V model chunks per rank, a smaller bubble for V times the transfers (Megatron)",
            min_microbatches=_one_per_stage, per_stage_groups=True, virtual=True,
        ),
        ScheduleSpec(
            "zb-h1", zb_h1_order,
            "1F1B with each backward split into input and weight gradients, the weight ones filling "
            "the bubble (Qi et al., zero bubble)",
            min_microbatches=_one_per_stage, splits_backward=True,
        ),
        ScheduleSpec(
            "bpipe", one_f_one_b_order,
            "1F1B with each stage capped at ceil((p+1)/2) micro-batches, the rest evicted to stage p-1-x",
            min_microbatches=_one_per_stage, capped=True, folded=True, baseline=False,
        ),
    )
}  # fmt: skip
SCHEDULES = tuple(SCHEDULE)
BASELINES = tuple(name for name, spec in SCHEDULE.items() if spec.baseline)  # what BPipe is judged against
VIRTUAL = tuple(name for name, spec in SCHEDULE.items() if spec.virtual)  # take --virtual-stages


@without_gc
def generate(
    name: str, num_stages: int, num_microbatches: int, *, cap: int | None = None, virtual_stages: int = 1
) -> Schedule:
    """The per-stage programs of schedule `name` for p stages and m micro-batches.

    Raises ValueError for an unknown schedule or impossible sizes (the CLI validates earlier
    and names the flag; this guards direct callers).
    """
    p, m = num_stages, num_microbatches
    spec = SCHEDULE.get(name)
    if spec is None:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULE)}")
    if p < 1 or m < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got p={p}, m={m}")
    few = spec.too_few(p, m)
    if few:
        raise ValueError(f"{few} (m={m}, p={p})")
    bad = spec.bad_virtual_stages(virtual_stages)
    if bad:
        raise ValueError(f"{bad} (virtual_stages={virtual_stages})")
    orders = spec.compute_orders(p, m, virtual_stages)
    partner: list[int | None] = [None] * p
    if spec.capped:
        cap = cap or spec.default_cap(p)
        orders, partner = evict_to_partners(orders, cap)
    programs = insert_communication(orders, virtual_stages)
    return Schedule(
        name=name,
        num_stages=p,
        num_microbatches=m,
        programs=tuple(tuple(prog) for prog in programs),
        partner=tuple(partner),
        cap=cap,
        virtual_stages=virtual_stages,
    )
