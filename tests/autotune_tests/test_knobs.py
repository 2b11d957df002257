"""The knob registry (autotune.knobs): the CLI flags, the search-space schema, the Optuna
distributions, a configuration's identity and the descriptions all come from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autotune import knobs
from autotune.cli import build_parser, config_from_args
from autotune.config import KNOBS, TrialConfig, identity, load_model
from autotune.errors import ConfigError
from autotune.tuner.screen import knob_key
from autotune.tuner.space import space_from_dict
from autotune.tuner.study import open_study
from storage import Store, config_hash

ROOT = Path(__file__).resolve().parents[2]


def test_every_knob_has_its_flag_and_the_flags_build_the_config() -> None:
    parser = build_parser()
    text = parser.format_help() + parser._subparsers._group_actions[0].choices["estimate"].format_help()  # type: ignore[union-attr]
    for knob in knobs.REGISTRY:
        assert knob.flag in text, knob.flag
    args = parser.parse_args(
        ["estimate", "--model", "tiny-gpt", "--tp", "2", "--pp", "2", "--stage-layers", "3,1",
         "--sequence-parallel", "--no-flash-attention", "--recompute", "full", "--dtype", "bf16",
         "--grad-accumulation-fusion"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.tp, cfg.pp, cfg.stage_layers, cfg.sequence_parallel, cfg.flash_attention) == (
        2, 2, (3, 1), True, False,
    )  # fmt: skip
    assert (cfg.recompute, cfg.dtype, cfg.grad_accumulation_fusion) == ("full", "bf16", True)


def test_each_knob_checks_its_values_in_one_place() -> None:
    model = load_model("tiny-gpt")
    for field, value, rule in (
        ("tp", 0, "positive integer"), ("schedule", "zigzag", "one of 1f1b"), ("dtype", "fp8", "one of bf16"),
        ("sequence_parallel", "yes", "true or false"), ("flash_attention", 1, "true or false"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=rule) as err:
            TrialConfig(model=model, **{field: value})  # type: ignore[arg-type]
        assert err.value.field == knobs.KNOB[field].flag
    base = {"model": "tiny-gpt", "global_batch_size": 4}
    with pytest.raises(ConfigError, match="true or false") as err:  # the same rule in a space
        space_from_dict({**base, "knobs": {"sequence_parallel": [False, "on"]}}, "s.yaml")
    assert err.value.field == "knobs.sequence_parallel[1]"
    with pytest.raises(ConfigError, match="unknown key") as err:  # estimate-only: not searched
        space_from_dict({**base, "knobs": {"grad_accumulation_fusion": True}}, "s.yaml")
    assert err.value.field == "knobs.grad_accumulation_fusion"


def test_a_space_searches_a_later_knob_only_where_it_lists_it(tmp_path: Path) -> None:
    base = {"model": "tiny-gpt", "global_batch_size": 4, "knobs": {"tp": [1, 2]}}
    plain = space_from_dict(base, "s.yaml")
    assert tuple(plain.knobs) == knobs.BASE  # as a space written before the later knobs existed
    assert set(plain.source["knobs"]) == set(knobs.BASE)
    both = space_from_dict({**base, "knobs": {**base["knobs"], "sequence_parallel": [False, True]}}, "s.yaml")
    valid, _ = both.configs()
    assert sorted((c.tp, c.sequence_parallel) for c in valid) == [(1, False), (2, False), (2, True)]
    assert both.source["knobs"]["sequence_parallel"] == [False, True]
    # tp 1 with sequence parallelism is the tp-1 configuration itself: normalised, listed once
    # Optuna searches what the space lists, nothing else
    url = f"sqlite:///{tmp_path / 'o.db'}"
    Store(url).close()
    _, dists = open_study(url, "s", plain.knobs, seed=0)
    assert tuple(dists) == knobs.BASE
    _, dists = open_study(url, "s2", both.knobs, seed=0)
    assert set(dists) == set(knobs.BASE) | {"sequence_parallel"}


def test_an_older_configuration_keeps_its_identity_and_key() -> None:
    cfg = TrialConfig(model=load_model("tiny-gpt"), pp=2)
    new = cfg.to_dict()
    old = {k: v for k, v in new.items() if not (k in knobs.KNOB and knobs.KNOB[k].later)}
    assert identity(new) == identity(old) == old
    assert knob_key(old) == knob_key(new) and len(knob_key(new)) == len(KNOBS)
    assert config_hash(old) == config_hash(new)
    for name in ("sequence_parallel", "grad_accumulation_fusion", "dtype"):
        value = "bf16" if name == "dtype" else True
        changed = TrialConfig(model=load_model("tiny-gpt"), tp=2, pp=2, **{name: value}).to_dict()  # type: ignore[arg-type]
        assert config_hash(changed) != config_hash({**changed, name: knobs.KNOB[name].default}), name
        assert knobs.KNOB[name].describe(value) in knobs.describe_later(changed)


def test_a_knob_for_estimates_only_is_refused_by_trials_with_one_line() -> None:
    cli = [sys.executable, "-m", "autotune.cli"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    trial = subprocess.run([*cli, "trial", "--model", "tiny-gpt", "--grad-accumulation-fusion"],
                           capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert trial.returncode == 2 and trial.stdout == ""
    assert trial.stderr.count("\n") == 1 and "--grad-accumulation-fusion" in trial.stderr
    flags = ["--tp", "8", "--pp", "8", "--num-microbatches", "16", "--cluster", "a100-80g-8x8"]
    flags += ["--json", "--grad-accumulation-fusion"]
    est = subprocess.run([*cli, "estimate", "--model", "gpt3-175b", *flags],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["config"]["grad_accumulation_fusion"] is True


def test_a_no_op_knob_in_a_proposal_names_the_configuration_without_it(tmp_path: Path) -> None:
    """A space of `sequence_parallel: true` over tp 1 and 2: at tp 1 the knob is a no-op, so the
    screened configuration has it off; the study (a real Optuna study on SQLite) is seeded with
    a choice it has, and the proposal it gives back names that same configuration."""
    from autotune.config import without_no_ops
    from autotune.tuner.study import proposal

    space = space_from_dict(
        {"model": "tiny-gpt", "global_batch_size": 4, "knobs": {"tp": [1, 2], "sequence_parallel": True}},
        "s.yaml",
    )
    valid, _ = space.configs()
    keys = {knob_key(c.to_dict()) for c in valid}
    assert sorted((c.tp, c.sequence_parallel) for c in valid) == [(1, False), (2, True)]
    url = f"sqlite:///{tmp_path / 'o.db'}"
    Store(url).close()
    study, dists = open_study(url, "s", space.knobs, seed=0)
    for key in sorted(keys):
        params = proposal(key, dists)
        assert params["sequence_parallel"] is True  # the space's only choice
        study.enqueue_trial(params)
        trial = study.ask(dists)
        assert knob_key(without_no_ops(trial.params)) == key
        study.tell(trial, 1.0)
