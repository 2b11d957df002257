"""The schedule IR, generators, validator and renderers (torch-free, fast).

Tables of actions in the style of PyTorch's `test/distributed/pipelining/test_schedule.py`:
golden programs for small cases, a sweep over (stages, micro-batches) through the validator,
and hand-broken program sets that the validator must reject with the failing step marked.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from autotune.schedules import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    default_cap,
    from_text,
    generate,
    grid,
    to_csv,
    to_text,
    validate,
)
from autotune.schedules.generators import gpipe_order, one_f_one_b_order, unit_timeline
from autotune.schedules.render import programs_from_csv

SCHEDULE_NAMES = ("gpipe", "1f1b", "bpipe")


def microbatch_counts(name: str, p: int) -> list[int]:
    counts = {p, p + 1, 2 * p + 1, 3 * p}
    if name == "gpipe":
        counts.add(1)
    return sorted(counts)


SWEEP = [(name, p, m) for name in SCHEDULE_NAMES for p in range(1, 9) for m in microbatch_counts(name, p)]


def prog(text: str) -> tuple[Action, ...]:
    return tuple(Action.parse(tok) for tok in text.split())


def with_programs(schedule: Schedule, **stages: str) -> Schedule:
    """`schedule` with some stages' programs replaced (keys `s0`, `s1`, ...)."""
    programs = list(schedule.programs)
    for key, text in stages.items():
        programs[int(key[1:])] = prog(text)
    return dataclasses.replace(schedule, programs=tuple(programs))


def without(schedule: Schedule, stage: int, token: str) -> Schedule:
    """`schedule` with the one action `token` dropped from `stage`'s program."""
    action = Action.parse(token)
    program = list(schedule.programs[stage])
    assert program.count(action) == 1, f"{token} is not unique on stage {stage}"
    program.remove(action)
    programs = list(schedule.programs)
    programs[stage] = tuple(program)
    return dataclasses.replace(schedule, programs=tuple(programs))


def error_line(err: ScheduleError) -> str:
    """The grid line that carries the `<-- ERROR HERE` marker (exactly one)."""
    marked = [ln for ln in str(err).splitlines() if "<-- ERROR HERE" in ln]
    assert len(marked) == 1, str(err)
    return marked[0]


def assert_marked(err: ScheduleError, schedule: Schedule, stage: int, step: int) -> None:
    """The error points at (stage, step) of `schedule`, and its grid marks that cell on that row."""
    assert (err.stage, err.step) == (stage, step), str(err)
    line = error_line(err)
    assert line.startswith(f"{step:<6}"), line
    assert f"[{schedule.programs[stage][step]}]" in line, line
    assert line.endswith(f"<-- ERROR HERE (stage {stage})"), line
    assert str(err) == f"{err.message}\n{err.grid}"


# --------------------------------------------------------------------------------------------
# The sweep: every generated schedule validates, with the memory profile each one promises.


@pytest.mark.parametrize(("name", "p", "m"), SWEEP)
def test_sweep_generates_valid_schedules(name: str, p: int, m: int) -> None:
    schedule = generate(name, p, m)
    assert (schedule.name, schedule.num_stages, schedule.num_microbatches) == (name, p, m)
    assert len(schedule.programs) == p
    peaks = validate(schedule)
    assert sorted(peaks) == list(range(p))
    for s, program in enumerate(schedule.programs):
        for kind in (Kind.F, Kind.B):
            for k in range(m):
                assert program.count(Action(kind, k)) == 1, (s, kind, k)
        assert all(0 <= a.mb < m for a in program)
        # Point-to-point traffic: every activation and gradient crosses each boundary once.
        if s < p - 1:
            assert sorted(a.mb for a in program if a.kind is Kind.SEND_F) == list(range(m))
            assert sorted(a.mb for a in program if a.kind is Kind.RECV_B) == list(range(m))
        if s > 0:
            assert sorted(a.mb for a in program if a.kind is Kind.RECV_F) == list(range(m))
            assert sorted(a.mb for a in program if a.kind is Kind.SEND_B) == list(range(m))
    if name == "1f1b":
        assert peaks == {s: min(p - s, m) for s in range(p)}
        assert schedule.cap is None
    elif name == "gpipe":
        assert peaks == {s: m for s in range(p)}
        assert schedule.cap is None
    else:
        assert schedule.cap == default_cap(p)
        assert all(peak <= default_cap(p) for peak in peaks.values()), peaks
        if p >= 3:
            one_f_one_b_stage0 = validate(generate("1f1b", p, m))[0]
            assert peaks[0] < one_f_one_b_stage0, peaks


