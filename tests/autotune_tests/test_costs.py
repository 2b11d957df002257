"""The cost model: FLOPs, roofline, links from the placement, memory (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from autotune.config import TrialConfig, load_model
from autotune.errors import ConfigError
from autotune.estimate.activations import activation_bytes
from autotune.estimate.clusters import ClusterSpec, load_cluster
from autotune.estimate.costs import (
    allreduce_time,
    default_placement,
    head_flops,
    layer_flops,
    stage_costs,
    stage_params,
)
from autotune.estimate.simulate import simulate
from autotune.schedules import generate


def test_layer_flops_gpt_by_hand() -> None:
    spec = load_model("tiny-gpt")  # h 64, f 256, s 32
    b, s, h, f = 2, 32, 64, 256
    core = 4 * b * s * s * h  # QK^T and AV, full square
    fwd = 2 * b * s * (4 * h * h + 2 * h * f) + core
    assert layer_flops(spec, micro_batch_size=b, recompute="none") == (fwd, 2 * fwd)
    assert layer_flops(spec, micro_batch_size=b, recompute="full") == (fwd, 3 * fwd)
    assert layer_flops(spec, micro_batch_size=b, recompute="selective") == (fwd, 2 * fwd + core)
    assert layer_flops(spec, micro_batch_size=b, recompute="none", tp=2) == (fwd / 2, fwd)
    assert head_flops(spec, micro_batch_size=b) == (2 * b * s * h * 256, 4 * b * s * h * 256)
    assert head_flops(spec, micro_batch_size=b, tp=2) == (
        b * s * h * 256,
        2 * b * s * h * 256,
    )  # split vocabulary


def test_layer_flops_llama_gqa_by_hand() -> None:
    spec = load_model("llama-65b")
    h, f, s, kv = spec.hidden_size, spec.ffn_hidden_size, spec.seq_len, spec.num_kv_heads * spec.head_dim
    fwd = 2 * s * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * s * s * h
    assert layer_flops(spec, micro_batch_size=1, recompute="none", tp=8) == (fwd / 8, fwd / 4)


def test_allreduce_ring() -> None:
    assert allreduce_time(1e9, 1, 1e9, 1e-5) == 0.0
    assert allreduce_time(1e9, 4, 1e9, 1e-5) == pytest.approx(1.5 + 1e-5)


def _cfg(model: str = "gpt3-175b", **kw: object) -> TrialConfig:
    return TrialConfig(model=load_model(model), **kw)  # type: ignore[arg-type]


def test_memory_fields() -> None:
    cluster = load_cluster("a100-80g-8x8")
    cfg = _cfg(tp=8, pp=8, micro_batch_size=1, num_microbatches=16, flash_attention=False)
    out = stage_costs(cfg, cluster)
    assert len(out) == 8
    for s, c in enumerate(out):
        params = stage_params(cfg.model, stage=s, num_stages=8, tp=8)
        assert c.static_bytes == 18 * params  # bf16 mixed precision
        assert c.act_bytes == activation_bytes(
            cfg.model, stage=s, num_stages=8, micro_batch_size=1, flash_attention=False,
            recompute="none", tp=8, dtype_bytes=2,
        )  # fmt: skip
    cpu = stage_costs(_cfg("tiny-gpt", pp=2), load_cluster("cpu-local"))
    assert cpu[0].static_bytes == 16 * stage_params(load_model("tiny-gpt"), stage=0, num_stages=2, tp=1)
    assert cpu[0].act_bytes == 2 * 132_096 + 256  # two layers + tokens, fp32, exact


def test_links_follow_the_placement() -> None:
    """tp 8 fills a node: the tp all-reduce is on NVLink, stage-to-stage sends cross nodes."""
    cluster = load_cluster("a100-80g-8x8")
    cfg = _cfg("llama-65b", tp=8, pp=8, micro_batch_size=1, num_microbatches=16, schedule="bpipe")
    out = stage_costs(cfg, cluster)
    act = 1 * 2048 * 8192 * 2
    ib, nvlink = 25e9 * cluster.inter_efficiency, 300e9 * cluster.intra_efficiency
    assert out[0].send_act == pytest.approx(1e-5 + act / ib)  # inter-node
    assert out[-1].send_act == 0.0
    assert out[0].evict == pytest.approx(1e-5 + out[0].act_bytes / ib)  # pair 0-7 across nodes

    # A placement that puts pipeline stages (not tp ranks) side by side in a node.
    def by_stage(stage: int, dp_rank: int, tp_rank: int) -> int:
        return tp_rank * 8 + stage

    folded = stage_costs(cfg, cluster, placement=by_stage)
    assert folded[0].send_act == pytest.approx(5e-6 + act / nvlink)
    assert folded[0].evict == pytest.approx(5e-6 + folded[0].act_bytes / nvlink)
    assert folded[0].fwd > out[0].fwd  # its tp all-reduces now cross nodes


def test_default_placement_is_tp_then_dp_then_pp() -> None:
    place = default_placement(_cfg("tiny-gpt", tp=2, pp=2, dp=2))
    assert [place(s, d, t) for s in range(2) for d in range(2) for t in range(2)] == list(range(8))


def test_tail_has_the_dp_allreduce_and_the_optimizer() -> None:
    cluster = load_cluster("a100-80g-8x2")
    one = stage_costs(_cfg("tiny-gpt", pp=2, dp=1), cluster)
    inside = stage_costs(_cfg("tiny-gpt", pp=2, dp=4), cluster)  # dp ranks 0-3 of a stage: one node
    spanning = stage_costs(_cfg("tiny-gpt", tp=4, pp=2, dp=2), cluster)  # dp ranks 4 devices apart
    params = stage_params(load_model("tiny-gpt"), stage=0, num_stages=2, tp=1)
    # Megatron's bf16 optimizer step: 42 bytes per parameter at 80 % of the HBM bandwidth
    assert one[0].tail == pytest.approx(params * 42 / (2.0e12 * 0.8))
    nvlink = 300e9 * cluster.intra_efficiency
    assert inside[0].tail == pytest.approx(one[0].tail + allreduce_time(params * 4, 4, nvlink, 5e-6))
    assert spanning[0].tail > one[0].tail


def test_explicit_attention_is_slower_and_larger_micro_batches_are_more_efficient() -> None:
    cluster = load_cluster("a100-80g-8x8")

    def per_sequence(b: int, flash: bool) -> float:
        c = stage_costs(
            _cfg(tp=8, pp=8, micro_batch_size=b, num_microbatches=16, flash_attention=flash), cluster
        )
        return (c[1].fwd + c[1].bwd) / b

    assert per_sequence(1, False) > per_sequence(1, True)
    assert per_sequence(4, True) < per_sequence(2, True) < per_sequence(1, True)


def test_recompute_costs_time() -> None:
    cluster = load_cluster("h100-80g-8x1")
    times = {
        r: stage_costs(_cfg("tiny-llama", pp=2, recompute=r), cluster)[0].bwd
        for r in ("none", "selective", "full")
    }
    assert times["none"] < times["selective"] < times["full"]


@dataclass
class _Entry:
    fwd_s: float
    bwd_s: float
    activation_bytes: int = 0


class _FakeProfile:
    device_type = "cuda"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def lookup(
        self,
        part: str,
        micro_batch_size: int,
        flash_attention: bool,
        recompute: str,
        threads: int | None = None,
    ) -> _Entry:
        self.calls.append((part, micro_batch_size, flash_attention, recompute))
        return {"layer": _Entry(1.0, 2.0), "embed": _Entry(0.1, 0.2), "head": _Entry(0.5, 1.0)}[part]


def test_profile_times_are_sums_of_entries() -> None:
    profile = _FakeProfile()
    cfg = _cfg("tiny-gpt", pp=2, micro_batch_size=3, recompute="full", flash_attention=False)
    out = stage_costs(cfg, load_cluster("cpu-local"), profile=profile)
    assert (out[0].fwd, out[0].bwd) == pytest.approx((2 * 1.0 + 0.1, 2 * 2.0 + 0.2))
    assert (out[1].fwd, out[1].bwd) == pytest.approx((2 * 1.0 + 0.5, 2 * 2.0 + 1.0))
    assert ("layer", 3, False, "full") in profile.calls
    profile.tp = 2  # type: ignore[attr-defined]  # measured at tp 2, used at tp 1: twice the work
    doubled = stage_costs(cfg, load_cluster("cpu-local"), profile=profile)
    assert doubled[0].fwd == pytest.approx(2 * 2 * 1.0 + 0.1)


def test_costs_feed_the_simulator() -> None:
    cfg = _cfg("tiny-gpt", pp=4, num_microbatches=8, schedule="bpipe")
    out = stage_costs(cfg, load_cluster("cpu-local"))
    result = simulate(generate("bpipe", 4, 8), out)
    assert result.step_time > 0
    assert result.peak_activation_bytes[0] == 3 * out[0].act_bytes  # capped at ceil(5/2)


def test_too_few_devices() -> None:
    with pytest.raises(ConfigError) as err:
        stage_costs(_cfg("tiny-gpt", tp=2, pp=4, dp=2), load_cluster("a100-80g-8x1"))
    assert err.value.field == "--cluster"


def test_cpu_local_may_run_more_ranks_than_cores() -> None:
    """A CPU runs 4 stages on 2 cores (as the demo does); every rank pair uses the one link."""
    base = load_cluster("cpu-local", comm={"p2p_bandwidth": 1e9, "p2p_latency": 1e-4})
    two_cores = ClusterSpec(**{**base.to_dict(), "devices_per_node": 2})
    out = stage_costs(_cfg("tiny-gpt", pp=4), two_cores)
    assert out[0].send_act == pytest.approx(1e-4 + 32 * 64 * 4 / 1e9)
    assert out[0].evict == pytest.approx(1e-4 + out[0].act_bytes / 1e9)
    with pytest.raises(ConfigError):  # a GPU cluster does not oversubscribe
        stage_costs(_cfg("tiny-gpt", pp=4, dp=4), load_cluster("a100-80g-8x1"))


def test_balanced_split_gives_1f1b_its_closed_form_bubble() -> None:
    """With the head's stage given fewer layers (the default split), the simulated 1F1B bubble is
    within 20 % of (p-1)/(m+p-1); the even-looking split that leaves the head on a full stage is not.

    Micro-batch 8: each micro-batch also adds its weight gradients into the accumulated ones, a
    cost of the parameters, not of the FLOPs the split balances; this vocabulary's embedding (a
    layer's worth of parameters) makes the first stage's accumulation 1/8 longer: at micro-batch
    1 that is 1 % of the stage's time, which over 256 micro-batches is 40 % more bubble; at 8, 5 %."""
    import dataclasses

    from autotune.config import _head_layers
    from autotune.estimate.estimator import estimate

    base = load_model("gpt3-175b")
    one_layer_vocab = round(1 / _head_layers(dataclasses.replace(base, vocab_size=1))) // 128 * 128
    spec = dataclasses.replace(base, num_layers=63, vocab_size=one_layer_vocab)  # head ~ one layer
    cluster = load_cluster("a100-80g-8x1")  # pp 8 inside one node
    for m in (16, 64, 256):
        closed = 7 / (m + 7)
        balanced = TrialConfig(model=spec, pp=8, micro_batch_size=8, num_microbatches=m, recompute="full")
        assert balanced.split == (8,) * 7 + (7,)
        bubble = estimate(balanced, cluster)["bubble_fraction"]
        assert abs(bubble / closed - 1) <= 0.2, (m, bubble, closed)
        lopsided = dataclasses.replace(balanced, stage_layers=(7,) + (8,) * 7)
        assert estimate(lopsided, cluster)["bubble_fraction"] > bubble


