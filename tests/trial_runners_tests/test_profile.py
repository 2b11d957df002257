"""`run_profile`: real measurements of the tiny presets, and activation bytes that add up exactly
to what the executor counts on real stages."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from autotune.config import RECOMPUTE, load_model
from autotune.errors import ConfigError
from autotune.estimate.profiles import PARTS, Profile, load_profile, parse_profile, save_profile
from trial_runners.memory import ActivationTracker
from trial_runners.models import StageModule, build_stage
from trial_runners.profile import default_threads, run_profile

MODELS = ("tiny-gpt", "tiny-llama")


@pytest.fixture(scope="module")
def profiles() -> dict[str, dict]:
    """One real profile per tiny preset: mbs 1 and 2, all attention kinds and recompute modes."""
    out = {}
    for name in MODELS:
        lines: list[str] = []
        data = run_profile(
            load_model(name),
            micro_batch_sizes=[2, 1],
            threads=[1],
            warmup=1,
            repeats=3,
            progress=lines.append,
            comm=False,
        )
        assert len(data["entries"]) == 2 * 2 * 3 * 3  # mbs x flash x recompute x parts
        # a line per round (3) and thread count (1), per entry, and the optimizer step
        assert len(lines) == 3 + len(data["entries"]) + 1
        out[name] = data
    return out


def _entry(profile: Profile, part: str, b: int, flash: bool = True, recompute: str = "none"):
    entry = profile.lookup(part, b, flash, recompute)
    assert not entry.interpolated
    return entry


@pytest.mark.parametrize("name", MODELS)
def test_profile_header_and_entries(profiles, name) -> None:
    data = profiles[name]
    profile = parse_profile(data)
    assert (data["format"], data["version"], data["dtype"], data["tp"]) == (
        "autotune-profile",
        1,
        "float32",
        1,
    )
    assert data["device"]["type"] == "cpu" and data["device"]["name"] and data["device"]["count"] >= 1
    assert data["torch"] == torch.__version__
    assert profile.model == load_model(name)
    assert data["comm"] is None
    assert profile.micro_batch_sizes == [1, 2] and profile.thread_counts == [1]
    keys = {(e.part, e.micro_batch_size, e.flash_attention, e.recompute) for e in profile.entries}
    assert keys == set(itertools.product(PARTS, (1, 2), (True, False), RECOMPUTE))
    assert all(e.fwd_s > 0 and e.bwd_s > 0 and e.activation_bytes > 0 for e in profile.entries)
    # the optimizer step, measured at each thread count: more parameters take longer
    assert [e.threads for e in profile.optimizer] == [1]
    assert profile.optimizer_step_s(10**7) > profile.optimizer_step_s(10**3) > 0


@pytest.mark.parametrize("name", MODELS)
def test_backward_costs_more_than_forward(profiles, name) -> None:
    layers = [e for e in parse_profile(profiles[name]).entries if e.part == "layer"]
    # The median ratio over the 12 layer measurements, so a few noisy medians (a busy machine)
    # cannot flip it.
    ratios = sorted(e.bwd_s / e.fwd_s for e in layers)
    assert (ratios[5] + ratios[6]) / 2 > 1.0


@pytest.mark.parametrize("name", MODELS)
def test_activation_bytes_by_micro_batch_attention_and_recompute(profiles, name) -> None:
    profile = parse_profile(profiles[name])
    spec = load_model(name)
    b, s, h, nh = 1, spec.seq_len, spec.hidden_size, spec.num_heads
    for flash, recompute in itertools.product((True, False), RECOMPUTE):
        one = _entry(profile, "layer", 1, flash, recompute).activation_bytes
        assert _entry(profile, "layer", 2, flash, recompute).activation_bytes == 2 * one
        assert _entry(profile, "embed", 2, flash, recompute).activation_bytes == 2 * (
            _entry(profile, "embed", 1, flash, recompute).activation_bytes
        )
        head1 = _entry(profile, "head", 1, flash, recompute).activation_bytes
        assert 2 * head1 - 8 <= _entry(profile, "head", 2, flash, recompute).activation_bytes <= 2 * head1
    # Explicit attention keeps (B, nh, T, T) tensors, unless the attention core is recomputed.
    assert (
        _entry(profile, "layer", 1, False, "selective").activation_bytes
        == _entry(profile, "layer", 1, True, "selective").activation_bytes
    )
    none_off = _entry(profile, "layer", 1, False, "none").activation_bytes
    none_on = _entry(profile, "layer", 1, True, "none").activation_bytes
    # At least the fp32 softmax probabilities, less flash attention's fp32 log-sum-exp.
    assert none_off - none_on >= 4 * b * nh * s * s - 4 * b * nh * s
    for flash in (True, False):
        none = _entry(profile, "layer", 1, flash, "none").activation_bytes
        assert _entry(profile, "layer", 1, flash, "selective").activation_bytes <= none
        full = _entry(profile, "layer", 1, flash, "full").activation_bytes
        assert full < none
        assert full == 4 * b * s * h  # only the block's fp32 input is kept
    assert (
        _entry(profile, "layer", 1, False, "selective").activation_bytes
        < _entry(profile, "layer", 1, False, "none").activation_bytes
    )


def _stage_bytes(module: StageModule, b: int) -> int:
    """One micro-batch's saved bytes on a real stage, counted as worker._probe_microbatch_bytes does."""
    spec = module.spec
    tracker = ActivationTracker.for_module(module)
    tokens = torch.zeros(b, spec.seq_len, dtype=torch.long)
    x = tokens if module.is_first else torch.zeros(b, spec.seq_len, spec.hidden_size, requires_grad=True)
    targets = torch.zeros(b, spec.seq_len, dtype=torch.long)  # its own storage, as in a real step
    with tracker.capture(0):
        out = module(x, targets if module.is_last else None)
    del out
    return tracker.sizes[0]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_parts_add_up_to_real_stages_exactly(profiles, name, pp) -> None:
    """embed + layers x layer + head == the tracker's count on the real stage modules, for every
    attention kind and recompute mode, at profiled sizes and at an interpolated size (3)."""
    profile = parse_profile(profiles[name])
    spec = load_model(name)
    per_stage = spec.num_layers // pp
    for flash, recompute in itertools.product((True, False), RECOMPUTE):
        for stage in range(pp):
            module = build_stage(spec, stage=stage, num_stages=pp, flash_attention=flash, recompute=recompute)
            for b in (1, 2, 3):
                predicted = profile.stage_activation_bytes(
                    layers=per_stage,
                    first=stage == 0,
                    last=stage == pp - 1,
                    micro_batch_size=b,
                    flash_attention=flash,
                    recompute=recompute,
                )
                assert predicted == _stage_bytes(module, b), (name, pp, stage, b, flash, recompute)