@pytest.mark.parametrize("p", range(1, 9))
def test_default_cap_is_half_of_a_pairs_1f1b_load(p: int) -> None:
    # A pair (x, p-1-x) holds (p - x) + (x + 1) = p + 1 micro-batches under 1F1B.
    assert default_cap(p) == (p + 2) // 2
    assert 2 * default_cap(p) >= p + 1


@pytest.mark.parametrize("p", [2, 4, 5, 8])
def test_bpipe_pairs_and_matched_evictions(p: int) -> None:
    schedule = generate("bpipe", p, 2 * p + 1)
    for s in range(p):
        partner = schedule.partner[s]
        if partner is None:
            assert p % 2 == 1 and s == p // 2
            continue
        assert partner == p - 1 - s
        assert schedule.partner[partner] == s
        mine, theirs = schedule.programs[s], schedule.programs[partner]
        for k in range(schedule.num_microbatches):
            assert mine.count(Action(Kind.EVICT, k)) == theirs.count(Action(Kind.STASH, k))
            assert mine.count(Action(Kind.LOAD, k)) == theirs.count(Action(Kind.RESTORE, k))
    # Only the first half evicts; the acceptors only stash and return.
    for s in range(p):
        kinds = {a.kind for a in schedule.programs[s]}
        if s >= p // 2:
            assert Kind.EVICT not in kinds and Kind.LOAD not in kinds
        else:
            assert Kind.STASH not in kinds and Kind.RESTORE not in kinds
    # Stage 0 holds min(p, m) under 1F1B, above the default cap from p = 3 on.
    assert bool(schedule.evicted(0)) == (p >= 3)


