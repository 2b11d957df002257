"""The simulator with constructed costs: exact bubbles, free and slow BPipe transfers, deadlocks."""

from __future__ import annotations

import dataclasses

import pytest

from autotune.estimate.simulate import DeadlockError, StageCosts, simulate
from autotune.schedules import generate
from autotune.schedules.ir import Action
from autotune.schedules.memory import peak_resident

SIZES = [(p, m) for p in (1, 2, 3, 4, 6, 8) for m in (p, p + 1, 2 * p + 1, 4 * p)]


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
@pytest.mark.parametrize(("p", "m"), SIZES)
@pytest.mark.parametrize(("fwd", "bwd"), [(1.0, 1.0), (1.0, 2.0)])
def test_bubble_is_exactly_the_textbook_one(name: str, p: int, m: int, fwd: float, bwd: float) -> None:
    result = simulate(generate(name, p, m), [StageCosts(fwd, bwd)] * p)
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert result.step_time == pytest.approx((m + p - 1) * (fwd + bwd), abs=1e-12)


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_bpipe_equals_1f1b_when_transfers_are_free(p: int, m: int) -> None:
    costs = [StageCosts(1.0, 2.0, send_act=0.0, evict=0.0)] * p
    assert (
        simulate(generate("bpipe", p, m), costs).step_time
        == simulate(generate("1f1b", p, m), costs).step_time
    )


def test_bpipe_is_slower_by_exactly_the_unhidden_transfer_time() -> None:
    """p=4, m=4, F=1, B=2: stage 0 evicts micro-batch 2 before F3 and loads it back before B2.

    The eviction has 2 units of slack (stage 0's F3 is not critical until it delays stage 1's
    B1); the load is posted after stage 0's B1 and sits on the critical path once it outlasts the
    6 units stage 0 waits anyway for its next gradient. So each transfer costs exactly what it
    does not hide: max(0, d - 2) + max(0, d - 6).
    """
    base = simulate(generate("1f1b", 4, 4), [StageCosts(1.0, 2.0)] * 4).step_time
    for d in (0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 6.0, 7.5, 10.0, 20.0):
        slow = simulate(generate("bpipe", 4, 4), [StageCosts(1.0, 2.0, evict=d)] * 4)
        assert slow.step_time - base == pytest.approx(max(0.0, d - 2) + max(0.0, d - 6)), d
        assert slow.exposed_transfer[1:] == [0.0, 0.0, 0.0]  # only the evictor ever waits


def test_bpipe_hides_a_transfer_shorter_than_a_compute_action() -> None:
    """With p=4 (cap 3) one eviction and one load per steady step, each overlapping a compute."""
    for p, m in ((4, 4), (4, 8), (4, 16)):
        base = simulate(generate("1f1b", p, m), [StageCosts(1.0, 2.0)] * p).step_time
        assert simulate(generate("bpipe", p, m), [StageCosts(1.0, 2.0, evict=1.0)] * p).step_time == base


@pytest.mark.parametrize("m", [2, 3, 4, 8, 16])
def test_posting_a_send_or_receive_takes_the_posting_thread(m: int) -> None:
    """Over 2 stages the last stage is 1F1B's critical one; it posts a receive and a send per
    micro-batch (RF, SB), and every one of those posts but the first (RF0, made while it waits
    for F0 anyway) delays it, as does stage 0's SF0 post before the first transfer: + 2 m c."""
    base = simulate(generate("1f1b", 2, m), [StageCosts(1.0, 2.0)] * 2).step_time
    for c in (0.01, 0.1, 0.25):
        posted = simulate(generate("1f1b", 2, m), [StageCosts(1.0, 2.0, post=c)] * 2)
        assert posted.step_time == pytest.approx(base + 2 * m * c, abs=1e-12)
        assert posted.stage_busy == [m * 3.0] * 2  # posts are not compute
    alone = simulate(generate("1f1b", 1, m), [StageCosts(1.0, 2.0, post=0.5)])
    assert alone.step_time == m * 3.0  # one stage posts nothing


def test_broken_program_is_a_deadlock_with_the_grid() -> None:
    """Stage 0 runs B1 before sending F1: B1 needs stage 1's gradient, which needs that F1."""
    schedule = generate("1f1b", 2, 2)
    stage0 = tuple(Action.parse(t) for t in ["RB0", "RB1", "F0", "SF0", "B1", "F1", "SF1", "B0"])
    broken = dataclasses.replace(schedule, programs=(stage0, schedule.program(1)))
    with pytest.raises(DeadlockError) as err:
        simulate(broken, [StageCosts(1.0, 2.0)] * 2)
    assert "deadlock" in str(err.value) and "B1" in str(err.value)
    assert "<-- ERROR HERE" in str(err.value)


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "bpipe"])
def test_memory_follows_the_schedule_with_sizes(name: str) -> None:
    p, m = 4, 8
    costs = [StageCosts(1.0, 2.0, act_bytes=100 * (s + 1), static_bytes=7) for s in range(p)]
    schedule = generate(name, p, m)
    result = simulate(schedule, costs)
    for s in range(p):
        partner = schedule.partner[s]
        want = peak_resident(
            schedule.program(s),
            own=100 * (s + 1),
            partner=100 * (partner + 1) if partner is not None else 0,
            cap=schedule.cap,
        )
        assert result.peak_activation_bytes[s] == want
        assert result.peak_memory_bytes[s] == want + 7
    if name == "1f1b":
        assert result.peak_activation_bytes == [100 * (s + 1) * (p - s) for s in range(p)]


def test_timeline_spans() -> None:
    result = simulate(
        generate("bpipe", 4, 8), [StageCosts(1.0, 2.0, send_act=0.1, evict=3.0)] * 4, record=True
    )
    compute = [s for s in result.spans if s.kind == "compute"]
    assert len(compute) == 4 * 2 * 8
    assert {s.label.split()[0] for s in result.spans if s.kind == "transfer"} == {
        "act",
        "grad",
        "evict",
        "load",
    }
    assert max(s.end for s in result.spans) == pytest.approx(result.step_time)
    for stage in range(4):  # a stage computes one thing at a time
        mine = sorted((s.start, s.end) for s in compute if s.stage == stage)
        assert all(a_end <= b_start + 1e-12 for (_, a_end), (b_start, _) in zip(mine, mine[1:], strict=False))