def test_save_and_load_round_trip(profiles, tmp_path) -> None:
    data = profiles["tiny-gpt"]
    path = save_profile(data, tmp_path / "sub" / "cpu.json")
    profile = load_profile(path, model=load_model("tiny-gpt"), device="cpu")
    assert profile.to_dict() == data
    assert profile == parse_profile(data)
    assert os.listdir(tmp_path / "sub") == ["cpu.json"]  # no temporary file left behind
    with pytest.raises(ConfigError, match="hidden_size 64, the model has 128"):
        load_profile(path, model=load_model("tiny-gpt", hidden_size=128))
    with pytest.raises(ConfigError, match="family gpt, the model has llama"):
        load_profile(path, model=load_model("tiny-llama"))
    # The depth does not matter: every entry is per layer.
    load_profile(path, model=load_model("tiny-gpt", num_layers=8))
    with pytest.raises(ConfigError, match="measured on device cpu"):
        load_profile(path, device="cuda")


def test_default_threads_are_the_launchers() -> None:
    cores = os.cpu_count() or 1
    assert default_threads() == sorted({max(1, cores // w) for w in range(1, cores + 1)})
    assert default_threads()[-1] == cores and default_threads()[0] == 1


def test_default_threads_and_comm_in_a_small_profile() -> None:
    data = run_profile(
        load_model("tiny-gpt"), micro_batch_sizes=[1], flash=[True], recompute=["none"], warmup=0, repeats=1
    )
    assert sorted({e["threads"] for e in data["entries"]}) == default_threads()
    comm = data["comm"]
    assert comm["p2p_bandwidth"] > 1e6  # loopback moves far more than 1 MB/s
    assert 0 <= comm["p2p_latency"] < 1.0 and 0 < comm["p2p_post"] < 1.0
    assert parse_profile(data).comm.p2p_post == comm["p2p_post"]
    assert parse_profile(data).comm is not None


def test_a_thread_count_is_measured_in_as_many_processes_as_a_trial_has_ranks() -> None:
    """threads t: cores // t fresh processes measure side by side (twins loading the other cores
    as a trial's other ranks do); each returns every measurement's samples, kept by process."""
    import torch

    from trial_runners.profile import _in_processes, _Samples

    spec = load_model("tiny-gpt")
    task = {"threads": 1, "sizes": [1], "flash": [True], "recompute": ["none"], "warmup": 0,
            "repeats": 2, "rounds": 1}  # fmt: skip
    twins = _in_processes(spec, task, 2)
    assert len(twins) == 2
    for samples in twins:
        assert sorted(tuple(k)[0] for k, _, _ in samples["times"]) == ["embed", "head", "layer"]
        assert all(len(fwd) == len(bwd) == 2 for _, fwd, bwd in samples["times"])
        assert {t for t, _, _ in samples["optimizer"]} == {1}
    both = _Samples(spec, torch.device("cpu"), lambda: None, warmup=0)
    for samples in twins:
        both.add(samples)
    assert all(len(by_process) == 2 for by_process in both.times.values())
    assert {e["part"] for e in both.entries()} == {"embed", "head", "layer"}


def test_each_figure_is_the_slowest_process_mean() -> None:
    """A step waits for its slowest rank and pays every operation's time: of processes measured
    side by side, the figure is the largest of their means (not a figure of the pooled samples)."""
    import torch

    from trial_runners.profile import _Samples

    key = ["layer", 1, True, "none", 1]
    fast = {"times": [[key, [1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]], "nbytes": [[key, 64]],
            "optimizer": [[1, 10, [1.0, 1.0, 1.0]], [1, 40, [2.0, 2.0, 2.0]]]}  # fmt: skip
    slow = {"times": [[key, [3.0, 3.0, 3.0], [1.0, 1.0, 7.0]]], "nbytes": [[key, 64]],
            "optimizer": [[1, 10, [1.0, 1.0, 2.5]], [1, 40, [2.0, 2.0, 2.0]]]}  # fmt: skip
    samples = _Samples(load_model("tiny-gpt"), torch.device("cpu"), lambda: None, warmup=0)
    samples.add(fast)
    samples.add(slow)
    (entry,) = samples.entries()
    assert (entry["fwd_s"], entry["bwd_s"], entry["activation_bytes"]) == (3.0, 4.0, 64)  # 3 > 2; 4 > 3
    (opt,) = samples.optimizer()  # the slowest: 1.5 s at 10 parameters, 2.0 s at 40
    assert opt["per_param_s"] == pytest.approx(0.5 / 30)
    assert opt["fixed_s"] == pytest.approx(1.5 - 10 * 0.5 / 30)


def test_a_failing_measurement_process_is_reported_with_its_last_log_line(tmp_path) -> None:
    from trial_runners.launch import run_side_by_side

    with pytest.raises(RuntimeError, match=r"^probe process 0 failed \(exit 1\): usage: python -m"):
        run_side_by_side("trial_runners.profile", [["bogus"]], tmp_path, dict(os.environ), "probe")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"micro_batch_sizes": []}, "--micro-batch-sizes"),
        ({"micro_batch_sizes": [0]}, "--micro-batch-sizes"),
        ({"micro_batch_sizes": [1], "device": "tpu"}, "--device"),
        ({"micro_batch_sizes": [1], "threads": [0]}, "--threads"),
        ({"micro_batch_sizes": [1], "recompute": ["some"]}, "--recompute"),
    ],
)
def test_bad_arguments(kwargs, flag) -> None:
    with pytest.raises(ConfigError) as info:
        run_profile(load_model("tiny-gpt"), **kwargs)
    assert info.value.field == flag


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu() -> None:
    with pytest.raises(ConfigError, match="no GPU"):
        run_profile(load_model("tiny-gpt"), micro_batch_sizes=[1], device="cuda")


