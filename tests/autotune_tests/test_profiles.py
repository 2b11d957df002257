"""The profile file format (torch-free): lookup, interpolation, save/load, and every refusal."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from autotune.config import load_model
from autotune.errors import ConfigError
from autotune.estimate.profiles import Profile, ProfileEntry, load_profile, parse_profile, save_profile


def _entry(part: str, b: int, *, threads: int = 1, flash: bool = True, recompute: str = "none") -> dict:
    scale = {"layer": 1.0, "embed": 0.1, "head": 0.5}[part] * (2.0 if threads == 1 else 1.0)
    return {
        "part": part,
        "micro_batch_size": b,
        "flash_attention": flash,
        "recompute": recompute,
        "threads": threads,
        "fwd_s": scale * (1e-3 + 1e-3 * b),  # 1 ms overhead + 1 ms per sequence
        "bwd_s": scale * (2e-3 + 2e-3 * b),
        "activation_bytes": 1000 * b + (4 if part == "head" else 0),  # affine, as the head's is
    }


def make_profile(**changes: object) -> dict:
    entries = [
        _entry(part, b, threads=t, flash=flash)
        for part in ("layer", "embed", "head")
        for b in (1, 2, 4)
        for t in (1, 2)
        for flash in (True, False)
    ]
    data = {
        "format": "autotune-profile",
        "version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "device": {"type": "cpu", "name": "Test CPU", "count": 2},
        "dtype": "float32",
        "torch": "2.5.0",
        "model": load_model("tiny-gpt").to_dict(),
        "tp": 1,
        "comm": {"p2p_bandwidth": 2e9, "p2p_latency": 5e-5},
        "entries": entries,
    }
    data.update(changes)
    return data


@pytest.fixture()
def profile() -> Profile:
    return parse_profile(make_profile())


def test_exact_lookup(profile) -> None:
    e = profile.lookup("layer", 2, True, "none", threads=2)
    assert e == ProfileEntry("layer", 2, True, "none", 2, 3e-3, 6e-3, 2000)
    assert not e.interpolated
    assert profile.micro_batch_sizes == [1, 2, 4] and profile.thread_counts == [1, 2]


def test_thread_choice(profile) -> None:
    assert profile.lookup("layer", 1, True, "none", threads=1).threads == 1
    assert profile.lookup("layer", 1, True, "none", threads=3).threads == 2  # at or below
    assert profile.lookup("layer", 1, True, "none", threads=16).threads == 2
    assert profile.lookup("layer", 1, True, "none").threads == 2  # None: the most profiled
    one_thread = parse_profile(make_profile(entries=[_entry("layer", 1, threads=4)]))
    assert one_thread.lookup("layer", 1, True, "none", threads=1).threads == 4  # else the smallest


@pytest.mark.parametrize("b", [3, 5, 8])
def test_interpolation_and_extrapolation_are_linear(profile, b) -> None:
    e = profile.lookup("layer", b, False, "none", threads=2)
    assert e.interpolated and e.micro_batch_size == b and e.threads == 2
    assert e.fwd_s == pytest.approx(1e-3 + 1e-3 * b)
    assert e.bwd_s == pytest.approx(2e-3 + 2e-3 * b)
    assert e.activation_bytes == 1000 * b
    assert profile.lookup("head", b, False, "none").activation_bytes == 1000 * b + 4  # exact for affine bytes


def test_extrapolation_below_and_a_single_size() -> None:
    p = parse_profile(make_profile(entries=[_entry("layer", b) for b in (2, 4)]))
    e = p.lookup("layer", 1, True, "none")
    assert e.interpolated and e.fwd_s == pytest.approx(2 * (1e-3 + 1e-3)) and e.activation_bytes == 1000
    single = parse_profile(make_profile(entries=[_entry("layer", 2)]))
    e = single.lookup("layer", 6, True, "none")
    assert e.interpolated and e.fwd_s == pytest.approx(3 * 2 * 3e-3) and e.activation_bytes == 6000
    # Noisy measurements never extrapolate to a time below the proportional share of the nearest.
    noisy = make_profile(entries=[_entry("layer", 2), _entry("layer", 4)])
    noisy["entries"][1]["fwd_s"] = 1.0
    e = parse_profile(noisy).lookup("layer", 1, True, "none")
    assert e.fwd_s == pytest.approx(noisy["entries"][0]["fwd_s"] / 2)


def test_interpolation_uses_the_neighbours_on_either_side() -> None:
    entries = [_entry("layer", b) for b in (1, 2, 5)]
    entries[0]["fwd_s"] = 100.0  # far off the line through 2 and 5: must not be used for b = 3
    e = parse_profile(make_profile(entries=entries)).lookup("layer", 3, True, "none")
    assert e.fwd_s == pytest.approx(2 * (1e-3 + 3e-3))
    entries = [_entry("layer", b) for b in (1, 2)]
    entries[1]["fwd_s"] = entries[0]["fwd_s"] / 2  # noisy slope going up: never below the largest
    e = parse_profile(make_profile(entries=entries)).lookup("layer", 4, True, "none")
    assert e.fwd_s == pytest.approx(entries[1]["fwd_s"])


def test_missing_combination_is_a_config_error(profile) -> None:
    with pytest.raises(ConfigError, match="no 'layer' measurement with flash attention and recompute 'full'"):
        profile.lookup("layer", 1, True, "full")


def test_stage_activation_bytes(profile) -> None:
    kw = {"micro_batch_size": 2, "flash_attention": True, "recompute": "none"}
    assert profile.stage_activation_bytes(layers=3, first=True, last=False, **kw) == 2000 + 3 * 2000
    assert profile.stage_activation_bytes(layers=3, first=False, last=True, **kw) == 3 * 2000 + 2004
    assert profile.stage_activation_bytes(layers=1, first=True, last=True, **kw) == 2000 + 2000 + 2004


def test_round_trip(tmp_path) -> None:
    data = make_profile()
    path = save_profile(data, tmp_path / "p.json")
    assert json.loads(path.read_text()) == data
    loaded = load_profile(path, model=load_model("tiny-gpt"), device="cpu")
    assert loaded.to_dict() == data
    assert loaded.comm is not None and loaded.comm.transfer_s(2 * 10**9) == pytest.approx(1 + 5e-5)
    save_profile(loaded, tmp_path / "again.json")  # a Profile saves too
    assert load_profile(tmp_path / "again.json") == loaded
    assert sorted(os.listdir(tmp_path)) == ["again.json", "p.json"]
    assert loaded.comm.p2p_post is None  # an older file without it
    posted = make_profile(comm={"p2p_bandwidth": 2e9, "p2p_latency": 5e-5, "p2p_post": 8e-5})
    again = parse_profile(posted)
    assert again.comm is not None and again.comm.p2p_post == 8e-5 and again.to_dict() == posted


def test_save_refuses_a_bad_profile_and_keeps_the_old_file(tmp_path) -> None:
    path = save_profile(make_profile(), tmp_path / "p.json")
    before = path.read_text()
    with pytest.raises(ConfigError, match="'fwd_s' must be int or float"):
        bad = make_profile()
        bad["entries"][0]["fwd_s"] = "fast"
        save_profile(bad, path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["p.json"]


def _write(tmp_path, data: object) -> str:
    path = tmp_path / "p.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _without(key: str) -> dict:
    data = make_profile()
    del data[key]
    return data


def _entry_changed(**changes: object) -> dict:
    data = make_profile()
    data["entries"][3].update(changes)
    return data


def _entry_without(key: str) -> dict:
    data = make_profile()
    del data["entries"][0][key]
    return data


def _model_changed(**changes: object) -> dict:
    data = make_profile()
    data["model"].update(changes)
    return data


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (make_profile(format="something-else"), "'format' must be 'autotune-profile'"),
        (make_profile(version=2), "format version 2; this autotune reads version 1"),
        (_without("entries"), "profile lacks the field 'entries'"),
        (_without("model"), "profile lacks the field 'model'"),
        (_without("device"), "profile lacks the field 'device'"),
        (make_profile(device={"type": "tpu", "name": "x", "count": 1}), "'type' must be one of cpu, cuda"),
        (make_profile(device={"type": "cpu", "count": 1}), "profile device lacks the field 'name'"),
        (make_profile(tp="1"), "field 'tp' must be int, got str"),
        (make_profile(tp=True), "field 'tp' must be int, got bool"),
        (make_profile(comm={"p2p_bandwidth": -1.0, "p2p_latency": 0.0}), "'p2p_bandwidth' must be positive"),
        (make_profile(comm={"p2p_latency": 0.0}), "profile comm lacks the field 'p2p_bandwidth'"),
        (
            make_profile(comm={"p2p_bandwidth": 1e9, "p2p_latency": 0.0, "p2p_post": -1e-6}),
            "'p2p_post' must be non-negative",
        ),
        (make_profile(entries=[]), "has no entries"),
        (make_profile(entries={}), "field 'entries' must be list"),
        (make_profile(entries=[7]), "entry 0 must be a JSON object"),
        (_entry_without("activation_bytes"), "entry 0 lacks the field 'activation_bytes'"),
        (_entry_changed(part="attention"), "entry 3 field 'part' must be one of layer, embed, head"),
        (_entry_changed(recompute="some"), "entry 3 field 'recompute' must be one of none, selective, full"),
        (_entry_changed(micro_batch_size=0), "entry 3 field 'micro_batch_size' must be positive"),
        (_entry_changed(micro_batch_size=1.5), "entry 3 field 'micro_batch_size' must be int, got float"),
        (_entry_changed(threads=True), "entry 3 field 'threads' must be int, got bool"),
        (_entry_changed(fwd_s=-1.0), "entry 3 field 'fwd_s' must be non-negative"),
        (_entry_changed(fwd_s=None), "entry 3 field 'fwd_s' must be int or float, got NoneType"),
        (_entry_changed(activation_bytes=1.5), "entry 3 field 'activation_bytes' must be int"),
        (_entry_changed(flash_attention=1), "entry 3 field 'flash_attention' must be bool, got int"),
        (_entry_changed(micro_batch_size=2), "entry 7 repeats entry 3: part 'layer', micro-batch size 2"),
        (make_profile(optimizer={}), "profile field 'optimizer' must be a list, got dict"),
        (
            make_profile(optimizer=[{"threads": 1, "fixed_s": 0.0}]),
            "optimizer entry 0 lacks the field 'per_param_s'",
        ),
        (
            make_profile(optimizer=[{"threads": 1, "fixed_s": -1.0, "per_param_s": 1e-9}]),
            "optimizer entry 0 field 'fixed_s' must be non-negative",
        ),
        (
            make_profile(optimizer=[{"threads": 1, "fixed_s": 0.0, "per_param_s": 1e-9}] * 2),
            "optimizer entry 1 repeats threads 1",
        ),
        (_model_changed(hidden_size="64"), "profile field 'model' is not a valid model"),
        (_model_changed(depth=3), "profile field 'model' is not a model"),
    ],
)
def test_bad_files(tmp_path, content, reason) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.field == "--profile"
    assert reason in info.value.rule, info.value.rule
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--profile: no such file .*nope.json"):
        load_profile(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="is a directory"):
        load_profile(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"hidden_size": 128}, "profile was measured on hidden_size 64, the model has 128"),
        ({"seq_len": 64}, "profile was measured on seq_len 32, the model has 64"),
        ({"vocab_size": 512}, "profile was measured on vocab_size 256, the model has 512"),
        ({"ffn_hidden_size": 128}, "profile was measured on ffn_hidden_size 256, the model has 128"),
        ({"num_heads": 8}, "profile was measured on num_heads 4, the model has 8"),
    ],
)
def test_another_model(tmp_path, overrides, reason) -> None:
    path = _write(tmp_path, make_profile())
    with pytest.raises(ConfigError) as info:
        load_profile(path, model=load_model("tiny-gpt", **overrides))
    assert info.value.rule == reason


def test_another_family_and_depth(tmp_path) -> None:
    path = _write(tmp_path, make_profile())
    with pytest.raises(ConfigError, match="profile was measured on family gpt, the model has llama"):
        load_profile(path, model=load_model("tiny-llama"))
    assert load_profile(path, model=load_model("tiny-gpt", num_layers=12)).model.num_layers == 4


def test_another_device(tmp_path) -> None:
    path = _write(tmp_path, make_profile())
    with pytest.raises(
        ConfigError, match="profile was measured on device cpu .*Test CPU.*, the configuration runs on cuda"
    ):
        load_profile(path, device="cuda")
    assert load_profile(path, device="cpu").device_type == "cpu"


def test_format_module_does_not_import_torch() -> None:
    code = "import sys, autotune.estimate.profiles; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_make_profile_is_not_shared() -> None:
    a = make_profile()
    b = copy.deepcopy(a)
    a["entries"][0]["fwd_s"] = 9.0
    assert make_profile() == b


def test_optimizer_step_is_optional_and_chosen_by_threads(tmp_path) -> None:
    """Files without optimizer figures still load (None: the cost model keeps its estimate); with
    them, the step is fixed + per-parameter time at the rank's thread count, and it round-trips."""
    assert load_profile(_write(tmp_path, make_profile())).optimizer_step_s(1000) is None
    steps = [
        {"threads": 1, "fixed_s": 1e-3, "per_param_s": 2e-9},
        {"threads": 2, "fixed_s": 5e-4, "per_param_s": 1e-9},
    ]
    profile = load_profile(_write(tmp_path, make_profile(optimizer=steps)))
    assert profile.optimizer_step_s(10**6, threads=1) == pytest.approx(1e-3 + 2e-3)
    assert profile.optimizer_step_s(10**6, threads=2) == pytest.approx(5e-4 + 1e-3)
    assert profile.optimizer_step_s(10**6, threads=8) == pytest.approx(5e-4 + 1e-3)
    assert parse_profile(profile.to_dict()) == profile


