"""The kernel-level cost model: GEMMs by shape, memory-bound passes, the split head."""

from __future__ import annotations

import pytest

from autotune.config import load_model
from autotune.estimate import kernels
from autotune.estimate.clusters import load_cluster
from autotune.estimate.costs import head_flops, layer_flops


def _device(cluster: str = "a100-80g-8x1") -> kernels.Device:
    c = load_cluster(cluster)
    assert c.peak_flops is not None
    return kernels.Device(c.peak_flops, c.gemm_efficiency, c.hbm_bandwidth, c.dtype_bytes)


def test_thin_gemms_reach_less_of_the_peak() -> None:
    device = _device()

    def rate(m: float, n: float, k: float) -> float:
        g = kernels.Gemm("g", m, n, k)
        return g.flops / kernels.gemm_time(
            g, peak_flops=device.peak_flops, gemm_efficiency=device.gemm_efficiency
        )

    square = rate(8192, 8192, 8192)
    assert square == pytest.approx(device.peak_flops * device.gemm_efficiency, rel=0.05)
    assert rate(8192, 128, 8192) == pytest.approx(square / 2, rel=0.03)  # one tile's (a head's) width
    assert rate(2048, 1024, 8192) < rate(8192, 1024, 8192) < square


@pytest.mark.parametrize("name", ["gpt3-175b", "llama-65b", "tiny-gpt"])
def test_flop_counts_are_the_gemm_lists(name: str) -> None:
    spec = load_model(name)
    for tp in (1, 2, 8):
        if spec.num_heads % tp or spec.num_kv_heads % tp:
            continue
        gemms = kernels.layer_gemms(spec, micro_batch_size=2, tp=tp)
        assert layer_flops(spec, micro_batch_size=2, recompute="none", tp=tp)[0] == sum(
            g.flops for g in gemms
        )
        assert head_flops(spec, micro_batch_size=2, tp=tp)[0] == pytest.approx(
            2 * 2 * spec.seq_len * spec.hidden_size * spec.vocab_size / tp
        )


def test_tensor_parallelism_does_not_split_the_replicated_elementwise_work() -> None:
    """Without sequence parallelism the norms and residual adds run whole on every rank: tp 8
    divides the GEMMs' time by 8 but not the layer's."""
    spec, device = load_model("gpt3-175b"), _device()

    def layer(tp: int, flash: bool = True) -> float:
        f, b = kernels.layer_times(
            spec, micro_batch_size=1, tp=tp, recompute="none", flash_attention=flash, device=device
        )
        return f + b

    gemm_only = sum(
        kernels.gemm_time(g, peak_flops=device.peak_flops, gemm_efficiency=device.gemm_efficiency)
        for g in kernels.layer_gemms(spec, micro_batch_size=1, tp=8)
    )
    assert layer(1) / layer(8) < 8
    assert layer(8) > 3 * gemm_only  # forward + 2 x backward GEMMs, plus the memory-bound passes
    assert layer(8, flash=False) > layer(8)  # explicit attention's softmax and dropout passes


def test_recompute_adds_the_forward() -> None:
    spec, device = load_model("llama-65b"), _device("h100-80g-8x1")
    kw = {"micro_batch_size": 1, "tp": 8, "flash_attention": False, "device": device}
    none = kernels.layer_times(spec, recompute="none", **kw)  # type: ignore[arg-type]
    full = kernels.layer_times(spec, recompute="full", **kw)  # type: ignore[arg-type]
    selective = kernels.layer_times(spec, recompute="selective", **kw)  # type: ignore[arg-type]
    assert full[1] == pytest.approx(none[1] + none[0])
    assert none[1] < selective[1] < full[1]
