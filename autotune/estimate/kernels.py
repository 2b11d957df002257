"""The kernel-level cost model of one tensor-parallel rank's compute (torch-free).

A transformer layer is the list of kernels Megatron-LM runs for it, each timed on its own:

- **GEMMs** from their shape on the rank, `M` rows (tokens), `N` columns, `K` inner, after the
  tensor-parallel split: `2*M*N*K / (peak * efficiency)`, where `efficiency = gemm_efficiency *
  g(M) * g(N) * g(K)` and `g(d) = d / (d + GEMM_HALF_DIM)`. `gemm_efficiency` is the device's
  best measured fraction of its datasheet peak (a cluster field); `g` is what a thin dimension
  costs (tile and wave quantisation, too few blocks to fill the device): a 128-wide dimension
  (one attention head) reaches half of it, a 2,048-wide one 94 %.
- **Memory-bound operations** (norms, activations, biases, dropout, residual adds, softmax,
  RoPE) from the bytes they move: element passes (one read or one write of every element) over a
  tensor of `tokens x width` elements, at `hbm_bandwidth * MEMORY_EFFICIENCY`. Each family's
  operations are `ELEMENTWISE[family]`, with their widths: the hidden size (replicated over the
  tensor-parallel group without sequence parallelism), the local attention width `h/t`, the
  local FFN width `f/t`, or the local attention scores `a/t * s` per token (explicit attention
  only; flash attention keeps no scores).

Backward kernels are the forward's GEMMs twice (input and weight gradients, same shapes) and the
backward passes of the memory-bound table; full recomputation adds the whole forward to the
backward, selective the attention core's forward (its GEMMs and score passes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autotune.config import ModelSpec

# A thin GEMM dimension `d` scales the efficiency by d / (d + GEMM_HALF_DIM). cuBLAS's 16-bit
# tensor-core kernels on A100/H100 work in 128- to 256-wide output tiles with 32- to 64-deep
# k-steps (NVIDIA, "Matrix Multiplication Background User's Guide", tile quantization and
# 2.3 "Typical Tile Dimensions in cuBLAS"): a dimension one 128-wide tile long pads or idles
# half of what a long one keeps busy, and a K of one tile does not amortise the k-loop's
# prologue and epilogue. So half the efficiency at 128: 89 % at 1,024, 97 % at 4,096. (64, the
# first value, was too kind to the thin dimensions of tp-split layers: with it the published
# runs with small per-rank widths came out 9-11 % optimistic, the wide ones 1-5 %; README.)
GEMM_HALF_DIM = 128.0
# Fraction of the HBM bandwidth a streaming elementwise kernel reaches (A100/H100 copy and
# elementwise kernels move ~80 % of the datasheet bandwidth, e.g. ~1.6 of 2.0 TB/s on A100).
MEMORY_EFFICIENCY = 0.8
FP32 = 4

Width = Callable[[ModelSpec, int], float]  # (spec, tp) -> elements per token


def _hidden(spec: ModelSpec, tp: int) -> float:
    return float(spec.hidden_size)


def _attn(spec: ModelSpec, tp: int) -> float:
    return spec.hidden_size / tp


def _kv(spec: ModelSpec, tp: int) -> float:
    return spec.num_kv_heads * spec.head_dim / tp


def _ffn(spec: ModelSpec, tp: int) -> float:
    return spec.ffn_hidden_size / tp


def _scores(spec: ModelSpec, tp: int) -> float:
    return spec.num_heads / tp * spec.seq_len


@dataclass(frozen=True)
class Pass:
    """A memory-bound operation: `fwd` / `bwd` element passes over a `width`-wide tensor."""

    name: str
    width: Width
    fwd: float
    bwd: float
    core: bool = False  # part of the attention core (re-run by selective recomputation)
    explicit_only: bool = False  # only without flash attention


# Element passes per layer, counted from Megatron-LM's kernels (fused LayerNorm, fused
# bias-GeLU, fused bias-dropout-add, fused scale-mask-softmax; GPT with hidden and attention
# dropout 0.1, its default; LLaMA without dropout or biases). A write of a 1-byte dropout mask
# counts as half a pass of a 16-bit tensor.
ELEMENTWISE: dict[str, tuple[Pass, ...]] = {
    "gpt": (
        # two LayerNorms: read x, write y; backward read dy and x, write dx
        Pass("layernorm", _hidden, 2 * 2, 2 * 3),
        # two bias-dropout-adds: read the input and the residual, write the sum and the mask;
        # backward read dy and the mask, write dx, and sum the residual's gradient (read 2, write 1)
        Pass("bias-dropout-add", _hidden, 2 * 3.5, 2 * (2.5 + 3)),
        Pass("bias-gelu", _ffn, 2, 3),  # read, write; backward read dy and x, write dx
        Pass("context-permute", _attn, 2, 2),  # the attention output made contiguous
        # scale-mask-softmax (read, write) and attention dropout (read, write, mask)
        Pass("softmax-dropout", _scores, 2 + 2.5, 3 + 2.5, core=True, explicit_only=True),
    ),
    "llama": (
        Pass("rmsnorm", _hidden, 2 * 2, 2 * 3),
        Pass("residual-add", _hidden, 2 * 3, 2 * 3),
        Pass("swiglu", _ffn, 3, 5),  # read gate and up, write; backward read dy, gate, up, write two
        Pass("rope-q", _attn, 2, 2),
        Pass("rope-k", _kv, 2, 2),
        Pass("context-permute", _attn, 2, 2),
        Pass("softmax", _scores, 2, 3, core=True, explicit_only=True),
    ),
}


@dataclass(frozen=True)
class Gemm:
    """One matrix multiply on a rank: `batch` x (M x K) @ (K x N)."""

    name: str
    m: float
    n: float
    k: float
    batch: float = 1.0
    core: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.n * self.k


def layer_gemms(spec: ModelSpec, *, micro_batch_size: int, tp: int) -> tuple[Gemm, ...]:
    """The forward GEMMs of one layer on one tensor-parallel rank (fused q/k/v, fused gate/up)."""
    b, s, h, f = micro_batch_size, spec.seq_len, spec.hidden_size, spec.ffn_hidden_size
    m, kv, hd = b * s, spec.num_kv_heads * spec.head_dim, spec.head_dim
    heads = b * spec.num_heads / tp
    projections = (Gemm("qkv", m, (h + 2 * kv) / tp, h), Gemm("o", m, h, h / tp))
    if spec.family == "gpt":
        mlp = (Gemm("fc1", m, f / tp, h), Gemm("fc2", m, h, f / tp))
    else:
        mlp = (Gemm("gate-up", m, 2 * f / tp, h), Gemm("down", m, h, f / tp))
    core = (Gemm("qk", s, s, hd, heads, core=True), Gemm("av", s, hd, s, heads, core=True))
    return projections + core + mlp


def head_gemm(spec: ModelSpec, *, micro_batch_size: int, tp: int) -> Gemm:
    """The LM head on one rank: the vocabulary split over tp."""
    return Gemm("head", micro_batch_size * spec.seq_len, spec.vocab_size / tp, spec.hidden_size)


def _thin(d: float) -> float:
    return d / (d + GEMM_HALF_DIM)


def gemm_time(gemm: Gemm, *, peak_flops: float, gemm_efficiency: float) -> float:
    rate = peak_flops * gemm_efficiency * _thin(gemm.m) * _thin(gemm.n) * _thin(gemm.k)
    return gemm.flops / rate


@dataclass(frozen=True)
class Device:
    """What the kernel model reads of a cluster's device."""

    peak_flops: float
    gemm_efficiency: float
    hbm_bandwidth: float
    dtype_bytes: int


