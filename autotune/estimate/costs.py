"""The cost model: a (TrialConfig, ClusterSpec) becomes per-stage `StageCosts` for `simulate()`.

Compute time comes from a measured profile where one is given (`stage_costs(..., profile=...)`),
else from the kernel-level model of `autotune.estimate.kernels` (each GEMM from its shape on the
rank, each memory-bound operation from the bytes it moves). Transfers cost `latency + bytes /
bandwidth` on the link between the two devices (intra-node NVLink-class or inter-node
InfiniBand-class, from the placement, at the cluster's link efficiency); all-reduces are
rings. Memory: parameters, gradients and optimizer state (`static_bytes`) and the saved
activations of one micro-batch (`act_bytes`, exact for our models:
`autotune.estimate.activations`).

All tunable constants live in the block below, each with its meaning; calibration against
measurements is expected to replace them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any, Protocol

from autotune.config import ModelSpec, TrialConfig
from autotune.errors import ConfigError
from autotune.estimate import kernels
from autotune.estimate.activations import activation_bytes, stage_layer_count
from autotune.estimate.clusters import ClusterSpec, inter_link, intra_link, link_between, node_of
from autotune.estimate.simulate import StageCosts
from autotune.placement import Layout, layout_of

__all__ = [
    "activation_bytes",
    "allreduce_time",
    "default_placement",
    "head_flops",
    "layer_flops",
    "stage_costs",
    "stage_params",
    "static_bytes",
]

# --- constants of the cost model (one place; calibration replaces them) ---------------------
# Peak FLOP/s assumed for a device whose cluster does not say (cpu-local): a nominal fp32
# figure for one core's worth of work; a profile should be used on CPUs instead. The kernels'
# own constants (GEMM shape efficiency, memory-bound passes) are in `autotune.estimate.kernels`.
NOMINAL_PEAK_FLOPS = 5.0e10
# Bytes per parameter of parameters, gradients and AdamW's state (Megatron's accounting):
# fp32 training 4 + 4 + 8 = 16 (what the executor counts on CPU); bf16 mixed precision: bf16
# parameter 2, fp32 gradient 4, fp32 master copy 4, two fp32 moments 8 = 18.
BYTES_PER_PARAM = {"fp32": 16, "bf16": 18, "fp16": 18}
# Bytes per gradient element in the data-parallel all-reduce: Megatron-LM reduces bf16 runs'
# gradients in fp32 (bf16 forces --accumulate-allreduce-grads-in-fp32) and fp16 runs' in fp16
# (its default); fp32 runs in fp32.
GRAD_BYTES = {"fp32": 4, "bf16": 4, "fp16": 2}
FP32_BYTES = 4  # the vocabulary-parallel loss's per-token figures
# The optimizer step is memory-bound: bytes moved per parameter by Megatron-LM's step (its
# mixed-precision optimizer with apex's fused Adam), kernel by kernel. fp16: the fp16 gradients
# copied into the fp32 masters' (read 2, write 4), unscaled and checked for inf/nan (read 4,
# write 4), the gradient norm for clipping (read 4), Adam (read parameter, gradient and two
# moments, write parameter and moments: 28), the masters copied back into the fp16 parameters
# (read 4, write 2), the gradient buffer zeroed (write 2): 54. bf16: the fp32 gradient buffer is
# the masters' gradient and there is no loss scale: norm 4 + Adam 28 + copy back 6 + zeroing 4 =
# 42. fp32: norm 4 + Adam 28 + zeroing 4 = 36. Applying the clip (read and write 8 more) happens
# only on steps whose norm exceeds the threshold and is not counted.
OPTIMIZER_STEP_BYTES = {"fp32": 36, "bf16": 42, "fp16": 54}
# Bytes per parameter to accumulate one micro-batch's weight gradients: Megatron-LM without
# --gradient-accumulation-fusion (and the trials, `trial_runners.optimizer`) adds each
# micro-batch's 16-bit gradient into the main-gradient buffer (fp32 for bf16: read 4 + 2, write 4;
# fp16: a 16-bit buffer, read 2 + 2, write 2); fp32 training accumulates in autograd from the
# second micro-batch on (read 4 + 4, write 4).
GRAD_ACCUMULATION_BYTES = {"fp32": 12, "bf16": 10, "fp16": 6}

Placement = Callable[[int, int, int], int]  # (stage, dp_rank, tp_rank) -> device index


class Profile(Protocol):
    """What the cost model reads of a profile (`autotune.estimate.profiles.Profile`)."""

    @property
    def device_type(self) -> str: ...

    @property
    def tp(self) -> int: ...

    def lookup(
        self,
        part: str,
        micro_batch_size: int,
        flash_attention: bool,
        recompute: str,
        threads: int | None = None,
    ) -> Any: ...


# --- sizes --------------------------------------------------------------------------------------


# Gradient buckets of the overlapped data-parallel all-reduce, in elements (Megatron-LM's
# --ddp-bucket-size default, 40M; the trials use the same unless a test sets a smaller one).
GRAD_BUCKET_ELEMENTS = 40_000_000


def grad_reduce_time(
    cfg: TrialConfig, cluster: ClusterSpec, params: int, *, dp_link: tuple[float, float], backward: float
) -> float:
    """The exposed time of a stage's data-parallel gradient all-reduce (ring over its dp link).

    Without overlap, all of it after the step's last backward. With `overlap_grad_reduce`, the
    buckets are reduced while the stage's last backward runs (their gradients are final in the
    reverse order of the layers): what is exposed is what does not fit in that backward's time,
    and at least the last bucket, which waits for the backward's end.
    """
    nbytes = params * GRAD_BYTES[cluster.dtype]
    whole = allreduce_time(nbytes, cfg.dp, *dp_link)
    if not cfg.overlap_grad_reduce:
        return whole
    last = allreduce_time(min(nbytes, GRAD_BUCKET_ELEMENTS * GRAD_BYTES[cluster.dtype]), cfg.dp, *dp_link)
    return max(whole - backward, last)


def stage_params(spec: ModelSpec, *, stage: int, num_stages: int, tp: int, layers: int | None = None) -> int:
    """Parameters held by one tensor-parallel rank of stage `stage` (exact for `models.py`).

    Column-parallel q, k, v, fc1, gate, up: weights and biases split over `tp`; row-parallel o,
    fc2, down: weights split, biases replicated; the token embedding and the head split over the
    vocabulary; norms and gpt's position embedding replicated.
    """
    layers = stage_layer_count(spec, stage=stage, num_stages=num_stages, layers=layers)
    h, f, v = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size
    kv = spec.num_kv_heads * spec.head_dim
    if spec.family == "gpt":
        column = (h * h + h) + 2 * (h * kv + kv) + (h * f + f)  # q, k, v, fc1 (with biases)
        row = h * h + f * h  # o, fc2 weights
        replicated = 2 * h + 4 * h  # o and fc2 biases; two LayerNorms (weight, bias)
        final_norm = 2 * h
    else:
        column = h * h + 2 * h * kv + 2 * h * f  # q, k, v, gate, up
        row = h * h + f * h  # o, down
        replicated = 2 * h  # two RMSNorm weights
        final_norm = h
    per_layer = (column + row) // tp + replicated
    total = layers * per_layer
    if stage == 0:
        total += embedding_params(spec, tp=tp)
    if stage == num_stages - 1:
        total += final_norm + h * v // tp
    return total


def embedding_params(spec: ModelSpec, *, tp: int) -> int:
    """The first stage's embeddings on one tensor-parallel rank: the token table split over the
    vocabulary, and gpt's position table, replicated."""
    table = spec.vocab_size * spec.hidden_size // tp
    return table + (spec.seq_len * spec.hidden_size if spec.family == "gpt" else 0)


