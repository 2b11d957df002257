"""Per-stage activation peaks are exact integers: the schedule's counts times the bytes of one
micro-batch, measured by saved-tensor hooks in real multi-process runs."""

from __future__ import annotations

import pytest

from autotune.estimate.clusters import load_cluster
from autotune.estimate.estimator import estimate
from autotune.schedules import default_cap, generate
from autotune.schedules.memory import peak_resident
from tests.trial_runners_tests.pipeline_cases import Case, RunResult, matrix_cases, memory_cases


def _stage(result: RunResult, stage: int) -> dict:
    return next(r for r in result.ranks if r["stage"] == stage and r["tp_rank"] == 0 and r["dp_rank"] == 0)


def _all_runs(matrix_runs: dict[Case, RunResult], memory_runs: dict[Case, RunResult]) -> list[RunResult]:
    return [matrix_runs[c] for c in matrix_cases()] + [memory_runs[c] for c in memory_cases()]


def test_peaks_follow_the_schedule_exactly(matrix_runs, memory_runs) -> None:
    """1F1B: min(p-s, m) micro-batches; GPipe: m; BPipe and ZB-H1: what its program holds (stash
    included; ZB-H1's until each weight gradient)."""
    for result in _all_runs(matrix_runs, memory_runs):
        case = result.case
        p, m = case.pp, case.m
        if case.v > 1:
            continue  # chunks of a rank differ in size: the estimator's test below predicts them
        schedule = generate(case.schedule, p, m)
        for s in range(p):
            rank = _stage(result, s)
            own = rank["microbatch_bytes"]
            assert own > 0
            if case.schedule == "1f1b":
                expected = min(p - s, m) * own
            elif case.schedule == "gpipe":
                expected = m * own
            else:
                partner = schedule.partner[s]
                partner_bytes = _stage(result, partner)["microbatch_bytes"] if partner is not None else 0
                program, cap = schedule.program(s), schedule.cap
                expected = peak_resident(program, own=own, partner=partner_bytes, cap=cap)
                if cap is not None:
                    assert peak_resident(program, cap=cap) <= default_cap(p), (
                        f"{case} stage {s} above the cap"
                    )
            assert rank["peak_activation_bytes"] == expected, f"{case} stage {s}"


def test_bpipe_stage0_holds_less_than_1f1b(matrix_runs, memory_runs) -> None:
    runs = {**matrix_runs, **memory_runs}
    compared = 0
    for case in runs:
        if case.schedule != "bpipe" or case.pp < 3:
            continue
        baseline = Case(**{**case.__dict__, "schedule": "1f1b"})
        if baseline not in runs:
            continue
        bpipe0 = _stage(runs[case], 0)
        base0 = _stage(runs[baseline], 0)
        assert bpipe0["microbatch_bytes"] == base0["microbatch_bytes"]
        assert bpipe0["peak_activation_bytes"] < base0["peak_activation_bytes"], str(case)
        assert bpipe0["peak_activation_bytes"] == default_cap(case.pp) * bpipe0["microbatch_bytes"]
        compared += 1
    assert compared >= 10


@pytest.mark.parametrize(
    ("case", "stage0", "last"),
    [
        # Pinned regressions (tiny-gpt: h=64, s=32, b=1, fp32; SDPA keeps ~64*s*b*h per layer).
        (Case("tiny-gpt", 4, 4, "1f1b"), 4 * 132_352, 181_764),
        (Case("tiny-gpt", 4, 9, "bpipe"), 3 * 132_352, 181_764 + 2 * 132_352),
        (Case("tiny-gpt", 4, 9, "gpipe"), 9 * 132_352, 9 * 181_764),
    ],
    ids=str,
)
def test_pinned_peaks(case: Case, stage0: int, last: int, matrix_runs) -> None:
    result = matrix_runs[case]
    assert _stage(result, 0)["peak_activation_bytes"] == stage0
    assert _stage(result, case.pp - 1)["peak_activation_bytes"] == last


def test_explicit_attention_keeps_the_s2_term(matrix_runs) -> None:
    """Explicit softmax attention saves a*s^2 tensors per layer that flash attention does not."""
    flash = _stage(matrix_runs[Case("tiny-gpt", 2, 2, "1f1b")], 0)["microbatch_bytes"]
    explicit = _stage(matrix_runs[Case("tiny-gpt", 2, 2, "1f1b", flash=False)], 0)["microbatch_bytes"]
    full = _stage(matrix_runs[Case("tiny-gpt", 2, 2, "1f1b", "full")], 0)["microbatch_bytes"]
    heads, s, layers = 4, 32, 2
    # The softmax output (a*s^2 fp32 per layer) is what SDPA does not keep (it keeps a*s log-sum-exps).
    assert explicit - flash >= layers * heads * s * (s - 1) * 4
    assert full < flash


def test_estimator_predicts_every_measured_peak_exactly(matrix_runs, memory_runs) -> None:
    """`autotune estimate`'s per-stage activation peaks and evicted bytes are the executor's,
    to the byte: both families, every schedule, recompute none/selective/full, flash on/off,
    pp 1-4, tp 2 and dp 2."""
    cluster = load_cluster("cpu-local")
    for result in _all_runs(matrix_runs, memory_runs):
        predicted = estimate(result.case.config(), cluster)["stages"]
        for s, stage in enumerate(predicted):
            measured = [r for r in result.ranks if r["stage"] == s]
            assert stage["peak_activation_bytes"] == max(r["peak_activation_bytes"] for r in measured), (
                f"{result.case} stage {s}"
            )
            assert stage["evicted_bytes"] == max(r["evicted_bytes"] for r in measured), (
                f"{result.case} stage {s}"
            )