def test_sequence_parallel_splits_the_norms_the_sends_and_their_time() -> None:
    import dataclasses

    cluster = load_cluster("a100-80g-8x8")
    cfg = _cfg("gpt3-175b", tp=8, pp=8, micro_batch_size=1, num_microbatches=16, recompute="selective")
    sp = dataclasses.replace(cfg, sequence_parallel=True)
    plain, split = stage_costs(cfg, cluster), stage_costs(sp, cluster)
    for s in range(8):
        assert split[s].act_bytes == activation_bytes(
            cfg.model, stage=s, num_stages=8, micro_batch_size=1, flash_attention=True,
            recompute="selective", tp=8, dtype_bytes=2, sequence_parallel=True,
        ) < plain[s].act_bytes  # fmt: skip
        assert split[s].fwd < plain[s].fwd  # the replicated norms and residuals now split
    act = 2048 * 12288 * 2
    ib = 25e9 * cluster.inter_efficiency
    assert plain[0].send_act == pytest.approx(1e-5 + act / ib)
    assert split[0].send_act == pytest.approx(1e-5 + act / 8 / ib)  # each rank sends its part
    assert dataclasses.replace(cfg, tp=1, sequence_parallel=True).sequence_parallel is False  # a no-op


def test_dtype_sets_the_bytes_and_the_peak() -> None:
    import dataclasses

    cluster = load_cluster("a100-80g-8x1")  # bf16
    cfg = _cfg("tiny-gpt", pp=2)
    bf16, fp32 = stage_costs(cfg, cluster), stage_costs(dataclasses.replace(cfg, dtype="fp32"), cluster)
    fp16 = stage_costs(dataclasses.replace(cfg, dtype="fp16"), cluster)
    params = stage_params(cfg.model, stage=0, num_stages=2, tp=1)
    assert (bf16[0].static_bytes, fp32[0].static_bytes, fp16[0].static_bytes) == (
        18 * params,
        16 * params,
        18 * params,
    )
    assert fp32[0].act_bytes > bf16[0].act_bytes == fp16[0].act_bytes
    assert fp32[0].fwd > bf16[0].fwd  # TF32: half the 16-bit peak, and twice the bytes


