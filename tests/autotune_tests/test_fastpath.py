"""The vectorised fast path gives the simulator's numbers, for any per-stage costs."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.config import TrialConfig, load_model
from autotune.estimate.clusters import load_cluster
from autotune.estimate.estimator import estimate, estimate_many
from autotune.estimate.fastpath import StageArrays, step_times
from autotune.estimate.simulate import StageCosts, simulate
from autotune.schedules import generate


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "bpipe"])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
def test_matches_the_simulator_on_random_costs(name: str, p: int) -> None:
    rng = np.random.default_rng(p)
    for m in (p, 2 * p + 1, 4 * p):
        schedule = generate(name, p, m)
        rows = [
            [StageCosts(fwd=rng.uniform(0.5, 2), bwd=rng.uniform(1, 4), send_act=rng.uniform(0, 1),
                        evict=rng.uniform(0, 4), tail=rng.uniform(0, 1),
                        post=rng.uniform(0, 0.3) if i % 2 else 0.0) for _ in range(p)]
            for i in range(8)
        ]  # fmt: skip
        steps, bubbles = step_times(schedule, StageArrays.from_costs(rows))
        for row, step, bubble in zip(rows, steps, bubbles, strict=True):
            sim = simulate(schedule, row)
            assert step == pytest.approx(sim.step_time, rel=1e-12)
            assert bubble == pytest.approx(sim.bubble_fraction, abs=1e-12)


def test_estimate_many_equals_estimate() -> None:
    cluster = load_cluster("a100-80g-8x2")
    model = load_model("gpt3-65b", num_layers=16)
    configs = [
        TrialConfig(model=model, tp=tp, pp=pp, dp=16 // (tp * pp), micro_batch_size=b, global_batch_size=128,
                    schedule=schedule, recompute=recompute, flash_attention=flash)
        for tp in (2, 8) for pp in (1, 2, 8) for b in (1, 2) for schedule in ("1f1b", "gpipe", "bpipe")
        for recompute in ("none", "full") for flash in (True, False)
        if 16 % (tp * pp) == 0 and (schedule != "bpipe" or pp >= 3)
    ]  # fmt: skip
    many = estimate_many(configs, cluster)
    assert len(many) == len(configs)
    for cfg, fast in zip(configs, many, strict=True):
        one = estimate(cfg, cluster)  # the compiled replay, for one configuration
        slow = estimate(cfg, cluster, record=True)  # the event simulator
        for other in (one, slow):
            assert fast["step_time_s"] == pytest.approx(other["step_time_s"], rel=1e-12)
            assert fast["bubble_fraction"] == pytest.approx(other["bubble_fraction"], abs=1e-12)
            exposed = pytest.approx(other["exposed_transfer_s"], rel=1e-9, abs=1e-12)
            assert fast["exposed_transfer_s"] == exposed
            assert fast["stages"] == other["stages"] and fast["fits"] == other["fits"]


@pytest.mark.parametrize("p", [3, 4, 8])
def test_exposed_bpipe_transfer_time_matches_the_simulator(p: int) -> None:
    """Where evictions are slower than compute, the evictor's compute waits on them: the fast
    path charges each stage the same waiting time as the simulator, and only BPipe's waits."""
    from autotune.estimate.fastpath import replay

    rng = np.random.default_rng(p)
    schedule = generate("bpipe", p, 3 * p)
    rows = [
        [StageCosts(fwd=rng.uniform(0.5, 2), bwd=rng.uniform(1, 4), send_act=rng.uniform(0, 2),
                    evict=rng.uniform(2, 8), tail=0.0, post=rng.uniform(0, 0.2)) for _ in range(p)]
        for _ in range(6)
    ]  # fmt: skip
    out = replay(schedule, StageArrays.from_costs(rows))
    for row, exposed in zip(rows, out.exposed, strict=True):
        sim = simulate(schedule, row)
        np.testing.assert_allclose(exposed, sim.exposed_transfer, rtol=1e-12, atol=1e-12)
    assert out.exposed[:, 0].min() > 0  # stage 0 waits on its slow evictions in every row
    gpipe = replay(generate("gpipe", p, 3 * p), StageArrays.from_costs(rows))
    assert not gpipe.exposed.any()  # no BPipe transfers, nothing exposed


def test_compiled_loop_equals_plain_python_and_long_schedules() -> None:
    """The numba-compiled replay and its plain-Python source agree; a long BPipe schedule (many
    micro-batches, several eviction patterns at once) still matches the event simulator."""
    from autotune.estimate import fastpath

    rng = np.random.default_rng(7)
    schedule = generate("bpipe", 8, 96)
    rows = [
        [StageCosts(fwd=rng.uniform(0.5, 2), bwd=rng.uniform(1, 4), send_act=rng.uniform(0, 1),
                    evict=rng.uniform(0, 6), tail=rng.uniform(0, 1), post=rng.uniform(0, 0.2))
         for _ in range(8)]
        for _ in range(3)
    ]  # fmt: skip
    arrays = StageArrays.from_costs(rows)
    compiled = fastpath.compile_schedule(schedule)
    args = fastpath.kernel_args(compiled, arrays)
    np.testing.assert_array_equal(fastpath._kernel(*args), fastpath._replay(*args))
    steps, _ = step_times(schedule, arrays)
    for row, step in zip(rows, steps, strict=True):
        assert step == pytest.approx(simulate(schedule, row).step_time, rel=1e-12)


def test_a_hand_made_schedule_is_not_mistaken_for_the_generated_one() -> None:
    """Two schedules with the same name and sizes but different programs get their own arrays:
    a broken hand-made copy of a compiled schedule is still found to deadlock."""
    from dataclasses import replace

    from autotune.estimate.fastpath import compile_schedule

    schedule = generate("gpipe", 2, 4)
    assert compile_schedule(schedule).num_ops == sum(len(p) for p in schedule.programs)
    programs = list(schedule.programs)
    programs[0] = programs[0][10:] + programs[0][:10]  # stage 0 waits for gradients first
    with pytest.raises(ValueError, match="deadlock"):
        compile_schedule(replace(schedule, programs=tuple(programs)))