def test_the_executor_times_each_action_by_kind_where_asked() -> None:
    """`action_times` (how the profile times posts through the executor's own handlers): one
    duration per action of the program, by kind; the stand-in stage trains like a real one."""
    import torch

    from autotune.schedules import generate
    from autotune.schedules.ir import Kind
    from trial_runners.comm_profile import _POST_SHAPE, _StandIn
    from trial_runners.executor import StageExecutor, StageLinks
    from trial_runners.memory import ActivationTracker

    module = _StandIn(first=True, last=True, layers=2)
    schedule = generate("1f1b", 1, 3)
    times: dict[Kind, list[float]] = {}
    executor = StageExecutor(
        module, schedule.program(0), cap=schedule.cap, stages=(0,), num_model_stages=1,
        links=StageLinks(prev=None, next=None, partner=None), activation_shape=_POST_SHAPE,
        dtype=torch.float32, device=torch.device("cpu"), tracker=ActivationTracker.for_module(module),
        loss_scale=1 / 3, action_times=times,
    )  # fmt: skip
    tokens = torch.ones(_POST_SHAPE[:2], dtype=torch.long)
    loss, _ = executor.run_step(lambda mb: (tokens, tokens))
    assert set(times) == {Kind.F, Kind.B}
    assert len(times[Kind.F]) == len(times[Kind.B]) == 3 and all(t > 0 for t in times[Kind.F])
    assert loss > 0 and module.weight.grad is not None and module.bias.grad is not None