@pytest.mark.parametrize(
    ("name", "p", "m", "message"),
    [
        ("zigzag", 2, 2, "unknown schedule"),
        ("1f1b", 0, 2, "at least one stage"),
        ("gpipe", 2, 0, "at least one stage"),
        ("1f1b", 4, 3, "at least as many micro-batches"),
        ("bpipe", 4, 3, "at least as many micro-batches"),
    ],
)
def test_generate_rejects_impossible_sizes(name: str, p: int, m: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(name, p, m)


def test_gpipe_allows_fewer_microbatches_than_stages() -> None:
    assert validate(generate("gpipe", 4, 2)) == {0: 2, 1: 2, 2: 2, 3: 2}


# --------------------------------------------------------------------------------------------
# Tables of actions: golden programs, as `autotune schedule --text` prints them today.

GOLDEN = {
    ("1f1b", 2, 3): [
        "F0 SF0 RB0 F1 SF1 B0 RB1 F2 SF2 RB2 B1 B2",
        "RF0 F0 RF1 B0 SB0 F1 RF2 B1 SB1 F2 B2 SB2",
    ],
    ("gpipe", 2, 2): [
        "F0 SF0 RB0 F1 SF1 RB1 B0 B1",
        "RF0 RF1 F0 F1 B0 SB0 B1 SB1",
    ],
    ("1f1b", 1, 2): ["F0 B0 F1 B1"],
    # A receive is posted one compute action ahead of its use, so with m=1 RB0 comes first.
    ("gpipe", 3, 1): ["RB0 F0 SF0 B0", "RF0 RB0 F0 SF0 B0 SB0", "RF0 F0 B0 SB0"],
    ("1f1b", 3, 3): [
        "F0 SF0 F1 SF1 RB0 F2 SF2 RB1 B0 RB2 B1 B2",
        "RF0 RF1 F0 SF0 RB0 F1 SF1 RF2 B0 SB0 RB1 F2 SF2 RB2 B1 SB1 B2 SB2",
        "RF0 F0 RF1 B0 SB0 F1 RF2 B1 SB1 F2 B2 SB2",
    ],
}

# BPipe, p=4, m=8, cap=3: stage 0 evicts to stage 3 and loads back (stage 3 stashes/returns).
BPIPE_4_8_STAGE0 = (
    "F0 SF0 F1 SF1 F2 SF2 RB0 EV2 F3 SF3 B0 RB1 F4 SF4 EV4 B1 RB2 LD2 F5 SF5 B2 RB3 F6 SF6 "
    "EV6 B3 RB4 LD4 F7 SF7 RB5 B4 RB6 B5 RB7 LD6 B6 B7"
)
BPIPE_4_8_STAGE3 = (
    "RF0 ST2 F0 RF1 B0 SB0 F1 RF2 B1 SB1 F2 RF3 B2 SB2 ST4 F3 RF4 B3 SB3 RS2 F4 RF5 B4 SB4 "
    "ST6 F5 RF6 B5 SB5 RS4 F6 RF7 B6 SB6 F7 B7 SB7 RS6"
)


@pytest.mark.parametrize(("key", "programs"), GOLDEN.items(), ids=lambda v: str(v))
def test_golden_programs(key: tuple[str, int, int], programs: list[str]) -> None:
    schedule = generate(*key)
    assert [" ".join(map(str, p)) for p in schedule.programs] == programs
    validate(schedule)


def test_golden_bpipe_p4_m8() -> None:
    schedule = generate("bpipe", 4, 8)
    assert schedule.cap == 3
    assert schedule.partner == (3, 2, 1, 0)
    assert " ".join(map(str, schedule.programs[0])) == BPIPE_4_8_STAGE0
    assert " ".join(map(str, schedule.programs[3])) == BPIPE_4_8_STAGE3
    # Stages 1 and 2 are a pair too, but at cap 3 they hold 3 + 2 and need no eviction:
    # their programs are exactly 1F1B's.
    one_f_one_b = generate("1f1b", 4, 8)
    assert schedule.programs[1:3] == one_f_one_b.programs[1:3]
    assert validate(schedule) == {0: 3, 1: 3, 2: 2, 3: 3}


def test_golden_bpipe_p4_m8_makes_sense() -> None:
    """Check the golden table by its meaning, not just its text."""
    stage0, stage3 = prog(BPIPE_4_8_STAGE0), prog(BPIPE_4_8_STAGE3)
    # Stage 0 never holds more than 3 micro-batches: an eviction frees its room when an
    # allocating action (F/LD/ST) needs it.
    held, pending, peak = 0, 0, 0
    for a in stage0:
        if a.kind.allocates and pending and held + 1 > 3:
            held, pending = held - pending, 0
        held += {Kind.F: 1, Kind.LOAD: 1, Kind.B: -1}.get(a.kind, 0)
        pending += a.kind is Kind.EVICT
        peak = max(peak, held)
    assert peak == 3
    evicted = [a.mb for a in stage0 if a.kind is Kind.EVICT]
    loaded = [a.mb for a in stage0 if a.kind is Kind.LOAD]
    assert evicted == loaded == [2, 4, 6]
    assert [a.mb for a in stage3 if a.kind is Kind.STASH] == evicted
    assert [a.mb for a in stage3 if a.kind is Kind.RESTORE] == loaded
    for k in evicted:
        # Evict after the forward, load back before the backward; stash before return.
        assert stage0.index(Action(Kind.F, k)) < stage0.index(Action(Kind.EVICT, k))
        assert stage0.index(Action(Kind.LOAD, k)) < stage0.index(Action(Kind.B, k))
        assert stage3.index(Action(Kind.STASH, k)) < stage3.index(Action(Kind.RESTORE, k))


def test_golden_csv() -> None:
    assert to_csv(generate("gpipe", 2, 1)) == (
        "stage,step,action\n0,0,RB0\n0,1,F0\n0,2,SF0\n0,3,B0\n1,0,RF0\n1,1,F0\n1,2,B0\n1,3,SB0\n"
    )


def test_golden_text() -> None:
    assert to_text(generate("bpipe", 2, 2)).splitlines()[0] == (
        "schedule bpipe stages=2 microbatches=2 cap=2 partner=1,0"
    )
    assert to_text(generate("1f1b", 3, 3)).splitlines()[0] == (
        "schedule 1f1b stages=3 microbatches=3 cap=- partner=-,-,-"
    )


def test_grid_layout() -> None:
    text = grid(generate("gpipe", 2, 1).programs)
    assert text.splitlines() == [
        "step  stage 0  stage 1",
        "0     RB0      RF0",
        "1     F0       F0",
        "2     SF0      B0",
        "3     B0       SB0",
    ]


# --------------------------------------------------------------------------------------------
# Validator rejections: the message names the rule, the grid marks the failing step.


def test_rejects_backward_before_forward() -> None:
    base = generate("1f1b", 2, 3)
    broken = with_programs(base, s1="RF0 B0 F0 RF1 SB0 F1 RF2 B1 SB1 F2 B2 SB2")
    with pytest.raises(ScheduleError, match="a backward before its forward") as info:
        validate(broken)
    assert str(info.value).startswith("stage 1, step 1 (B0): a backward before its forward\n")
    assert_marked(info.value, broken, stage=1, step=1)


def test_rejects_unmatched_send_and_receive() -> None:
    broken = without(generate("1f1b", 2, 3), 1, "RF2")
    with pytest.raises(ScheduleError, match="unmatched") as info:
        validate(broken)
    err = info.value
    # Stage 0 is checked first: its SF2 has no RF2 on stage 1.
    assert err.message == "stage 0, step 8 (SF2): unmatched - 1 on this stage but 0 RF2 on stage 1"
    assert_marked(err, broken, stage=0, step=8)


def test_rejects_receive_without_send() -> None:
    broken = without(generate("1f1b", 2, 3), 0, "SF1")
    with pytest.raises(ScheduleError, match="unmatched") as info:
        validate(broken)
    assert "RF1" in info.value.message and "SF1 on stage 0" in info.value.message
    step = generate("1f1b", 2, 3).programs[1].index(Action(Kind.RECV_F, 1))
    assert_marked(info.value, broken, stage=1, step=step)


def test_rejects_evict_without_stash() -> None:
    broken = without(generate("bpipe", 4, 8), 3, "ST4")
    with pytest.raises(ScheduleError, match="unmatched") as info:
        validate(broken)
    assert info.value.message == "stage 0, step 14 (EV4): unmatched - 1 on this stage but 0 ST4 on stage 3"
    assert_marked(info.value, broken, stage=0, step=14)


def test_rejects_load_without_return() -> None:
    broken = without(generate("bpipe", 4, 8), 3, "RS2")
    with pytest.raises(ScheduleError, match="unmatched") as info:
        validate(broken)
    assert info.value.message == "stage 0, step 17 (LD2): unmatched - 1 on this stage but 0 RS2 on stage 3"
    assert_marked(info.value, broken, stage=0, step=17)


def test_rejects_backward_while_evicted() -> None:
    schedule = generate("bpipe", 4, 8)
    broken = without(without(schedule, 0, "LD2"), 3, "RS2")
    with pytest.raises(ScheduleError, match=r"while its activations are evicted \(no LD2\)") as info:
        validate(broken)
    step = broken.programs[0].index(Action(Kind.B, 2))
    assert_marked(info.value, broken, stage=0, step=step)


def test_rejects_eviction_without_partner() -> None:
    base = generate("1f1b", 1, 2)
    broken = with_programs(base, s0="F0 EV0 F1 LD0 B0 B1")
    with pytest.raises(ScheduleError, match="no BPipe partner") as info:
        validate(broken)
    assert_marked(info.value, broken, stage=0, step=1)


def test_rejects_rank_above_cap() -> None:
    broken = dataclasses.replace(generate("1f1b", 4, 8), cap=2)
    with pytest.raises(ScheduleError, match="above the cap of 2") as info:
        validate(broken)
    assert info.value.message == "stage 0, step 4 (F2): holds 3 micro-batches, above the cap of 2"
    assert_marked(info.value, broken, stage=0, step=4)


def test_rejects_deadlock() -> None:
    # Stage 0 runs F0 B0 F1 B1 (1F1B with no warm-up), stage 1 runs F0 F1 B0 B1 (GPipe).
    # Structure is fine, but stage 0's B0 waits for stage 1's SB0, which comes after stage 1's
    # F1, which waits for stage 0's SF1, which comes after B0.
    broken = with_programs(
        generate("1f1b", 2, 2),
        s0="F0 SF0 RB0 RB1 B0 F1 SF1 B1",
        s1="RF0 RF1 F0 F1 B0 SB0 B1 SB1",
    )
    with pytest.raises(ScheduleError, match="deadlock") as info:
        validate(broken)
    assert info.value.message == (
        "deadlock: stage 0 at B0 waits for SB0 on stage 1; stage 1 at F1 waits for SF1 on stage 0"
    )
    assert_marked(info.value, broken, stage=0, step=4)


def test_rejects_stash_deadlock() -> None:
    # Move stage 3's ST2 down to just before RS2. Stage 0 evicted micro-batch 2 before F3 and
    # must see it stashed before F3 can allocate; stage 3 reaches ST2 only after F3 has come
    # down the whole pipeline: a cycle through all four stages.
    schedule = generate("bpipe", 4, 8)
    stage3 = list(schedule.programs[3])
    stage3.remove(Action(Kind.STASH, 2))
    stage3.insert(stage3.index(Action(Kind.RESTORE, 2)), Action(Kind.STASH, 2))
    broken = dataclasses.replace(schedule, programs=(*schedule.programs[:3], tuple(stage3)))
    with pytest.raises(ScheduleError, match="deadlock") as info:
        validate(broken)
    assert info.value.message.startswith("deadlock: stage 0 at F3 waits for ST2 on stage 3; ")
    assert "stage 3 at F3 waits for SF3 on stage 2" in info.value.message
    assert_marked(info.value, broken, stage=0, step=8)


@pytest.mark.parametrize(
    ("stage1", "rule"),
    [
        ("RF0 F0 RF1 F0 B0 SB0 F1 RF2 B1 SB1 F2 B2 SB2", "F0 appears twice"),
        ("RF0 F0 RF1 B0 SB0 F1 RF2 B1 SB1 F2 SB2", "sends a gradient before computing it"),
        ("RF0 F0 RF1 B0 SB0 F1 RF2 B1 SB1 F2 B2 SB2 F5", "out of range 0..2"),
        ("F0 RF0 RF1 B0 SB0 F1 RF2 B1 SB1 F2 B2 SB2", "forward without a posted receive RF0"),
    ],
)
def test_rejects_structure(stage1: str, rule: str) -> None:
    broken = with_programs(generate("1f1b", 2, 3), s1=stage1)
    with pytest.raises(ScheduleError, match=rule) as info:
        validate(broken)
    error_line(info.value)
    assert info.value.stage == 1


def test_rejects_missing_backward() -> None:
    # Drop B2 and SB2 from the last stage and RB2/B2 from the first: counts say 0, not 1.
    base = generate("1f1b", 2, 3)
    broken = with_programs(
        base, s0="F0 SF0 RB0 F1 SF1 B0 RB1 F2 SF2 B1", s1="RF0 F0 RF1 B0 SB0 F1 RF2 B1 SB1 F2"
    )
    with pytest.raises(ScheduleError, match="B2 must appear exactly once, found 0") as info:
        validate(broken)
    error_line(info.value)


def test_error_grid_is_windowed_around_the_mark() -> None:
    capped = dataclasses.replace(generate("gpipe", 2, 16), cap=12)
    with pytest.raises(ScheduleError) as info:
        validate(capped)
    steps = [ln.split()[0] for ln in info.value.grid.splitlines()[1:]]
    mark = info.value.step
    assert steps == [str(i) for i in range(max(0, mark - 8), mark + 9)]


# --------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize(("name", "p", "m"), SWEEP)
def test_text_and_csv_round_trip(name: str, p: int, m: int) -> None:
    schedule = generate(name, p, m)
    assert from_text(to_text(schedule)) == schedule
    assert programs_from_csv(to_csv(schedule)) == [list(prog) for prog in schedule.programs]


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("mb", [0, 7, 123])
def test_action_token_round_trip(kind: Kind, mb: int) -> None:
    action = Action(kind, mb)
    assert str(action) == f"{kind.value}{mb}"
    assert Action.parse(str(action)) == action


@pytest.mark.parametrize(
    "token",
    ["", "F", "3", "3F", "X3", "F-1", "f3", "F3 B3", "F 3", "SF", "EV3x", "F1.", "F1.x", "F.1", "RX2", "FF3"],
)
def test_action_parse_rejects_bad_tokens(token: str) -> None:
    with pytest.raises(ValueError, match="not an action token"):
        Action.parse(token)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "header"),
        ("stage 0: F0 B0\n", "header"),
        ("schedule gpipe stages=2 microbatches=1 cap=- partner=-,-\nstage 0: F0 SF0 RB0 B0\n", "2 stages"),
        ("schedule gpipe stages=1 microbatches=1 cap=- partner=-\nstage 1: F0 B0\n", "expected 'stage 0"),
        ("schedule gpipe stages=1 microbatches=1 cap=- partner=-\nstage 0: F0 Q0\n", "not an action"),
    ],
)
def test_from_text_rejects_bad_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_text(text)


