"""Where each (stage, data-parallel rank, tensor-parallel rank) runs: its global rank, which is
also its device index (device d of a cluster sits on node d // devices_per_node).

Tensor parallel ranks are adjacent (fastest), then data parallel, then pipeline slots. Under
BPipe the pipeline is folded so each evictor x sits next to its acceptor p-1-x (slots 0, 1 hold
stages 0 and p-1; slots 2, 3 hold 1 and p-2; ...), which keeps a pair on one node and its
activation transfers on the fast intra-node links. The executor and the cost model both use
this, so a prediction and a measurement describe the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.config import TrialConfig
from autotune.schedules.registry import SCHEDULE


def pipeline_slot(stage: int, num_stages: int, *, folded: bool) -> int:
    """The position of `stage` along the device order."""
    if not folded:
        return stage
    partner = num_stages - 1 - stage
    return 2 * stage if stage <= partner else 2 * partner + 1


def stage_at_slot(slot: int, num_stages: int, *, folded: bool) -> int:
    """Inverse of `pipeline_slot`."""
    if not folded:
        return slot
    return slot // 2 if slot % 2 == 0 else num_stages - 1 - slot // 2


@dataclass(frozen=True)
class Layout:
    """The tp x dp x pp grid of a configuration; `folded` for BPipe."""

    tp: int
    dp: int
    pp: int
    folded: bool = False

    def rank(self, *, stage: int, dp_rank: int, tp_rank: int) -> int:
        slot = pipeline_slot(stage, self.pp, folded=self.folded)
        return (slot * self.dp + dp_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(stage, dp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        stage = stage_at_slot(rank // (self.tp * self.dp), self.pp, folded=self.folded)
        return stage, dp_rank, tp_rank


def layout_of(cfg: TrialConfig) -> Layout:
    """The layout a configuration runs with: folded where its schedule pairs stages (BPipe)."""
    return Layout(tp=cfg.tp, dp=cfg.dp, pp=cfg.pp, folded=SCHEDULE[cfg.schedule].folded)
