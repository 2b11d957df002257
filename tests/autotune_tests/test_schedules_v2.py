"""Schedules v2: a chunk index in every action (interleaved 1F1B).

The closed forms of the bubble with equal costs, the validator, the simulator and the fast path
agreeing on every schedule, the memory the chunked and split programs hold, the text form, and
the command line's grids and bad-input rules.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from autotune.config import TrialConfig, load_model
from autotune.errors import ConfigError
from autotune.estimate.fastpath import StageArrays, compile_schedule, replay
from autotune.estimate.simulate import StageCosts, simulate
from autotune.schedules import from_text, generate, to_text, validate
from autotune.schedules.memory import peak_resident

ALL = [
    (name, p, m, v)
    for p in (2, 3, 4)
    for name, v, ms in (
        ("1f1b", 1, (p, 2 * p + 1)),
        ("gpipe", 1, (p, 2 * p + 1)),
        ("bpipe", 1, (p, 2 * p + 1)),
        ("interleaved", 2, (p, 2 * p, 4 * p)),
        ("interleaved", 3, (p, 2 * p)),
    )
    for m in ms
    if name != "bpipe" or p >= 3
]


def _unit(p: int, v: int, *, fwd: float = 1.0, bwd: float = 2.0, wgt: float = 1.0) -> list[StageCosts]:
    """Equal costs on every rank: a chunk does 1/V of a rank's work."""
    return [StageCosts(fwd=fwd / v, bwd=bwd / v, wgt=wgt / v) for _ in range(p * v)]


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 16), (3, 9), (8, 32)])
def test_one_f_one_b_bubble_is_the_closed_form(p: int, m: int) -> None:
    sim = simulate(generate("1f1b", p, m), _unit(p, 1))
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


@pytest.mark.parametrize(
    ("p", "m", "v"), [(2, 4, 2), (4, 8, 2), (4, 16, 2), (3, 9, 3), (4, 8, 3), (8, 32, 4)]
)
def test_interleaved_bubble_is_the_closed_form(p: int, m: int, v: int) -> None:
    """Megatron's interleaved 1F1B: the bubble (p-1)/(v m + p - 1), V times smaller in time."""
    sim = simulate(generate("interleaved", p, m, virtual_stages=v), _unit(p, v))
    assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
    plain = simulate(generate("1f1b", p, m), _unit(p, 1))
    idle = [sim.step_time - busy for busy in sim.stage_busy]
    assert max(idle) == pytest.approx((plain.step_time - plain.stage_busy[0]) / v, abs=1e-9)


@pytest.mark.parametrize(("name", "p", "m", "v"), ALL, ids=lambda x: str(x))
def test_validator_simulator_and_fast_path_agree(name: str, p: int, m: int, v: int) -> None:
    agree(name, p, m, v)


def agree(name: str, p: int, m: int, v: int) -> None:
    """The peaks the validator counts are the simulator's and the fast path's report; the fast
    path's step time and bubble are the simulator's to 1e-9, with uneven random costs."""
    schedule = generate(name, p, m, virtual_stages=v)
    peaks = validate(schedule)
    rng = random.Random(f"{name}{p}{m}{v}")
    costs = []
    for _ in range(p * v):
        bwd = rng.uniform(1.0, 3.0)
        costs.append(
            StageCosts(
                fwd=rng.uniform(0.5, 1.5), bwd=bwd, wgt=rng.uniform(0.2, 0.8) * bwd,
                send_act=rng.uniform(0.0, 0.3), evict=rng.uniform(0.0, 0.5), act_bytes=1, post=0.01,
                tail=rng.uniform(0.0, 0.2),
            )
        )  # fmt: skip
    sim = simulate(schedule, costs)
    fast = replay(schedule, StageArrays.from_costs([costs], p))
    assert float(fast.step[0]) == pytest.approx(sim.step_time, rel=1e-9, abs=1e-9)
    assert float(fast.bubble[0]) == pytest.approx(sim.bubble_fraction, rel=1e-9, abs=1e-9)
    assert sim.peak_activation_bytes == [peaks[s] for s in range(p)]
    compiled = compile_schedule(schedule)
    for s in range(p):
        sizes = (1,) * v + (1 if schedule.partner[s] is not None else 0,)
        assert max(sum(a * b for a, b in zip(pt, sizes, strict=True)) for pt in compiled.peaks(s)) == peaks[s]


@pytest.mark.parametrize(("p", "v"), [(2, 2), (4, 2), (2, 3), (3, 3), (8, 2)])
def test_interleaved_first_rank_holds_korthikantis_figure(p: int, v: int) -> None:
    """Rank 0 holds p V + p - 1 chunk micro-batches, (1 + (p-1)/(p V)) x 1F1B's p stage ones
    (Korthikanti et al. 2022, section 4.2.3); with m = p every forward runs first (m V)."""
    peaks = validate(generate("interleaved", p, 2 * p, virtual_stages=v))
    assert peaks[0] == p * v + p - 1
    assert peaks[0] / v == pytest.approx((1 + (p - 1) / (p * v)) * p)
    assert validate(generate("interleaved", p, p, virtual_stages=v))[0] == p * v
    # per chunk sizes: the memory model counts each chunk's micro-batches apart
    program = generate("interleaved", p, 2 * p, virtual_stages=v).program(0)
    assert peak_resident(program, own=(10,) * v) == 10 * peaks[0]
    assert peak_resident(program, own=(10, *(0,) * (v - 1))) < 10 * peaks[0]


