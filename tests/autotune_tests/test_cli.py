"""The real `autotune` command in subprocesses: exit codes, one-line errors, nothing written.

contracts.md: every command exits 0 on success, 2 on bad input (a message on stderr naming the
offending flag, no traceback), 1 on other failure. The bad-input cases run in parallel in one
fixture. `trial` cases pass `--device cpu`: without it the CLI imports torch (about two seconds)
to pick the default device before it checks any other flag; one case covers that path.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from autotune.schedules import from_text, generate, validate

CLI = [sys.executable, "-m", "autotune.cli"]
TRIAL = ["trial", "--device", "cpu", "--model", "tiny-gpt"]
SCHEDULE = ["schedule"]


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    seconds: float


def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> Run:
    start = time.perf_counter()
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, cwd, time.perf_counter() - start)


# id -> (argv, the flag the one-line error must name)
BAD_INPUT: dict[str, tuple[list[str], str]] = {
    "trial-more-stages-than-layers": ([*TRIAL, "--pp", "5"], "--pp"),
    "trial-default-device-pp": (["trial", "--model", "tiny-gpt", "--pp", "5"], "--pp"),
    "trial-stage-layers-not-adding-up": ([*TRIAL, "--pp", "2", "--stage-layers", "3,3"], "--stage-layers"),
    "trial-fp16-needs-loss-scaling": ([*TRIAL, "--dtype", "fp16"], "--dtype"),
    "trial-unknown-dtype": ([*TRIAL, "--dtype", "fp8"], "--dtype"),
    "trial-tp-not-dividing-heads": ([*TRIAL, "--tp", "3"], "--tp"),
    "trial-1f1b-too-few-microbatches": (
        [*TRIAL, "--schedule", "1f1b", "--pp", "4", "--num-microbatches", "2"],
        "--num-microbatches",
    ),
    "trial-bpipe-too-few-microbatches": (
        [*TRIAL, "--schedule", "bpipe", "--pp", "4", "--num-microbatches", "3"],
        "--num-microbatches",
    ),
    "trial-unknown-schedule": ([*TRIAL, "--schedule", "zigzag"], "--schedule"),
    "trial-unknown-model": (["trial", "--device", "cpu", "--model", "nosuch"], "--model"),
    "trial-negative-micro-batch": ([*TRIAL, "--micro-batch-size", "-1"], "--micro-batch-size"),
    "trial-negative-layers": ([*TRIAL, "--num-layers", "-4"], "--num-layers"),
    "trial-bad-memory-limit": ([*TRIAL, "--memory-limit", "lots"], "--memory-limit"),
    "trial-zero-memory-limit": ([*TRIAL, "--memory-limit", "0"], "--memory-limit"),
    "trial-unknown-flag": ([*TRIAL, "--bogus"], "--bogus"),
    "trial-num-and-global-batch": (
        [*TRIAL, "--num-microbatches", "4", "--global-batch-size", "4"],
        "--global-batch-size",
    ),
    "trial-not-an-int": ([*TRIAL, "--pp", "two"], "--pp"),
    "trial-missing-model": (["trial"], "--model"),
    "trial-zero-steps": ([*TRIAL, "--steps", "0"], "--steps"),
    "trial-unknown-recompute": ([*TRIAL, "--recompute", "maybe"], "--recompute"),
    "trial-unknown-device": ([*TRIAL, "--device", "tpu"], "--device"),
    "schedule-unknown-schedule": ([*SCHEDULE, "--schedule", "zigzag"], "--schedule"),
    "schedule-1f1b-too-few-microbatches": (
        [*SCHEDULE, "--schedule", "1f1b", "--pp", "4", "--num-microbatches", "2"],
        "--num-microbatches",
    ),
    "schedule-zero-stages": ([*SCHEDULE, "--pp", "0"], "--pp"),
    "schedule-unknown-flag": ([*SCHEDULE, "--bogus"], "--bogus"),
    "no-subcommand": ([], "command"),
}

# An impossible --bpipe-cap is bad input for `autotune schedule` too.
BAD_CAP: dict[str, list[str]] = {
    "bpipe-cap-1": [*SCHEDULE, "--schedule", "bpipe", "--pp", "4", "--bpipe-cap", "1"],
    "bpipe-cap-2-pp-4": [*SCHEDULE, "--schedule", "bpipe", "--pp", "4", "--bpipe-cap", "2"],
    "bpipe-cap-negative": [*SCHEDULE, "--schedule", "bpipe", "--pp", "4", "--bpipe-cap", "-1"],
}
CAP_ON_OTHER_SCHEDULE: dict[str, list[str]] = {
    "1f1b-with-cap": [*SCHEDULE, "--schedule", "1f1b", "--pp", "4", "--bpipe-cap", "2"],
    "gpipe-with-cap": [*SCHEDULE, "--schedule", "gpipe", "--pp", "4", "--bpipe-cap", "2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every bad-input case, run at once, each in its own empty working directory."""
    cases = {key: argv for key, (argv, _) in BAD_INPUT.items()}
    cases.update(BAD_CAP)
    cases.update(CAP_ON_OTHER_SCHEDULE)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {
            key: pool.submit(run_cli, argv, tmp_path_factory.mktemp(key)) for key, argv in cases.items()
        }
        return {key: future.result() for key, future in futures.items()}