def test_overlapped_gradient_reduction_hides_behind_the_last_backward() -> None:
    import dataclasses

    from autotune.estimate.costs import GRAD_BUCKET_ELEMENTS, GRAD_BYTES, grad_reduce_time

    cluster = load_cluster("a100-80g-8x8")
    cfg = _cfg("gpt3-175b", tp=8, pp=2, dp=4, micro_batch_size=1, num_microbatches=8)
    over = dataclasses.replace(cfg, overlap_grad_reduce=True)
    plain, hidden = stage_costs(cfg, cluster), stage_costs(over, cluster)
    assert hidden[0].tail < plain[0].tail
    params = stage_params(cfg.model, stage=0, num_stages=2, tp=8)
    link = (25e9 * cluster.inter_efficiency, 1e-5)
    whole = allreduce_time(params * 4, 4, *link)
    last = allreduce_time(GRAD_BUCKET_ELEMENTS * GRAD_BYTES["bf16"], 4, *link)
    assert grad_reduce_time(over, cluster, params, dp_link=link, backward=0.0) == pytest.approx(whole)
    assert grad_reduce_time(over, cluster, params, dp_link=link, backward=whole) == pytest.approx(last)
    assert grad_reduce_time(cfg, cluster, params, dp_link=link, backward=whole) == pytest.approx(whole)