# --------------------------------------------------------------------------------------------
# Unit-time timeline: the pipeline bubble.


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
@pytest.mark.parametrize("p", range(1, 9))
def test_unit_timeline_makespan(name: str, p: int) -> None:
    for m in microbatch_counts(name, p):
        compute = [[a for a in prog if a.kind.is_compute] for prog in generate(name, p, m).programs]
        ends = unit_timeline(compute, fwd=1.0, bwd=2.0)
        # m micro-batches of 3 units each, plus (p-1) x (1 + 2) of fill and drain.
        assert max(row[-1] for row in ends) == (m + p - 1) * 3, (name, p, m)
        # Stage 0 finishes last (its last backward waits for every later stage's).
        assert ends[0][-1] == (m + p - 1) * 3


def test_unit_timeline_detects_impossible_orders() -> None:
    assert one_f_one_b_order(2, 2, 0) == list(prog("F0 F1 B0 B1"))
    assert gpipe_order(2, 2, 1) == list(prog("F0 F1 B0 B1"))
    # Stage 0's B0 needs stage 1's B0, which needs stage 0's F0, which comes after B0.
    orders = [list(prog("B0 F0 F1 B1")), gpipe_order(2, 2, 1)]
    with pytest.raises(ValueError, match="deadlock"):
        unit_timeline(orders)


