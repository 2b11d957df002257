"""Search spaces: loading, every malformed input named by its YAML key, and the enumeration."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from autotune.errors import ConfigError
from autotune.estimate.clusters import load_cluster
from autotune.estimate.estimator import estimate_many
from autotune.knobs import BASE
from autotune.tuner.space import load_space, parse_duration, space_from_dict, space_names

SHIPPED = [
    "bpipe-explicit-cpu", "bpipe-flash-cpu", "demo-cpu", "gpt3-65b-a100", "gpt3-65b-h100", "llama-65b-a100",
    "llama-65b-h100", "paper-gpt3-flash-off", "paper-gpt3-flash-on", "paper-llama-flash-off",
    "paper-llama-flash-on",
]  # fmt: skip

# tiny-gpt: 4 layers, 4 heads, ffn 256. 2 x 3 x 2 x 2 x 2 = 48 combinations.
SMALL: dict[str, Any] = {
    "model": "tiny-gpt",
    "cluster": "cpu-local",
    "global_batch_size": 8,
    "max_world_size": 4,
    "knobs": {
        "tp": [1, 3],
        "pp": [1, 3, 4],
        "dp": [1, 2],
        "micro_batch_size": [1, 4],
        "schedule": ["1f1b", "bpipe"],
    },
}


def space(**changes: Any) -> Any:
    return space_from_dict({**SMALL, **changes}, "small.yaml")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------------------
# The shipped spaces.


def test_space_names() -> None:
    assert space_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_loads_and_yields_valid_configs(name: str) -> None:
    sp = load_space(name)
    valid, rejected = sp.configs()
    assert sp.name == name and valid
    assert all(c.world_size <= sp.max_world_size for c in valid)
    assert all(c.global_batch_size == sp.global_batch_size for c in valid)
    assert len(valid) + len(rejected) == len(list(itertools.product(*sp.knobs.values())))
    assert space_from_dict(json.loads(json.dumps(sp.source)), "again.yaml").configs()[0] == valid


def test_demo_cap_lets_bpipe_fit_where_1f1b_does_not() -> None:
    sp = load_space("demo-cpu")
    assert sp.max_world_size is not None and sp.max_world_size <= 4
    valid, _ = sp.configs()
    predicted = estimate_many(valid, load_cluster(sp.cluster))
    fits = {(c.tp, c.pp, c.dp, c.micro_batch_size, c.schedule, c.recompute, c.flash_attention): p["fits"]
            for c, p in zip(valid, predicted, strict=True)}  # fmt: skip
    bpipe = [k for k, ok in fits.items() if k[4] == "bpipe" and ok and k[5] == "none"]
    assert bpipe
    for k in bpipe:
        assert not fits[(*k[:4], "1f1b", *k[5:])], k
    assert 10 <= sum(fits.values()) <= 35


# --------------------------------------------------------------------------------------------
# Enumeration and rejections.


def test_small_space_count_and_reasons() -> None:
    valid, rejected = space().configs()
    # world size <= 4 leaves (tp, pp, dp) = (1,1,1) (1,1,2) (1,3,1) (1,4,1) (3,1,1), x 4 each;
    # tp 3 is refused; bpipe at pp 1 is 1f1b; pp 3 and 4 at micro-batch 4 have m = 2 < pp;
    # pp 3 splits the 4 layers 2 + 1 + 1.
    assert len(valid) == 8 and len(rejected) == 40
    assert Counter(r.field for r in rejected) == {
        "max_world_size": 28, "--tp": 4, "--schedule": 4, "--num-microbatches": 4,
    }  # fmt: skip
    keys = {(c.tp, c.pp, c.dp, c.micro_batch_size, c.schedule, c.num_microbatches) for c in valid}
    assert keys == {
        (1, 1, 1, 1, "1f1b", 8), (1, 1, 1, 4, "1f1b", 2), (1, 1, 2, 1, "1f1b", 4),
        (1, 1, 2, 4, "1f1b", 1), (1, 4, 1, 1, "1f1b", 8), (1, 4, 1, 1, "bpipe", 8),
        (1, 3, 1, 1, "1f1b", 8), (1, 3, 1, 1, "bpipe", 8),
    }  # fmt: skip
    assert {c.split for c in valid if c.pp == 3} == {(2, 1, 1)}
    reasons = {r.field: r.reason for r in rejected}
    assert "4 % 3 = 1" in reasons["--tp"]
    assert "< --pp" in reasons["--num-microbatches"]
    assert reasons["max_world_size"] == "tp x pp x dp = 3 x 4 x 2 = 24 devices, over max_world_size 4"
    assert all(set(r.knobs) == set(BASE) for r in rejected)  # the knobs the space lists


def test_configs_carry_the_space_settings() -> None:
    sp = space(memory_limit="1.5MB", knobs={"pp": [2], "recompute": "full", "flash_attention": False})
    [cfg], [] = sp.configs()
    assert (cfg.memory_limit, cfg.device, cfg.pp, cfg.num_microbatches) == (1_500_000, "cpu", 2, 8)
    assert (cfg.recompute, cfg.flash_attention) == ("full", False)


def test_global_batch_must_split_into_micro_batches() -> None:
    _, [rejected] = space(knobs={"micro_batch_size": 3}).configs()
    assert rejected.field == "--global-batch-size" and "(3 x 1 = 3), got 8" in rejected.reason


def test_dp_auto_fills_max_world_size() -> None:
    sp = space(knobs={"tp": [1, 2], "pp": [1, 2, 4], "dp": "auto"})
    valid, rejected = sp.configs()
    assert sorted((c.tp, c.pp, c.dp) for c in valid) == [
        (1, 1, 4),
        (1, 2, 2),
        (1, 4, 1),
        (2, 1, 2),
        (2, 2, 1),
    ]
    assert all(c.world_size == 4 for c in valid)
    assert [r.field for r in rejected] == ["knobs.dp"] and "2 x 4 = 8" in rejected[0].reason
    assert sp.source["knobs"]["dp"] == ["auto"]
    assert sp.config_for({"tp": 1, "pp": 2, "dp": "auto"}).dp == 2


def test_max_world_size_defaults_to_the_cluster() -> None:
    data = {k: v for k, v in SMALL.items() if k != "max_world_size"}
    sp = space_from_dict({**data, "cluster": "a100-80g-8x2", "device": "cuda"}, "x.yaml")
    assert sp.max_world_size == 16 and sp.device == "cuda"


def test_config_for() -> None:
    sp = space()
    cfg = sp.config_for({"tp": 1, "pp": 4, "dp": 1, "micro_batch_size": 1, "schedule": "bpipe"})
    assert (cfg.schedule, cfg.bpipe_cap, cfg.num_microbatches) == ("bpipe", 3, 8)
    uneven = sp.config_for({"tp": 1, "pp": 3, "dp": 1, "micro_batch_size": 1, "schedule": "1f1b"})
    assert uneven.split == (2, 1, 1)  # pp need not divide the layers
    with pytest.raises(ConfigError) as err:
        sp.config_for({"tp": 3, "pp": 1, "dp": 1, "micro_batch_size": 1, "schedule": "1f1b"})
    assert err.value.field == "--tp"
    for knobs, field in (
        ({"tp": 1, "pp": 4, "dp": 1, "micro_batch_size": 2, "schedule": "1f1b"}, "knobs.micro_batch_size"),
        ({"tp": 1, "pp": 4, "dp": 1, "schedule": "1f1b"}, "knobs.micro_batch_size"),
        ({"tp": 1, "pp": 4, "dp": 1, "micro_batch_size": 1, "schedule": "1f1b", "zp": 1}, "knobs.zp"),
    ):
        with pytest.raises(ConfigError) as err:
            sp.config_for(knobs)
        assert err.value.field == field


def test_defaults_and_source_round_trip() -> None:
    sp = space_from_dict({"model": "tiny-gpt", "global_batch_size": 4}, "dir/mine.yaml")
    assert sp.name == "mine" and sp.cluster == "cpu-local" and sp.device == "cpu"
    assert sp.knobs == {
        "tp": (1,), "pp": (1,), "dp": (1,), "micro_batch_size": (1,), "schedule": ("1f1b",),
        "recompute": ("none",), "flash_attention": (True,),
    }  # fmt: skip
    assert (sp.objective, sp.memory_limit, sp.steps, sp.trial_timeout, sp.seed_top) == (
        "tokens_per_s", None, 3, 120.0, 3,
    )  # fmt: skip
    assert (sp.trials, sp.patience, sp.timeout, sp.concurrency) == (None, None, None, None)
    again = space_from_dict(json.loads(json.dumps(sp.source)), "other.yaml")
    assert again.source == sp.source and again.model == sp.model


def test_model_overrides_and_full_fields() -> None:
    sp = space(model={"preset": "tiny-gpt", "seq_len": 256, "name": "tiny-gpt-256"})
    assert (sp.model.name, sp.model.seq_len, sp.model.num_layers) == ("tiny-gpt-256", 256, 4)
    full = {"family": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2,
            "seq_len": 16, "vocab_size": 64, "ffn_hidden_size": 64}  # fmt: skip
    assert space(model=full).model.num_kv_heads == 2


def test_search_and_trial_sections() -> None:
    sp = space(
        trial={"steps": 5, "timeout": "2m"},
        search={"trials": 20, "patience": 8, "timeout": "8h", "seed_top": 0, "concurrency": 1},
    )
    assert (sp.steps, sp.trial_timeout, sp.trials, sp.patience) == (5, 120.0, 20, 8)
    assert (sp.timeout, sp.seed_top, sp.concurrency) == (28800.0, 0, 1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90s", 90.0), ("5m", 300.0), ("8h", 28800.0), (" 2 m", 120.0)],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


def test_relative_cluster_file_is_found_beside_the_space(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        yaml.safe_dump({"nodes": 1, "devices_per_node": 4, "device": "a100-80g"})
    )
    path = write(tmp_path, "model: tiny-gpt\ncluster: mine.yaml\nglobal_batch_size: 8\n")
    sp = load_space(path)
    assert sp.max_world_size == 4 and sp.device == "cuda" and Path(sp.cluster).is_file()


# --------------------------------------------------------------------------------------------
# Malformed input: each names its YAML key.

BAD: list[tuple[dict[str, Any], str]] = [
    ({"foo": 1}, "foo"),
    ({"knobs": {"zp": [1]}}, "knobs.zp"),
    ({"trial": {"stepz": 3}}, "trial.stepz"),
    ({"search": {"trial": 3}}, "search.trial"),
    ({"knobs": [1]}, "knobs"),
    ({"knobs": {"tp": "two"}}, "knobs.tp"),
    ({"knobs": {"tp": [1, True]}}, "knobs.tp[1]"),
    ({"knobs": {"pp": [1, 0]}}, "knobs.pp[1]"),
    ({"knobs": {"dp": "all"}}, "knobs.dp"),
    ({"knobs": {"pp": []}}, "knobs.pp"),
    ({"knobs": {"micro_batch_size": [1, 2, 1]}}, "knobs.micro_batch_size[2]"),
    ({"knobs": {"schedule": ["1f1b", "zb-v"]}}, "knobs.schedule[1]"),
    ({"knobs": {"recompute": "some"}}, "knobs.recompute"),
    ({"knobs": {"flash_attention": [True, 1]}}, "knobs.flash_attention[1]"),
    ({"global_batch_size": "8"}, "global_batch_size"),
    ({"global_batch_size": 0}, "global_batch_size"),
    ({"max_world_size": True}, "max_world_size"),
    ({"name": 3}, "name"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda"}, "device"),
    ({"objective": "speed"}, "objective"),
    ({"objective": "mfu"}, "objective"),
    ({"memory_limit": "lots"}, "memory_limit"),
    ({"memory_limit": 1.5}, "memory_limit"),
    ({"memory_limit": "999TiB"}, "memory_limit"),
    ({"trial": {"steps": 0}}, "trial.steps"),
    ({"trial": {"timeout": "5 minutes"}}, "trial.timeout"),
    ({"trial": {"timeout": -1}}, "trial.timeout"),
    ({"search": {"timeout": "8x"}}, "search.timeout"),
    ({"search": {"seed_top": -1}}, "search.seed_top"),
    ({"search": {"trials": 2.5}}, "search.trials"),
    ({"search": 3}, "search"),
    ({"model": "no-such-model"}, "model"),
    ({"model": 3}, "model"),
    ({"model": {"preset": "no-such-model"}}, "model.preset"),
    ({"model": {"preset": "tiny-gpt", "num_layer": 8}}, "model.num_layer"),
    ({"model": {"preset": "tiny-gpt", "num_heads": 5}}, "model.num_heads"),
    ({"model": {"preset": "tiny-gpt", "seq_len": "long"}}, "model.seq_len"),
    ({"model": {"family": "gpt", "num_layers": 2}}, "model.hidden_size"),
    (
        {
            "model": {
                "family": "bert",
                "num_layers": 2,
                "hidden_size": 8,
                "num_heads": 2,
                "seq_len": 4,
                "vocab_size": 8,
                "ffn_hidden_size": 8,
            }
        },
        "model.family",
    ),  # fmt: skip
    ({"cluster": "no-such-cluster"}, "cluster"),
    ({"cluster": "missing.yaml"}, "cluster"),
    ({"cluster": ["cpu-local"]}, "cluster"),
]


@pytest.mark.parametrize(("changes", "field"), BAD, ids=[f for _, f in BAD])
def test_malformed_input_names_its_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        space(**changes)
    assert err.value.field == field
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("missing", ["model", "global_batch_size"])
def test_required_keys(missing: str) -> None:
    with pytest.raises(ConfigError) as err:
        space_from_dict({k: v for k, v in SMALL.items() if k != missing}, "x.yaml")
    assert err.value.field == missing


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- a\n- b\n", "must be a YAML mapping"),
        ("knobs: [1, 2\n", "is not valid YAML"),
        ("model: !!python/object/apply:os.system ['true']\n", "is not valid YAML.*constructor"),
        ("name: a\nmodel: tiny-gpt\nname: b\n", "duplicate key 'name' at line 3 \\(first at line 1\\)"),
        ("knobs:\n  tp: [1]\n  pp: [1]\n  tp: [2]\n", "duplicate key 'tp' at line 4 \\(first at line 2\\)"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_space(path)
    assert err.value.field == path and "\n" not in str(err.value)


def test_unknown_space_name_and_missing_file() -> None:
    for path in ("no-such-space", "nowhere/space.yaml"):
        with pytest.raises(ConfigError) as err:
            load_space(path)
        assert err.value.field == "space"