# The part of BYTES_PER_PARAM that is optimizer state (fp32 master copy where there is one, and
# AdamW's two fp32 moments): what Megatron's distributed optimizer (ZeRO-1) shards over dp.
OPTIMIZER_STATE_BYTES = {"fp32": 8, "bf16": 12, "fp16": 12}


def static_bytes(params: int, *, dtype: str, dp: int = 1, distributed_optimizer: bool = False) -> int:
    """Parameters, gradients and optimizer state of `params` parameters on one rank.

    Without the distributed optimizer: params x BYTES_PER_PARAM[dtype]. With it, the optimizer
    state is sharded over the dp ranks: each holds ceil(params / dp) parameters' worth of it (the
    flat buffer is padded to a multiple of dp, as the trials' optimizer does).
    """
    state = OPTIMIZER_STATE_BYTES[dtype]
    if not distributed_optimizer or dp == 1:
        return params * BYTES_PER_PARAM[dtype]
    return params * (BYTES_PER_PARAM[dtype] - state) + -(-params // dp) * state


# --- FLOPs and the roofline -----------------------------------------------------------------------


def layer_flops(
    spec: ModelSpec, *, micro_batch_size: int, recompute: str, tp: int = 1
) -> tuple[float, float]:
    """(forward, backward) matmul FLOPs of one transformer layer on one tensor-parallel rank.

    The sum of the layer's GEMMs (`kernels.layer_gemms`): gpt q, o (2*b*s*h*h each), k, v
    (2*b*s*h*kv each), fc1, fc2 (2*b*s*h*f each); llama the same attention with kv =
    num_kv_heads * head_dim (grouped-query attention) and SwiGLU gate, up, down (3 x 2*b*s*h*f).
    Attention core: QK^T and AV, 2 x 2*b*s^2*h, the full (s, s) square (causal masking is not
    discounted: the explicit path computes it all, and this matches `model_flops_per_token`).
    Everything is split evenly over `tp`. Backward = 2 x forward; full recompute adds one
    forward to the backward, selective the attention core's forward.
    """
    gemms = kernels.layer_gemms(spec, micro_batch_size=micro_batch_size, tp=tp)
    fwd = sum(g.flops for g in gemms)
    core = sum(g.flops for g in gemms if g.core)
    bwd = 2 * fwd
    if recompute == "full":
        bwd += fwd
    elif recompute == "selective":
        bwd += core
    return float(fwd), float(bwd)


def head_flops(spec: ModelSpec, *, micro_batch_size: int, tp: int = 1) -> tuple[float, float]:
    """(forward, backward) FLOPs of the LM head on one tensor-parallel rank, 2*b*s*h*V/tp (the
    vocabulary is split over tp); the embedding is a lookup (~0)."""
    fwd = kernels.head_gemm(spec, micro_batch_size=micro_batch_size, tp=tp).flops
    return fwd, 2 * fwd


def allreduce_time(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce: 2*(n-1)/n * bytes / bandwidth + one latency (0 for a single rank)."""
    if ranks <= 1:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * nbytes / bandwidth + latency


def transfer_time(nbytes: float, bandwidth: float, latency: float) -> float:
    return latency + nbytes / bandwidth if nbytes > 0 else 0.0


# --- placement ----------------------------------------------------------------------------------


def default_placement(cfg: TrialConfig) -> Placement:
    """The executor's layout (`autotune.placement`): tp fastest, then dp, then pipeline slots,
    folded under BPipe so each pair shares a node."""
    layout = layout_of(cfg)

    def place(stage: int, dp_rank: int, tp_rank: int) -> int:
        return layout.rank(stage=stage, dp_rank=dp_rank, tp_rank=tp_rank)

    return place


def _group_link(cluster: ClusterSpec, devices: list[int]) -> tuple[float, float]:
    """The link a collective over `devices` runs on: intra-node if they share a node."""
    if len({node_of(cluster, d) for d in devices}) <= 1:
        return intra_link(cluster)
    return inter_link(cluster)


# --- the stage costs ------------------------------------------------------------------------------


def _profile_times(
    profile: Profile, cfg: TrialConfig, *, layers: int, first: bool, last: bool
) -> tuple[float, float]:
    """Stage compute from a profile: layers x per-layer + embedding (first) + head (last).

    A layer and the head measured at the profile's `tp` (1 where it has none) are rescaled to
    the configuration's tp, compute split evenly over the ranks (the tensor-parallel all-reduces
    are added by the caller); the embedding, a lookup, is not rescaled.
    """
    key = (cfg.micro_batch_size, cfg.flash_attention, cfg.recompute)
    threads = _rank_threads(profile, cfg)
    layer = profile.lookup("layer", *key, threads=threads)
    scale = getattr(profile, "tp", 1) / cfg.tp
    fwd, bwd = layers * layer.fwd_s * scale, layers * layer.bwd_s * scale
    for part, present, factor in (("embed", first, 1.0), ("head", last, scale)):
        if present:
            entry = profile.lookup(part, *key, threads=threads)
            fwd, bwd = fwd + entry.fwd_s * factor, bwd + entry.bwd_s * factor
    return fwd, bwd


def _rank_threads(profile: Profile, cfg: TrialConfig) -> int | None:
    """On a CPU the launcher gives each rank cores // world_size threads: time at that count."""
    return max(1, (os.cpu_count() or 1) // cfg.world_size) if profile.device_type == "cpu" else None


def optimizer_time(
    cfg: TrialConfig, cluster: ClusterSpec, params: int, *, profile: Profile | None = None
) -> float:
    """The optimizer step over a rank's `params` parameters: measured by the profile where it has
    the figure, else memory-bound (OPTIMIZER_STEP_BYTES per parameter)."""
    if profile is not None:
        measured = getattr(profile, "optimizer_step_s", None)
        step = measured(params, _rank_threads(profile, cfg)) if measured is not None else None
        if step is not None:
            return float(step)
    return kernels.memory_time(params * OPTIMIZER_STEP_BYTES[cluster.dtype], _device(cluster))


def grad_accumulation_time(cfg: TrialConfig, cluster: ClusterSpec, params: int, *, stage: int = 0) -> float:
    """Per micro-batch, adding its weight gradients into the accumulated ones
    (GRAD_ACCUMULATION_BYTES; fp32's first micro-batch is free, spread over the micro-batches).
    With `grad_accumulation_fusion` the linear layers' weight-gradient GEMMs add into the main
    gradients themselves: only the first stage's embedding table is still added by a pass."""
    cluster = in_dtype(cluster, cfg)
    if cfg.grad_accumulation_fusion:
        params = embedding_params(cfg.model, tp=cfg.tp) if stage == 0 else 0
    nbytes = float(params * GRAD_ACCUMULATION_BYTES[cluster.dtype])
    if cluster.dtype == "fp32":
        nbytes *= (cfg.num_microbatches - 1) / cfg.num_microbatches
    return kernels.memory_time(nbytes, _device(cluster))


def tp_backward_collectives(cfg: TrialConfig) -> int:
    """All-reduces' worth of tensor-parallel collectives in one layer's backward: 2, the input
    gradients of its two column-parallel regions; 2 more with full recomputation (its forward
    again); 1 more with sequence parallelism, where each column-parallel linear all-gathers its
    input again for its weight gradient instead of keeping it (two all-gathers, each half an
    all-reduce: `trial_runners.tensor_parallel._GatherLinear`, as Megatron-LM)."""
    return 2 + (2 if cfg.recompute == "full" else 0) + (1 if cfg.sequence_parallel else 0)


def _device(cluster: ClusterSpec) -> kernels.Device:
    return kernels.Device(
        peak_flops=cluster.peak_flops or NOMINAL_PEAK_FLOPS,
        gemm_efficiency=cluster.gemm_efficiency,
        hbm_bandwidth=cluster.hbm_bandwidth,
        dtype_bytes=cluster.dtype_bytes,
    )


def _roofline_times(
    cfg: TrialConfig, cluster: ClusterSpec, *, layers: int, first: bool, last: bool
) -> tuple[float, float]:
    """Stage compute from the kernel model (`autotune.estimate.kernels`): layers x one layer's
    kernels + the embedding (first stage) + the final norm, head and loss (last stage)."""
    spec, b, tp = cfg.model, cfg.micro_batch_size, cfg.tp
    device = _device(cluster)
    lf, lb = kernels.layer_times(
        spec, micro_batch_size=b, tp=tp, recompute=cfg.recompute, flash_attention=cfg.flash_attention,
        device=device, sequence_parallel=cfg.sequence_parallel,
    )  # fmt: skip
    fwd, bwd = layers * lf, layers * lb
    if first:
        ef, eb = kernels.embed_times(spec, micro_batch_size=b, device=device)
        fwd, bwd = fwd + ef, bwd + eb
    if last:
        hf, hb = kernels.head_times(
            spec, micro_batch_size=b, tp=tp, device=device, sequence_parallel=cfg.sequence_parallel
        )
        fwd, bwd = fwd + hf, bwd + hb
    return fwd, bwd


Links = tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]


def _stage_links(cfg: TrialConfig, cluster: ClusterSpec, placement: Placement | None) -> list[Links]:
    """Per stage, (bandwidth, latency) of its tensor-parallel group, its send to the next stage,
    its BPipe pair link and its data-parallel group (cached per layout and cluster)."""
    # A CPU runs any number of ranks (processes share its cores; the sharing is not modelled):
    # on a one-node CPU cluster every pair of distinct ranks talks over its one link.
    oversubscribed = cfg.world_size > cluster.world_size and cluster.device == "cpu" and cluster.nodes == 1
    if cfg.world_size > cluster.world_size and not oversubscribed:
        raise ConfigError(
            "--cluster",
            f"the configuration needs tp x pp x dp = {cfg.world_size} devices; {cluster.name} has "
            f"{cluster.world_size}",
        )
    if placement is None:
        return _layout_links(layout_of(cfg), cluster, oversubscribed)
    return _links(placement, cfg.tp, cfg.pp, cfg.dp, cluster, oversubscribed)


@functools.lru_cache(maxsize=4096)
def _layout_links(layout: Layout, cluster: ClusterSpec, oversubscribed: bool) -> list[Links]:
    def place(stage: int, dp_rank: int, tp_rank: int) -> int:
        return layout.rank(stage=stage, dp_rank=dp_rank, tp_rank=tp_rank)

    return _links(place, layout.tp, layout.pp, layout.dp, cluster, oversubscribed)


def _links(
    place: Placement, tp: int, pp: int, dp: int, cluster: ClusterSpec, oversubscribed: bool
) -> list[Links]:
    def link(a: int, b: int) -> tuple[float, float]:
        if oversubscribed:
            return intra_link(cluster) if a != b else (math.inf, 0.0)
        return link_between(cluster, a, b)

    def group_link(devices: list[int]) -> tuple[float, float]:
        if oversubscribed:
            return intra_link(cluster)
        return _group_link(cluster, devices)

    out: list[Links] = []
    for s in range(pp):
        tp_link = group_link([place(s, 0, r) for r in range(tp)])
        # to the next rank; the last one's goes round to the first (its next chunk, interleaved)
        send = link(place(s, 0, 0), place((s + 1) % pp, 0, 0)) if pp > 1 else (math.inf, 0.0)
        partner = pp - 1 - s
        evict = link(place(s, 0, 0), place(partner, 0, 0)) if partner != s else (math.inf, 0.0)
        dp_link = group_link([place(s, r, 0) for r in range(dp)])
        out.append((tp_link, send, evict, dp_link))
    return out


# fp32 on a GPU runs its matmuls as TF32 on the tensor cores: half the 16-bit dense peak (A100
# 156 of 312 TFLOP/s, H100 SXM 495 of 989, datasheets).
TF32_PEAK_FRACTION = 0.5


def in_dtype(cluster: ClusterSpec, cfg: TrialConfig) -> ClusterSpec:
    """The cluster as `cfg` trains on it: its dtype (`--dtype`, else the cluster's own); a GPU's
    peak FLOP/s (a 16-bit figure) halved for fp32 (TF32)."""
    if not cfg.dtype or cfg.dtype == cluster.dtype:
        return cluster
    peak = cluster.peak_flops
    if peak is not None and cluster.device != "cpu":
        if cfg.dtype == "fp32":
            peak *= TF32_PEAK_FRACTION
        elif cluster.dtype == "fp32":
            peak /= TF32_PEAK_FRACTION
    return dataclasses.replace(cluster, dtype=cfg.dtype, peak_flops=peak)


# The weight gradients' share of a backward's compute, where a schedule runs them apart (ZB-H1's
# W): each GEMM's backward is two GEMMs of its forward's size, one for the input and one for the
# weight gradient (Qi et al. 2024 take T_B = T_W likewise); the attention core's backward, input
# gradients only, is counted in the same halves.
WEIGHT_GRAD_SHARE = 0.5


def stage_costs(
    cfg: TrialConfig,
    cluster: ClusterSpec,
    *,
    profile: Profile | None = None,
    placement: Placement | None = None,
) -> list[StageCosts]:
    """Per-stage durations and sizes of `cfg` on `cluster` (one entry per pipeline stage; with V
    model chunks per rank, per virtual stage: rank s's chunk c is entry c * pp + s).

    - wgt: the weight gradients' part of bwd's compute (`WEIGHT_GRAD_SHARE`), run apart by W;
    - fwd/bwd: compute (profile or kernel model; the kernel model's backward adds the
      micro-batch's gradient accumulation, `grad_accumulation_time`) + the tensor-parallel
      collectives (2 all-reduces per layer in forward, `tp_backward_collectives` in backward;
      b*s*h elements each, ring over the tp group's link; one more for the split embedding's
      output on the first stage, and on the last the head's input gradient, the split loss's
      three per-token fp32 all-reduces and, with sequence parallelism, the head's all-gather);
    - send_act: one activation (b*s*h elements, b*s*h/tp with sequence parallelism: an
      all-gather and a reduce-scatter move what one all-reduce does) to the next stage;
    - evict: this stage's activation bytes of one micro-batch over its BPipe pair link;
    - post: the cluster's `post_overhead`, the thread time of each send or receive posted;
    - tail: the exposed data-parallel all-reduce of the stage's gradients (`grad_reduce_time`)
      plus the optimizer step;
    - act_bytes: saved bytes of one micro-batch; static_bytes: parameters, gradients and optimizer
      state (`static_bytes`: its state sharded over dp with the distributed optimizer).
    """
    cluster = in_dtype(cluster, cfg)
    links = _stage_links(cfg, cluster, placement)
    spec, p, b, tp = cfg.model, cfg.pp, cfg.micro_batch_size, cfg.tp
    d = cluster.dtype_bytes
    split = cfg.split
    hidden_bytes = b * spec.seq_len * spec.hidden_size * d
    out: list[StageCosts] = []
    n = cfg.num_model_stages
    for g in range(n):
        s = g % p  # the rank
        first, last, layers = g == 0, g == n - 1, split[g]
        tp_link, send_link, evict_link, dp_link = links[s]
        params = stage_params(spec, stage=g, num_stages=n, tp=tp, layers=layers)
        if profile is not None:  # its measured backward holds the accumulation
            fwd, bwd = _profile_times(profile, cfg, layers=layers, first=first, last=last)
        else:
            fwd, bwd = _roofline_times(cfg, cluster, layers=layers, first=first, last=last)
            bwd += grad_accumulation_time(cfg, cluster, params, stage=g)
        wgt = WEIGHT_GRAD_SHARE * bwd  # before the collectives, which the input gradients wait for
        if tp > 1:
            one = allreduce_time(hidden_bytes, tp, *tp_link)
            fwd += layers * 2 * one
            bwd += layers * tp_backward_collectives(cfg) * one
            if first:  # the split embedding's output
                fwd += one
            if last:  # the head's input gradient; the loss's max, sum and target logit per token
                bwd += one
                fwd += 3 * allreduce_time(b * spec.seq_len * FP32_BYTES, tp, *tp_link)
                if cfg.sequence_parallel:  # the head's input gathered along the sequence
                    fwd += one / 2
        sent = math.prod(cfg.activation_shape) * d  # the sequence's part with sequence parallelism
        send = 0.0 if last else transfer_time(sent, *send_link)
        act = activation_bytes(
            spec,
            stage=g,
            num_stages=n,
            micro_batch_size=b,
            flash_attention=cfg.flash_attention,
            recompute=cfg.recompute,
            tp=tp,
            dtype_bytes=d,
            layers=layers,
            sequence_parallel=cfg.sequence_parallel,
            cpu=cluster.device == "cpu",
        )
        evict = 0.0 if p - 1 - s == s or n > p else transfer_time(act, *evict_link)
        updated = -(-params // cfg.dp) if cfg.distributed_optimizer else params  # its shard only
        tail = optimizer_time(cfg, cluster, updated, profile=profile)
        if cfg.dp > 1:
            tail += grad_reduce_time(cfg, cluster, params, dp_link=dp_link, backward=bwd)
        out.append(
            StageCosts(
                fwd=fwd,
                bwd=bwd,
                wgt=wgt,
                send_act=send,
                evict=evict,
                act_bytes=act,
                static_bytes=static_bytes(
                    params, dtype=cluster.dtype, dp=cfg.dp, distributed_optimizer=cfg.distributed_optimizer
                ),
                tail=tail,
                post=cluster.post_overhead,
            )
        )
    return out
