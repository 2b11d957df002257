"""Absurd sizes are refused before any work, naming the flag and the bound; real sizes run fast.

Each case here hung or took minutes before the bounds (issue: a billion micro-batches, 100,000
stages, a 50 MB YAML list); now each is one line and exit 2 within seconds. In-process cases
check the rule itself, subprocess cases what a user sees (one stderr line, no traceback).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from autotune.cli import validate
from autotune.config import TrialConfig, load_model
from autotune.errors import ConfigError
from autotune.limits import BOUNDS, MAX_SCHEDULE_CELLS, MAX_SPACE_COMBINATIONS
from autotune.tuner.space import space_from_dict

ROOT = Path(__file__).resolve().parents[2]
EST = ["estimate", "--model", "tiny-gpt"]


def refused(argv: list[str], field: str, match: str) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=match) as err:
        validate(argv)
    assert err.value.field == field
    # before any work; a trial's device check imports torch (to see whether a GPU is there)
    assert time.monotonic() - start < (8.0 if argv[0] == "trial" else 1.0), "checked before any work"


@pytest.mark.parametrize(
    ("argv", "field", "match"),
    [
        ([*EST, "--num-microbatches", "1000000000"], "--num-microbatches", "at most 65,536 micro-batches"),
        ([*EST, "--num-layers", "100000", "--pp", "100000"], "--num-layers", "at most 4,096 layers"),
        ([*EST, "--global-batch-size", "10000000000000"], "--global-batch-size",
         "at most 16,777,216 sequences"),
        ([*EST, "--dp", "100000000"], "--dp", "at most 262,144"),
        ([*EST, "--tp", "4096"], "--tp", "at most 1,024"),
        ([*EST, "--seq-len", "100000000"], "--seq-len", "at most 16,777,216 tokens"),
        ([*EST, "--vocab-size", "10000000000"], "--vocab-size", "at most 4,194,304"),
        ([*EST, "--micro-batch-size", "100000"], "--micro-batch-size", "at most 16,384"),
        ([*EST, "--memory-limit", "1" + "0" * 400], "--memory-limit", "at most .* bytes"),
        ([*EST, "--num-layers", "4096", "--pp", "1024", "--num-microbatches", "1024"],
         "--num-microbatches", "too big to simulate: pp x micro-batches = 1,024 x 1,024"),
        (["trial", "--model", "tiny-gpt", "--num-microbatches", "1000000000"], "--num-microbatches",
         "at most"),
        (["trial", "--model", "tiny-gpt", "--steps", "1000000"], "--steps", "at most 10,000"),
        (["trial", "--model", "tiny-gpt", "--timeout", "1e300"], "--timeout", "at most"),
        (["trial", "--model", "tiny-gpt", "--dp", "4096"], "--dp", "each a process on this machine"),
        (["schedule", "--pp", "64", "--num-microbatches", "100000"], "--num-microbatches", "at most 65,536"),
        (["schedule", "--pp", "100000"], "--pp", "at most 1,024 pipeline stages"),
        (["schedule", "--pp", "1024", "--num-microbatches", "1024"], "--num-microbatches", "too big"),
        (["profile", "--model", "tiny-gpt", "--out", "x.json", "--micro-batch-sizes", "1000000000000"],
         "--micro-batch-sizes", "at most 16,384"),
    ],
)  # fmt: skip
def test_absurd_sizes_are_refused_at_once(argv: list[str], field: str, match: str) -> None:
    refused(argv, field, match)


def test_every_bound_is_enforced_by_the_value_objects() -> None:
    """One table: each model and layout field refuses one past its bound, naming its flag."""
    model = load_model("tiny-gpt")
    for name in ("num_layers", "hidden_size", "num_heads", "seq_len", "vocab_size", "ffn_hidden_size"):
        with pytest.raises(ConfigError, match=f"at most {BOUNDS[name]:,}") as err:
            load_model("tiny-gpt", **{name: BOUNDS[name] + 1})
        assert err.value.field == "--" + name.replace("_", "-")
    for name in ("tp", "pp", "dp", "micro_batch_size", "num_microbatches"):
        with pytest.raises(ConfigError, match=f"at most {BOUNDS[name]:,}") as err:
            TrialConfig(model=model, **{name: BOUNDS[name] + 1})
        assert err.value.field == "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match="at most 262,144 devices"):
        TrialConfig(model=load_model("tiny-gpt", num_heads=512, hidden_size=512), tp=512, dp=1024)


def test_a_real_run_shape_is_accepted() -> None:
    """A 1T-parameter run's shape (pp 64, 1,000 micro-batches) is within every bound."""
    model = load_model("gpt3-175b", num_layers=128)
    cfg = TrialConfig(model=model, tp=8, pp=64, dp=16, num_microbatches=1000, schedule="bpipe")
    assert cfg.world_size == 8192 and cfg.pp * cfg.num_microbatches <= MAX_SCHEDULE_CELLS