def memory_time(nbytes: float, device: Device) -> float:
    """Seconds a streaming memory-bound kernel takes to move `nbytes` (reads plus writes)."""
    return nbytes / (device.hbm_bandwidth * MEMORY_EFFICIENCY)


def _pass_time(passes: float, elements: float, bytes_per_element: float, device: Device) -> float:
    return memory_time(passes * elements * bytes_per_element, device)


def layer_times(
    spec: ModelSpec,
    *,
    micro_batch_size: int,
    tp: int,
    recompute: str,
    flash_attention: bool,
    device: Device,
    sequence_parallel: bool = False,
) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's kernels on one tensor-parallel rank; with
    sequence parallelism the hidden-width operations (norms, residuals) run on t-th of the tokens."""
    tokens = micro_batch_size * spec.seq_len
    fwd = core_fwd = 0.0
    for g in layer_gemms(spec, micro_batch_size=micro_batch_size, tp=tp):
        t = gemm_time(g, peak_flops=device.peak_flops, gemm_efficiency=device.gemm_efficiency)
        fwd += t
        core_fwd += t if g.core else 0.0
    bwd = 2 * fwd
    for p in ELEMENTWISE[spec.family]:
        if p.explicit_only and flash_attention:
            continue
        elements = tokens * p.width(spec, tp)
        if sequence_parallel and p.width is _hidden:
            elements /= tp
        f = _pass_time(p.fwd, elements, device.dtype_bytes, device)
        fwd += f
        bwd += _pass_time(p.bwd, elements, device.dtype_bytes, device)
        core_fwd += f if p.core else 0.0
    if recompute == "full":
        bwd += fwd
    elif recompute == "selective":
        bwd += core_fwd
    return fwd, bwd


# The loss over the local logits, fp32 (Megatron's vocab-parallel cross-entropy): max (read),
# subtract and exp (read, write), sum (read), divide (read, write); backward: the softmax
# copied, the target's entry subtracted, scaled by the gradient (read, write, read, write).
LOSS_FWD_PASSES, LOSS_BWD_PASSES = 6.0, 4.0
# The embedding: the lookup writes the hidden states and reads as many rows; backward reads
# the gradient and scatters it into the table's gradient.
EMBED_FWD_PASSES, EMBED_BWD_PASSES = 2.0, 2.0


def head_times(
    spec: ModelSpec, *, micro_batch_size: int, tp: int, device: Device, sequence_parallel: bool = False
) -> tuple[float, float]:
    """(forward, backward) seconds of the final norm, the split LM head and the loss."""
    tokens = micro_batch_size * spec.seq_len
    g = head_gemm(spec, micro_batch_size=micro_batch_size, tp=tp)
    gemm = gemm_time(g, peak_flops=device.peak_flops, gemm_efficiency=device.gemm_efficiency)
    logits = tokens * spec.vocab_size / tp
    normed = tokens * spec.hidden_size / (tp if sequence_parallel else 1)
    norm = _pass_time(2, normed, device.dtype_bytes, device)
    fwd = gemm + norm + _pass_time(LOSS_FWD_PASSES, logits, FP32, device)
    bwd = 2 * gemm + 1.5 * norm + _pass_time(LOSS_BWD_PASSES, logits, FP32, device)
    return fwd, bwd


def embed_times(spec: ModelSpec, *, micro_batch_size: int, device: Device) -> tuple[float, float]:
    elements = micro_batch_size * spec.seq_len * spec.hidden_size
    return (
        _pass_time(EMBED_FWD_PASSES, elements, device.dtype_bytes, device),
        _pass_time(EMBED_BWD_PASSES, elements, device.dtype_bytes, device),
    )
