"""ModelSpec, TrialConfig, load_model and parse_bytes: every rule names its field."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from autotune.config import ModelSpec, TrialConfig, load_model, parse_bytes, preset_names
from autotune.errors import ConfigError

PRESETS = ["gpt3-175b", "gpt3-65b", "llama-65b", "llama2-70b", "tiny-gpt", "tiny-llama"]

TINY_GPT = dict(
    name="t", family="gpt", num_layers=4, hidden_size=64, num_heads=4, seq_len=32, vocab_size=256,
    ffn_hidden_size=256,
)  # fmt: skip


def model(**overrides: object) -> ModelSpec:
    return ModelSpec(**{**TINY_GPT, **overrides})  # type: ignore[arg-type]


def raises_on(
    field: str, match: str | None = None
) -> AbstractContextManager[pytest.ExceptionInfo[ConfigError]]:
    """pytest.raises for a ConfigError on `field`; the message starts with the field too."""
    return pytest.raises(ConfigError, match=rf"^{field}: " + (f".*{match}" if match else ""))


# --------------------------------------------------------------------------------------------
# Presets and model files.


def test_preset_names() -> None:
    assert preset_names() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name: str) -> None:
    spec = load_model(name)
    assert spec.name == name
    assert spec.family == ("gpt" if name.startswith(("gpt", "tiny-gpt")) else "llama")
    assert spec.num_layers > 0 and spec.hidden_size % spec.num_heads == 0
    assert spec.num_heads % spec.num_kv_heads == 0
    assert spec.num_params() > 0


def test_preset_shapes() -> None:
    gpt3 = load_model("gpt3-175b")
    assert (gpt3.num_layers, gpt3.hidden_size, gpt3.num_heads, gpt3.num_kv_heads) == (96, 12288, 96, 96)
    assert 170e9 < gpt3.num_params() < 180e9
    llama2 = load_model("llama2-70b")
    assert (llama2.num_heads, llama2.num_kv_heads, llama2.head_dim) == (64, 8, 128)
    assert 68e9 < llama2.num_params() < 71e9
    assert load_model("tiny-llama").num_kv_heads == 2


def test_overrides_apply() -> None:
    spec = load_model("tiny-gpt", num_layers=8, hidden_size=128, seq_len=None, vocab_size=512)
    assert (spec.num_layers, spec.hidden_size, spec.seq_len, spec.vocab_size) == (8, 128, 32, 512)
    # Overriding the head count of a multi-head model keeps key/value heads equal to it.
    assert load_model("tiny-gpt", num_heads=8).num_kv_heads == 8
    # A grouped-query model keeps its key/value heads.
    assert load_model("tiny-llama", num_heads=8).num_kv_heads == 2


def test_unknown_override_field() -> None:
    with raises_on("--bogus", "not a model shape field"):
        load_model("tiny-gpt", bogus=3)


def test_unknown_preset_lists_presets() -> None:
    with raises_on("--model", "unknown preset 'nosuch'") as info:
        load_model("nosuch")
    for name in PRESETS:
        assert name in str(info.value)
    assert info.value.field == "--model"


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_model_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "family: llama\nnum_layers: 2\nhidden_size: 32\nnum_heads: 4\nseq_len: 8\n"
        "vocab_size: 64\nffn_hidden_size: 64\n",
    )
    spec = load_model(path)
    assert spec.name == "m" and spec.num_kv_heads == 4
    named = write(tmp_path, Path(path).read_text() + "name: mine\n", "other.yml")
    assert load_model(named, num_layers=6).name == "mine"
    assert load_model(named, num_layers=6).num_layers == 6


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("family: gpt\nnum_layers: 2\nhiden_size: 32\n", "unknown key 'hiden_size'"),
        ("family: [gpt\nnum_layers: 2\n", "is not valid YAML"),
        ("- family\n- gpt\n", "must be a YAML mapping"),
        ("num_layers: 2\n", "must name its family"),
        ("family: gpt\nnum_layers: 2\n", "lacks 'hidden_size'"),
    ],
)
def test_bad_model_file(tmp_path: Path, text: str, match: str) -> None:
    with raises_on("--model", match):
        load_model(write(tmp_path, text))


def test_missing_model_file(tmp_path: Path) -> None:
    with raises_on("--model", "no such file"):
        load_model(str(tmp_path / "absent.yaml"))


# --------------------------------------------------------------------------------------------
# ModelSpec rules.


def test_num_kv_heads_defaults_to_num_heads() -> None:
    assert model().num_kv_heads == 4
    assert model(num_kv_heads=0).num_kv_heads == 4
    assert model(family="llama", num_kv_heads=2).num_kv_heads == 2


@pytest.mark.parametrize(
    ("overrides", "field", "match"),
    [
        ({"num_layers": -4}, "--num-layers", "positive integer, got -4"),
        ({"hidden_size": 0}, "--hidden-size", "positive integer, got 0"),
        ({"num_heads": -1}, "--num-heads", "positive integer"),
        ({"seq_len": 3.5}, "--seq-len", "positive integer, got 3.5"),
        ({"vocab_size": True}, "--vocab-size", "positive integer"),
        ({"ffn_hidden_size": -256}, "--ffn-hidden-size", "positive integer"),
        ({"num_kv_heads": -2}, "--num-kv-heads", "positive integer"),
        ({"family": "bert"}, "family", "must be one of gpt, llama"),
        ({"num_heads": 3}, "--num-heads", r"must divide --hidden-size \(64 % 3 = 1\)"),
        ({"family": "llama", "num_kv_heads": 3}, "--num-kv-heads", r"must divide --num-heads \(4 % 3"),
        ({"num_kv_heads": 2}, "--num-kv-heads", "gpt family uses multi-head attention"),
        ({"family": "llama", "hidden_size": 12, "num_heads": 4}, "--hidden-size", "even head size"),
    ],
)
def test_model_rules(overrides: dict[str, object], field: str, match: str) -> None:
    with raises_on(field, match) as info:
        model(**overrides)
    assert info.value.field == field


def test_gqa_rules_through_load_model() -> None:
    assert load_model("tiny-llama", num_kv_heads=4).num_kv_heads == 4
    assert load_model("tiny-llama", num_kv_heads=1).num_kv_heads == 1
    with raises_on("--num-kv-heads", "must divide --num-heads"):
        load_model("tiny-llama", num_kv_heads=3)
    with raises_on("--num-kv-heads", "gpt family"):
        load_model("tiny-gpt", num_kv_heads=2)


# --------------------------------------------------------------------------------------------
# TrialConfig: normalisation and layout rules.


def trial(**kwargs: object) -> TrialConfig:
    return TrialConfig(model=load_model(str(kwargs.pop("model_name", "tiny-gpt"))), **kwargs)  # type: ignore[arg-type]


def test_defaults_normalise() -> None:
    cfg = trial(pp=2)
    assert (cfg.num_microbatches, cfg.global_batch_size, cfg.bpipe_cap) == (2, 2, 0)
    assert cfg.world_size == 2
    assert cfg.tokens_per_step == 2 * 32


def test_global_batch_gives_num_microbatches() -> None:
    cfg = trial(pp=2, dp=2, micro_batch_size=2, global_batch_size=16)
    assert (cfg.num_microbatches, cfg.global_batch_size) == (4, 16)
    cfg = trial(pp=2, dp=2, micro_batch_size=2, num_microbatches=4)
    assert cfg.global_batch_size == 16
    # Both given and consistent is fine.
    assert trial(dp=2, num_microbatches=3, global_batch_size=6).num_microbatches == 3


def test_global_batch_rules() -> None:
    with raises_on("--global-batch-size", r"must be a multiple of .* \(2 x 2 = 4\), got 6"):
        trial(dp=2, micro_batch_size=2, global_batch_size=6)
    with raises_on("--global-batch-size", r"must equal .* \(1 x 3 x 2 = 6\), got 8"):
        trial(dp=2, num_microbatches=3, global_batch_size=8)


def test_bpipe_cap_normalisation() -> None:
    assert trial(pp=4, schedule="bpipe", num_microbatches=8).bpipe_cap == 3
    assert trial(pp=4, schedule="1f1b").bpipe_cap == 0
    with raises_on("--bpipe-cap", r"at least ceil\(\(pp\+1\)/2\) = 3"):
        trial(pp=4, schedule="bpipe", bpipe_cap=2)


def test_one_bpipe_rule_everywhere() -> None:
    """BPipe where it cannot evict (pp <= 2, or a cap of pp) is 1F1B under another name: every
    front end refuses it the same way, as do a cap for another schedule and a cap of 0 given on
    the command line (the default is the flag left out)."""
    with raises_on("--schedule", r"bpipe at --pp 2 never evicts: .*use 1f1b \(bpipe needs --pp >= 3\)"):
        trial(pp=2, schedule="bpipe")
    with raises_on("--schedule", r"bpipe at --pp 1 never evicts"):
        trial(pp=1, schedule="bpipe")
    with raises_on("--schedule", r"bpipe at --pp 4 never evicts: its cap of 4"):
        trial(pp=4, schedule="bpipe", bpipe_cap=4)
    with raises_on("--bpipe-cap", "only applies to --schedule bpipe, not 1f1b"):
        trial(pp=4, schedule="1f1b", bpipe_cap=3)


def test_bpipe_cap_below_pair_balance_is_rejected() -> None:
    with raises_on("--bpipe-cap"):
        trial(pp=4, schedule="bpipe", num_microbatches=8, bpipe_cap=2)


@pytest.mark.parametrize(
    ("kwargs", "field", "match"),
    [
        ({"pp": 5, "num_microbatches": 5}, "--pp", r"at most --num-layers \(4\) stages, got 5"),
        ({"tp": 3}, "--tp", r"must divide --num-heads: 4 heads cannot be split over 3 ranks"),
        ({"model_name": "tiny-llama", "tp": 4}, "--tp", r"must divide --num-kv-heads: 2 heads"),
        ({"schedule": "1f1b", "pp": 4, "num_microbatches": 2}, "--num-microbatches", r"\(2 < --pp 4\)"),
        ({"schedule": "bpipe", "pp": 4, "num_microbatches": 3}, "--num-microbatches", "bpipe needs"),
        (
            {"schedule": "zigzag"},
            "--schedule",
            "must be one of 1f1b, gpipe, interleaved, zb-h1, bpipe, got 'zigzag'",
        ),
        ({"recompute": "some"}, "--recompute", "must be one of none, selective, full"),
        ({"device": "tpu"}, "--device", "must be one of cpu, cuda"),
        ({"micro_batch_size": -1}, "--micro-batch-size", "positive integer, got -1"),
        ({"dp": 0}, "--dp", "positive integer, got 0"),
        ({"tp": 1.0}, "--tp", "positive integer"),
        ({"num_microbatches": -2}, "--num-microbatches", "got -2"),
        ({"global_batch_size": -8}, "--global-batch-size", "got -8"),
    ],
)
def test_trial_rules(kwargs: dict[str, object], field: str, match: str) -> None:
    with raises_on(field, match) as info:
        trial(**kwargs)
    assert info.value.field == field


def test_ffn_must_split_over_tp() -> None:
    with raises_on("--tp", r"must divide --ffn-hidden-size \(102 % 4 = 2\)"):
        TrialConfig(model=load_model("tiny-gpt", ffn_hidden_size=102), tp=4)


def test_gpipe_allows_fewer_microbatches_than_stages() -> None:
    assert trial(schedule="gpipe", pp=4, num_microbatches=2).num_microbatches == 2


@pytest.mark.parametrize("limit", [-1, 0])
def test_memory_limit_must_be_positive(limit: int) -> None:
    with raises_on("--memory-limit"):
        trial(memory_limit=limit)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "bpipe"])
def test_to_dict_round_trip(schedule: str) -> None:
    pp = 4 if schedule == "bpipe" else 2  # BPipe evicts from pp 3 on
    cfg = trial(model_name="tiny-llama", pp=pp, tp=2, dp=2, schedule=schedule, memory_limit=2**30)
    data = cfg.to_dict()
    assert data["model"] == "tiny-llama" and data["world_size"] == 4 * pp
    assert data["num_microbatches"] == pp and data["global_batch_size"] == 2 * pp
    assert TrialConfig.from_dict(data) == cfg
    assert dataclasses.replace(cfg, extra={"x": 1}) == cfg


# --------------------------------------------------------------------------------------------
# parse_bytes.


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2GiB", 2 * 2**30),
        ("2gib", 2 * 2**30),
        (" 2 GiB ", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("1GB", 10**9),
        ("1G", 10**9),
        ("4Ki", 4096),
        ("10kB", 10_000),
        ("1TiB", 2**40),
        ("500000000", 500_000_000),
        ("7B", 7),
        (123, 123),
    ],
)
def test_parse_bytes(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "", "-1", "2XB", "1e9", "GiB", "2 GiBs", "2 G i B", "0x10"])
def test_parse_bytes_rejects_malformed(text: str) -> None:
    with raises_on("--memory-limit", "expected a size such as 2GiB"):
        parse_bytes(text)


@pytest.mark.parametrize("text", ["0", "0.4", "0GiB", 0, -5])
def test_parse_bytes_rejects_non_positive(text: str | int) -> None:
    with raises_on("--memory-limit", "must be positive"):
        parse_bytes(text)


def test_parse_bytes_names_the_given_field() -> None:
    with raises_on("device_memory", "expected a size"):
        parse_bytes("lots", "device_memory")


def test_stage_splits_default_explicit_and_refused() -> None:
    from autotune.config import split_layers

    bloom = ModelSpec("bloom-176b", "gpt", 70, 14336, 112, 2048, 250880, 57344)
    split = split_layers(bloom, 12)
    assert sum(split) == 70 and len(split) == 12 and max(split) == 6  # ceil(70 / 12)
    # its 250,880-word head weighs ~1.4 layers: the head's stage takes 4 layers (5.4 in all)
    assert split == (6,) * 11 + (4,)
    cfg = TrialConfig(model=bloom, tp=4, pp=12, num_microbatches=12)  # accepted (pp need not divide)
    assert cfg.split == split and cfg.stage_layers == ()
    assert split_layers(load_model("gpt3-175b"), 8) == (12,) * 8  # even where pp divides
    explicit = TrialConfig(model=load_model("tiny-gpt"), pp=2, stage_layers=(1, 3))
    assert explicit.split == (1, 3) and explicit.to_dict()["stage_layers"] == [1, 3]
    assert TrialConfig.from_dict(explicit.to_dict()) == explicit
    same = TrialConfig(model=load_model("tiny-gpt"), pp=2, stage_layers=(2, 2))
    assert same.stage_layers == () and same == TrialConfig(model=load_model("tiny-gpt"), pp=2)
    for bad, rule in (((1, 2), "add up to --num-layers 4"), ((4,), "one layer count per stage"),
                      ((0, 4), "at least one layer")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            TrialConfig(model=load_model("tiny-gpt"), pp=2, stage_layers=bad)
        assert err.value.field == "--stage-layers" and rule in err.value.rule
    with pytest.raises(ConfigError, match="at most --num-layers"):
        TrialConfig(model=load_model("tiny-gpt"), pp=5, num_microbatches=5)


def test_identity_ignores_later_knobs_at_their_defaults() -> None:
    """A configuration recorded before `stage_layers` existed keeps its hash."""
    from storage.records import config_hash

    cfg = TrialConfig(model=load_model("tiny-gpt"), pp=2)
    old = {k: v for k, v in cfg.to_dict().items() if k != "stage_layers"}  # as stored before
    assert config_hash(cfg.to_dict()) == config_hash(old)
    assert TrialConfig.from_dict(old) == cfg
    uneven = TrialConfig(model=load_model("tiny-gpt"), pp=2, stage_layers=(1, 3))
    assert config_hash(uneven.to_dict()) != config_hash(cfg.to_dict())


def test_later_knobs_are_described_only_when_set() -> None:
    from autotune.config import describe_later_knobs

    assert describe_later_knobs(TrialConfig(model=load_model("tiny-gpt"), pp=2).to_dict()) == ""
    cfg = TrialConfig(
        model=load_model("tiny-gpt"), tp=2, pp=2, dp=2, stage_layers=(1, 3), distributed_optimizer=True,
        overlap_grad_reduce=True, sequence_parallel=True, dtype="bf16",
    )  # fmt: skip
    assert describe_later_knobs(cfg.to_dict()) == (
        "layers=1+3 distributed-optimizer overlap-grad-reduce sequence-parallel bf16"
    )