def test_sequence_parallel_gathers_the_column_parallel_inputs_again_in_the_backward() -> None:
    """Each column-parallel linear re-gathers its input for its weight gradient (as the trials'
    _GatherLinear and Megatron do): one all-reduce's worth more per layer in the backward; the
    last stage's head gathers its input in the forward."""
    import dataclasses

    from autotune.estimate import costs
    from autotune.estimate.clusters import intra_link

    cluster = load_cluster("a100-80g-8x1")
    cfg = _cfg("gpt3-175b", tp=8, pp=1, micro_batch_size=1, num_microbatches=2, recompute="selective")
    sp = dataclasses.replace(cfg, sequence_parallel=True)
    assert [costs.tp_backward_collectives(c) for c in (cfg, sp)] == [2, 3]
    assert costs.tp_backward_collectives(dataclasses.replace(sp, recompute="full")) == 5
    # the split norms and residuals take less time: compare the collectives' part alone, the
    # difference to the same cluster with a link (nearly) infinitely fast
    calm = dataclasses.replace(cluster, intra_bandwidth=cluster.intra_bandwidth * 1e9)
    nbytes = 2048 * 12288 * 2
    one = allreduce_time(nbytes, 8, *intra_link(cluster)) - allreduce_time(nbytes, 8, *intra_link(calm))
    (plain,), (split,) = stage_costs(cfg, cluster), stage_costs(sp, cluster)
    (plain0,), (split0,) = stage_costs(cfg, calm), stage_costs(sp, calm)
    assert (split.bwd - split0.bwd) - (plain.bwd - plain0.bwd) == pytest.approx(96 * one, rel=1e-6)
    assert (split.fwd - split0.fwd) - (plain.fwd - plain0.fwd) == pytest.approx(one / 2, rel=1e-6)


def test_each_micro_batch_accumulates_its_weight_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a profile, each micro-batch's backward adds its gradients into the accumulated
    ones: GRAD_ACCUMULATION_BYTES per parameter (bf16: into fp32 main gradients, 10) at the
    streaming bandwidth; fp32's first micro-batch is free."""
    import dataclasses

    from autotune.estimate import costs

    cluster = load_cluster("a100-80g-8x1")
    cfg = _cfg("gpt3-175b", tp=8, pp=1, micro_batch_size=1, num_microbatches=4)
    params = stage_params(cfg.model, stage=0, num_stages=1, tp=8)
    with_it = stage_costs(cfg, cluster)[0].bwd
    monkeypatch.setitem(costs.GRAD_ACCUMULATION_BYTES, "bf16", 0)
    assert with_it - stage_costs(cfg, cluster)[0].bwd == pytest.approx(params * 10 / (2.0e12 * 0.8))
    fp32 = dataclasses.replace(cfg, dtype="fp32")
    assert costs.grad_accumulation_time(fp32, cluster, params) == pytest.approx(
        params * 12 * 3 / 4 / (2.0e12 * 0.8)
    )
