"""The rank layout: tp fastest, then dp, then pipeline slots; BPipe pairs sit side by side."""

from __future__ import annotations

import itertools

import pytest

from autotune.placement import Layout, pipeline_slot, stage_at_slot


@pytest.mark.parametrize("p", range(1, 10))
@pytest.mark.parametrize("folded", [False, True])
def test_slots_are_a_permutation(p: int, folded: bool) -> None:
    slots = [pipeline_slot(s, p, folded=folded) for s in range(p)]
    assert sorted(slots) == list(range(p))
    assert all(stage_at_slot(pipeline_slot(s, p, folded=folded), p, folded=folded) == s for s in range(p))


@pytest.mark.parametrize("p", range(2, 10))
def test_folding_puts_bpipe_pairs_next_to_each_other(p: int) -> None:
    for x in range(p // 2):
        a, b = pipeline_slot(x, p, folded=True), pipeline_slot(p - 1 - x, p, folded=True)
        assert abs(a - b) == 1 and min(a, b) % 2 == 0


@pytest.mark.parametrize(
    ("tp", "dp", "pp", "folded"), list(itertools.product((1, 2), (1, 2, 3), (1, 3, 4), (False, True)))
)
def test_rank_and_coords_are_inverse(tp: int, dp: int, pp: int, folded: bool) -> None:
    layout = Layout(tp=tp, dp=dp, pp=pp, folded=folded)
    ranks = set()
    for stage, d, t in itertools.product(range(pp), range(dp), range(tp)):
        rank = layout.rank(stage=stage, dp_rank=d, tp_rank=t)
        assert layout.coords(rank) == (stage, d, t)
        ranks.add(rank)
    assert ranks == set(range(tp * dp * pp))
    # Tensor-parallel peers are adjacent devices (one node).
    assert layout.rank(stage=0, dp_rank=0, tp_rank=tp - 1) == tp - 1