def assert_bad_input(run: Run, flag: str) -> None:
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("autotune: error: "), lines[0]
    assert flag in lines[0], lines[0]
    assert list(run.cwd.iterdir()) == [], "bad input must not write files"


@pytest.mark.parametrize("key", BAD_INPUT)
def test_bad_input(runs: dict[str, Run], key: str) -> None:
    assert_bad_input(runs[key], BAD_INPUT[key][1])


@pytest.mark.parametrize("key", BAD_CAP)
def test_impossible_bpipe_cap_is_bad_input(runs: dict[str, Run], key: str) -> None:
    assert_bad_input(runs[key], "--bpipe-cap")


@pytest.mark.parametrize("key", CAP_ON_OTHER_SCHEDULE)
def test_bpipe_cap_with_other_schedule_is_no_crash(runs: dict[str, Run], key: str) -> None:
    # Either ignored (as TrialConfig does) or bad input naming the flag; never a traceback.
    run = runs[key]
    assert "Traceback" not in run.stderr
    assert run.returncode in (0, 2), run.returncode
    if run.returncode == 2:
        assert_bad_input(run, "--bpipe-cap")


def test_unknown_model_lists_presets(runs: dict[str, Run]) -> None:
    line = runs["trial-unknown-model"].stderr
    for name in ("tiny-gpt", "tiny-llama", "gpt3-175b", "llama-65b"):
        assert name in line


# --------------------------------------------------------------------------------------------
# `autotune schedule`.


def test_schedule_grid(tmp_path: Path) -> None:
    run = run_cli([*SCHEDULE, "--schedule", "bpipe", "--pp", "4", "--num-microbatches", "8"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    assert lines[0] == "step  stage 0  stage 1  stage 2  stage 3"
    assert lines[1].split() == ["0", "F0", "RF0", "RF0", "RF0"]
    assert lines[-1] == "peak resident micro-batches per stage: 0: 3, 1: 3, 2: 2, 3: 3"
    assert len(lines) == 1 + 48 + 1  # header, the longest program (stage 1), peaks
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "p", "m"), [("bpipe", 4, 8), ("gpipe", 3, 2), ("1f1b", 2, 5)])
def test_schedule_text_round_trips(tmp_path: Path, name: str, p: int, m: int) -> None:
    argv = [*SCHEDULE, "--schedule", name, "--pp", str(p), "--num-microbatches", str(m), "--text"]
    run = run_cli(argv, tmp_path)
    assert run.returncode == 0, run.stderr
    schedule = from_text(run.stdout)
    assert schedule == generate(name, p, m)
    validate(schedule)


def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "autotune"
    if not script.exists():
        pytest.skip("the autotune console script is not installed next to this python")
    proc = subprocess.run(
        [str(script), "schedule", "--schedule", "1f1b", "--pp", "2", "--num-microbatches", "3", "--text"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert from_text(proc.stdout) == generate("1f1b", 2, 3)


# --------------------------------------------------------------------------------------------
# --help is fast: the CLI imports no torch until a subcommand needs it.


@pytest.mark.parametrize("argv", [["--help"], ["trial", "--help"], ["schedule", "--help"]])
def test_help_does_not_import_torch(tmp_path: Path, argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "autotune.cli", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: autotune" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "autotune.config" in imported  # (autotune.cli itself runs as __main__)
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, autotune.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