def _space(**knobs: object) -> dict[str, object]:
    return {"model": "tiny-gpt", "global_batch_size": 8, "knobs": knobs}


def test_a_space_with_absurd_knobs_is_refused() -> None:
    with pytest.raises(ConfigError, match="at most 1,024 pipeline stages") as err:
        space_from_dict(_space(pp=[1, 100000]), "s.yaml")
    assert err.value.field == "knobs.pp[1]"
    many = list(range(1, 1001))
    with pytest.raises(ConfigError, match=f"above autotune's bound of {MAX_SPACE_COMBINATIONS:,}") as err:
        space_from_dict(_space(tp=many, dp=many[:300]), "s.yaml")
    assert err.value.field == "knobs"
    with pytest.raises(ConfigError, match="at most 366 days"):
        space_from_dict({**_space(), "search": {"timeout": "100000d"}}, "s.yaml")
    with pytest.raises(ConfigError, match="at most 10,000 measured steps"):
        space_from_dict({**_space(), "trial": {"steps": 10**9}}, "s.yaml")


def test_a_space_whose_schedules_are_too_big_in_all_is_refused() -> None:
    """Each configuration within its bound, but their distinct schedules too many to compile."""
    space = space_from_dict(
        {"model": {"preset": "tiny-gpt", "num_layers": 128}, "global_batch_size": 2048,
         "max_world_size": 128,
         "knobs": {"pp": [64, 128], "micro_batch_size": [1, 2, 4, 8, 16, 32, 64, 128],
                   "schedule": ["1f1b", "gpipe", "bpipe"]}},
        "s.yaml",
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(ConfigError, match="distinct schedules of .* cells in all") as err:
        space.configs()
    assert err.value.field == "knobs" and time.monotonic() - start < 2.0


def _cli(args: list[str], tmp_path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autotune.cli", *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=timeout, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip


def assert_one_line(run: subprocess.CompletedProcess[str], field: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autotune: error: {field}:"), run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([*EST, "--num-microbatches", "1000000000"], "--num-microbatches"),
        ([*EST, "--num-layers", "100000", "--pp", "100000"], "--num-layers"),
        (["trial", "--model", "tiny-gpt", "--num-microbatches", "1000000000"], "--num-microbatches"),
        (["schedule", "--pp", "64", "--num-microbatches", "100000"], "--num-microbatches"),
        (["schedule", "--pp", "100000"], "--pp"),
    ],
)
def test_the_cli_refuses_absurd_sizes_in_seconds(args: list[str], field: str, tmp_path: Path) -> None:
    start = time.monotonic()
    run = _cli(args, tmp_path)
    assert_one_line(run, field)
    assert time.monotonic() - start < 20  # interpreter start-up included; it hung before
    assert list(tmp_path.iterdir()) == []


def test_a_50_mb_yaml_list_is_refused_as_model_and_space(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        line = "- 123456789\n"
        f.write(line * (50 * 2**20 // len(line)))
    for args, field in (([*EST[:1], "--model", str(big)], "--model"), (["tune", str(big)], "space")):
        start = time.monotonic()
        run = _cli(args, tmp_path)
        assert_one_line(run, field)
        assert "over the 1.0 MiB bound" in run.stderr
        assert time.monotonic() - start < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yaml"]