@pytest.mark.parametrize("name", MODELS)
def test_a_tp_shard_profile_in_bf16_times_one_ranks_parts(name) -> None:
    """`--tp 2 --dtype bf16`: one rank's shard of every part (ShardShapes), recorded as the
    profile's tp and dtype; its parts' bytes add up to the formula's per-rank bytes of a tp-2
    bf16 stage, and an estimate at tp 2 takes its times as they are."""
    from autotune.config import TrialConfig
    from autotune.estimate.activations import activation_bytes
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.costs import stage_costs

    spec = load_model(name)
    data = run_profile(
        spec, micro_batch_sizes=[1], threads=[1], flash=[True], recompute=["none", "full"], warmup=0,
        repeats=1, comm=False, tp=2, dtype="bf16",
    )  # fmt: skip
    profile = parse_profile(data)
    assert (profile.tp, profile.dtype) == (2, "bfloat16")
    for recompute in ("none", "full"):
        for stage in range(2):
            predicted = profile.stage_activation_bytes(
                layers=spec.num_layers // 2, first=stage == 0, last=stage == 1, micro_batch_size=1,
                flash_attention=True, recompute=recompute,
            )  # fmt: skip
            formula = activation_bytes(
                spec, stage=stage, num_stages=2, micro_batch_size=1, flash_attention=True,
                recompute=recompute, tp=2, dtype_bytes=2, cpu=True,
            )  # fmt: skip
            assert predicted == formula, (name, recompute, stage)
    cfg = TrialConfig(model=spec, tp=2, pp=2, num_microbatches=2, dtype="bf16")
    layer = profile.lookup("layer", 1, True, "none", threads=1)
    costs = stage_costs(cfg, load_cluster("cpu-local"), profile=profile)
    assert costs[1].fwd >= spec.num_layers // 2 * layer.fwd_s  # the shard's time, not halved again