# --------------------------------------------------------------------------------------------
# The core stays torch-free.


def test_core_does_not_import_torch() -> None:
    code = (
        "import sys, autotune.schedules, autotune.config, autotune.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_schedule_registry_is_what_every_rule_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row per schedule (autotune.schedules.registry): the knob's choices, the configuration's
    micro-batch and cap rules, BPipe's baselines and the placement's folding all come from it."""
    import dataclasses

    from autotune import knobs
    from autotune.config import BASELINES, TrialConfig, load_model
    from autotune.errors import ConfigError
    from autotune.placement import layout_of
    from autotune.schedules import registry
    from autotune.schedules.generators import default_cap

    assert knobs.KNOB["schedule"].choices == registry.SCHEDULES == tuple(registry.SCHEDULE)
    assert (
        BASELINES
        == tuple(n for n, s in registry.SCHEDULE.items() if s.baseline)
        == ("1f1b", "gpipe", "interleaved", "zb-h1")
    )
    model = load_model("tiny-gpt", num_layers=8)
    for name, spec in registry.SCHEDULE.items():
        pp, v = 4, 2 if spec.virtual else 1
        least = spec.min_microbatches(pp)
        cfg = TrialConfig(model=model, pp=pp, num_microbatches=least, schedule=name, virtual_stages=v)
        assert cfg.bpipe_cap == spec.default_cap(pp) == (default_cap(pp) if spec.capped else 0)
        assert layout_of(cfg).folded is spec.folded
        validate(generate(name, pp, least, cap=cfg.bpipe_cap or None, virtual_stages=v))
        if least > 1:
            with pytest.raises(ConfigError) as err:
                TrialConfig(model=model, pp=pp, num_microbatches=least - 1, schedule=name, virtual_stages=v)
            assert err.value.field == "--num-microbatches" and name in err.value.rule
        with pytest.raises(ConfigError) as err:  # chunks per rank: only where the row takes them
            TrialConfig(model=model, pp=pp, num_microbatches=least, schedule=name, virtual_stages=3 - v)
        assert err.value.field == "--virtual-stages"
    # the placement asks the row, not the name
    folded_gpipe = dataclasses.replace(registry.SCHEDULE["gpipe"], folded=True)
    monkeypatch.setitem(registry.SCHEDULE, "gpipe", folded_gpipe)
    assert layout_of(TrialConfig(model=model, pp=4, schedule="gpipe")).folded