def test_cost_model_takes_the_optimizer_step_from_the_profile() -> None:
    """With measured optimizer figures, a stage's tail is fixed + per-parameter time over its own
    parameters (at the thread count its rank gets); without them, the memory-traffic estimate."""
    from autotune.config import TrialConfig
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.costs import stage_costs, stage_params

    steps = [{"threads": t, "fixed_s": 1e-3, "per_param_s": 1e-8} for t in (1, 2)]
    measured = parse_profile(make_profile(optimizer=steps))
    cfg = TrialConfig(model=load_model("tiny-gpt"), pp=2, micro_batch_size=1, num_microbatches=2)
    cluster = load_cluster("cpu-local")
    for s, cost in enumerate(stage_costs(cfg, cluster, profile=measured)):
        params = stage_params(cfg.model, stage=s, num_stages=2, tp=1)
        assert cost.tail == pytest.approx(1e-3 + 1e-8 * params)
    plain = stage_costs(cfg, cluster, profile=parse_profile(make_profile()))
    from autotune.estimate.costs import OPTIMIZER_STEP_BYTES
    from autotune.estimate.kernels import MEMORY_EFFICIENCY

    assert all(c.tail == pytest.approx(stage_params(cfg.model, stage=s, num_stages=2, tp=1)
               * OPTIMIZER_STEP_BYTES["fp32"] / (cluster.hbm_bandwidth * MEMORY_EFFICIENCY))
               for s, c in enumerate(plain))  # fmt: skip