def test_every_action_carries_its_chunk_and_the_text_form_keeps_it() -> None:
    schedule = generate("interleaved", 2, 4, virtual_stages=3)
    chunks = {a.chunk for program in schedule.programs for a in program}
    assert chunks == {0, 1, 2}
    text = to_text(schedule)
    assert "chunks=3" in text.splitlines()[0] and "F0.2" in text and "SB3.1" in text
    back = from_text(text)
    assert back == schedule
    validate(back)


def test_configuration_rules_of_the_new_schedules() -> None:
    model = load_model("tiny-gpt", num_layers=8)
    cfg = TrialConfig(model=model, pp=2, num_microbatches=4, schedule="interleaved", virtual_stages=2)
    assert cfg.split == (2, 2, 2, 2) and cfg.num_model_stages == 4
    bad = [
        ({"virtual_stages": 3}, "--virtual-stages", "pp x V = 2 x 3 = 6 equal chunks"),
        ({"num_microbatches": 6, "pp": 4}, "--num-microbatches", "multiple of the pipeline stages"),
        ({"stage_layers": (5, 3)}, "--stage-layers", "cannot be given with --virtual-stages 2"),
        ({"pp": 1, "num_microbatches": 2}, "--pp", "at least 2 stages"),
    ]
    for change, field, rule in bad:
        kwargs = {
            "model": model,
            "pp": 2,
            "num_microbatches": 4,
            "schedule": "interleaved",
            "virtual_stages": 2,
        }
        with pytest.raises(ConfigError) as err:
            TrialConfig(**{**kwargs, **change})
        assert err.value.field == field and rule in err.value.rule, err.value


def _autotune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from autotune.cli import main; sys.exit(main())", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_schedule_command_prints_the_new_grids() -> None:
    run = _autotune("schedule", "--schedule", "interleaved", "--virtual-stages", "2", "--pp", "4",
                    "--num-microbatches", "8")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "F0.1" in run.stdout and "B7.1" in run.stdout and "stage 3" in run.stdout
    assert "peak resident micro-batches per stage: 0: 11, 1: 9, 2: 7, 3: 5" in run.stdout


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--schedule", "interleaved", "--virtual-stages", "1"], "--virtual-stages"),
        (["--schedule", "interleaved"], "--virtual-stages"),
        (
            ["--schedule", "interleaved", "--virtual-stages", "2", "--num-microbatches", "6"],
            "--num-microbatches",
        ),
        (["--schedule", "1f1b", "--virtual-stages", "2"], "--virtual-stages"),
        (["--schedule", "interleaved", "--virtual-stages", "0"], "--virtual-stages"),
    ],
)
def test_bad_schedule_flags_exit_2_naming_the_flag(args: list[str], flag: str) -> None:
    run = _autotune("schedule", "--pp", "4", "--num-microbatches", "8", *args)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autotune: error: {flag}:"), run.stderr


def test_a_space_searches_chunks_per_rank_and_screens_the_new_schedules(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`virtual_stages` is a knob a space may list: the combinations a schedule cannot take are
    rejected with their rule, the rest screened by the fast path as the simulator replays them."""
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.estimator import estimate, estimate_many
    from autotune.tuner.space import load_space

    path = tmp_path / "chunks.yaml"
    path.write_text(
        "name: chunks\nmodel: gpt3-175b\ncluster: a100-80g-8x8\nglobal_batch_size: 64\n"
        "knobs:\n  tp: [8]\n  pp: [8]\n  schedule: [1f1b, interleaved]\n  virtual_stages: [1, 2, 4]\n"
    )
    valid, rejected = load_space(str(path)).configs()
    assert sorted((c.schedule, c.virtual_stages) for c in valid) == [
        ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)
    ]  # fmt: skip
    assert len(rejected) == 3 and {r.field for r in rejected} == {"--virtual-stages"}
    cluster = load_cluster("a100-80g-8x8")
    screened = estimate_many(valid, cluster)
    by = {(r["config"]["schedule"], r["config"]["virtual_stages"]): r for r in screened}
    for cfg, result in zip(valid, screened, strict=True):
        single = estimate(cfg, cluster, record=True)  # the event simulator
        assert result["step_time_s"] == pytest.approx(single["step_time_s"], rel=1e-9)
        assert result["stages"] == single["stages"]
    # the smaller bubbles, and interleaving's memory: rank 0 holds (1 + (p-1)/(pV)) of 1F1B's
    assert by["interleaved", 4]["bubble_fraction"] < by["interleaved", 2]["bubble_fraction"]
    assert by["interleaved", 2]["bubble_fraction"] < by["1f1b", 1]["bubble_fraction"]
    act = {k: r["stages"][0]["peak_activation_bytes"] for k, r in by.items()}
    assert act["interleaved", 2] / act["1f1b", 1] == pytest.approx(1 + 7 / 16, rel=0.02)
