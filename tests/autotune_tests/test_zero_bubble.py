"""ZB-H1 (Qi et al., ICLR 2024): each backward split into its input gradient B and its weight
gradient W. The closed form of its bubble, the validator, simulator and fast path agreeing on
it, the memory a split backward holds, and its command-line rules. (Its trials' losses, gradients
and per-stage peaks are checked with every other schedule's, in the trial runners' matrix.)"""

from __future__ import annotations

import pytest

from autotune.config import TrialConfig, load_model
from autotune.errors import ConfigError
from autotune.estimate.simulate import simulate
from autotune.schedules import Action, Kind, Schedule, ScheduleError, from_text, generate, to_text, validate
from tests.autotune_tests.test_schedules_v2 import _autotune, _unit, agree


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 16), (3, 9), (8, 32), (4, 64)])
def test_zb_h1_bubble_is_about_a_third_of_one_f_one_b(p: int, m: int) -> None:
    """With F = B = W (a backward of 2 split in halves): (p-1)/(3m + p - 1), against 1F1B's
    (p-1)/(m + p - 1), so a third of 1F1B's idle time per stage, and its bubble fraction tends
    to a third as m grows; no stage holds more than 1F1B's first stage (p micro-batches)."""
    zb = generate("zb-h1", p, m)
    sim = simulate(zb, _unit(p, 1))
    base = simulate(generate("1f1b", p, m), _unit(p, 1))
    assert sim.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
    assert (sim.step_time - 3 * m) == pytest.approx((base.step_time - 3 * m) / 3, abs=1e-9)
    ratio = sim.bubble_fraction / base.bubble_fraction
    assert 1 / 3 < ratio <= (m + p - 1) / (3 * m + p - 1) + 1e-12
    assert max(validate(zb).values()) == p
    assert sum(1 for a in zb.program(0) if a.kind is Kind.W) == m


@pytest.mark.parametrize(("p", "m"), [(1, 2), (2, 2), (2, 5), (3, 3), (3, 7), (4, 4), (4, 9), (4, 16)])
def test_validator_simulator_and_fast_path_agree_on_zb_h1(p: int, m: int) -> None:
    agree("zb-h1", p, m, 1)


def test_the_text_form_keeps_weight_gradients() -> None:
    zb = generate("zb-h1", 3, 5)
    assert from_text(to_text(zb)) == zb and "W4" in to_text(zb)


def test_a_weight_gradient_before_its_input_gradient_is_refused() -> None:
    program = list(generate("zb-h1", 1, 2).program(0))
    b0, w0 = program.index(Action(Kind.B, 0)), program.index(Action(Kind.W, 0))
    program[b0], program[w0] = program[w0], program[b0]
    with pytest.raises(ScheduleError, match="a weight gradient before its input gradient"):
        validate(Schedule("zb-h1", 1, 2, (tuple(program),), (None,)))


def test_recomputation_is_refused_naming_the_flag() -> None:
    for recompute in ("selective", "full"):
        with pytest.raises(ConfigError) as err:
            TrialConfig(model=load_model("tiny-gpt"), pp=2, schedule="zb-h1", recompute=recompute)
        assert err.value.field == "--recompute" and "zb-h1" in err.value.rule


def test_the_schedule_command_prints_its_grid_and_refuses_chunks() -> None:
    run = _autotune("schedule", "--schedule", "zb-h1", "--pp", "4", "--num-microbatches", "8")
    assert run.returncode == 0, run.stderr
    assert (
        "W7" in run.stdout and "peak resident micro-batches per stage: 0: 4, 1: 4, 2: 4, 3: 4" in run.stdout
    )
    run = _autotune("schedule", "--schedule", "zb-h1", "--virtual-stages", "2")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().startswith("autotune: error: --virtual-stages: zb-h1 runs one model chunk")


def test_screening_a_space_with_zb_h1_matches_the_simulator() -> None:
    """On GPT-3 175B over 64 A100s its bubble is about half 1F1B's (the tensor-parallel
    collectives of a backward stay with B, which the previous stage waits for)."""
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.estimator import estimate, estimate_many

    cluster = load_cluster("a100-80g-8x8")
    model = load_model("gpt3-175b")
    configs = [
        TrialConfig(model=model, tp=8, pp=8, global_batch_size=64, schedule=s) for s in ("1f1b", "zb-h1")
    ]
    base, zb = estimate_many(configs, cluster)
    assert zb["step_time_s"] == pytest.approx(
        estimate(configs[1], cluster, record=True)["step_time_s"], rel=1e-9
    )
    assert zb["bubble_fraction"] < 0.6 * base["bubble_fraction"]
    assert zb["stages"][0]["peak_activation_bytes"] == base["stages"][0]["peak_activation_bytes"]
