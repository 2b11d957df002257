"""Saved-for-backward bytes of one micro-batch on one pipeline stage, counted from `models.py`.

This is the formula the executor's `ActivationTracker` measures: every tensor autograd saves,
by storage, de-duplicated within a micro-batch, parameters and buffers excluded. It is exact
(to the byte) for the CPU fp32 runs; `tests/trial_runners_tests/test_activation_formula.py`
checks it against the real stage modules, in fp32 and (`cpu=True`) in bf16 on the CPU. With
`dtype_bytes=2` and `cpu=False` it is the bf16 prediction on a GPU: the same tensors, with the
kernels' fp32 side tensors (norm statistics, the attention log-sum-exp, the fp32 log-softmax of
the loss) kept at 4 bytes, as fused GPU norms keep them. GPU kernels may save slightly
different side tensors (e.g. padded log-sum-exps); that is not measured here.

Per transformer layer, `b` sequences of `s` tokens, hidden `h`, ffn `f`, `a` heads, `kv` the
key/value width (num_kv_heads * head_dim), tensor parallel `t`, `d` bytes per element:

- each pre-norm (2 per layer): its input `b*s*h*d`, its output `b*s*h*d` (saved by the next
  linear), and fp32 statistics: LayerNorm mean and rstd `2*b*s*4`; RMSNorm (torch's composite
  kernel) rstd `b*s*4` and also the normalised `x * rstd`, `b*s*h*d`;
- attention, recompute none: q, k, v as the attention kernel sees them (`3*b*s*h/t*d`; for
  grouped-query attention k and v are the expanded copies, `h/t` wide, except where the
  expansion is a view of the `kv/t` projection: one local kv head, and for explicit attention
  also b == 1; see `_kv_saved_width`), the output `b*s*h/t*d` (also the `o` projection's
  input), and
  - SDPA (flash): its log-sum-exp, fp32, shape (b, a/t, s): `b*a/t*s*4`;
  - explicit: the softmax output `b*a/t*s*s*d` (the scores before it are not kept; the mask
    is a buffer);
- attention, selective: the reentrant checkpoint's inputs q `b*s*h/t*d`, k and v
  `2*b*s*kv/t*d` (the unexpanded projections), and the output `b*s*h/t*d`;
- MLP: gpt fc1 output (GeLU's input) and GeLU output (fc2's input): `2*b*s*f/t*d`; llama
  gate output (SiLU's input), SiLU output, up output, and their product (down's input):
  `4*b*s*f/t*d`;
- recompute full: only the block's input `b*s*h*d` (reentrant checkpoint).

With sequence parallelism (tp t > 1, `tensor_parallel`), the norms' tensors (their inputs,
outputs and statistics, final norm included) and the full-recompute checkpoint's input cover
`b*s/t` tokens: a column-parallel linear keeps its input's part, not the gathered sequence.

The first stage adds the int64 tokens the embedding keeps (`8*b*s`); the last stage adds the
final norm (as above), the fp32 log-softmax of the logits `b*s*V*4` (the logits themselves are
not kept), the int64 targets `8*b*s` and the loss's fp32 total weight (4 bytes). With the
vocabulary split over t > 1 ranks (`tensor_parallel.VocabParallelEmbedding`,
`vocab_parallel_cross_entropy`) the embedding keeps its shifted int64 indices and a bool mask
(`9*b*s`) and the loss its fp32 softmax `b*s*V/t*4`, the shifted int64 targets and their bool
mask (`9*b*s`).
"""

from __future__ import annotations

from autotune.config import RECOMPUTE, ModelSpec

FP32 = 4  # norm statistics, SDPA's log-sum-exp, the loss's log-softmax: fp32 on every device
INT64 = 8  # tokens and targets


def stage_layer_count(spec: ModelSpec, *, stage: int, num_stages: int, layers: int | None) -> int:
    """`layers` (an uneven split's count for this stage), else the even split's L / num_stages."""
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, num_stages={num_stages}), got {stage}")
    if layers is not None:
        if not 1 <= layers <= spec.num_layers:
            raise ValueError(f"a stage holds 1 to {spec.num_layers} layers, got {layers}")
        return layers
    if spec.num_layers % num_stages:
        raise ValueError(f"{spec.num_layers} layers do not split into {num_stages} equal stages")
    return spec.num_layers // num_stages


def _check(spec: ModelSpec, *, stage: int, num_stages: int, recompute: str, tp: int) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    for what, n in (
        ("num_heads", spec.num_heads),
        ("num_kv_heads", spec.num_kv_heads),
        ("ffn_hidden_size", spec.ffn_hidden_size),
        ("vocab_size", spec.vocab_size),
    ):
        if tp < 1 or n % tp:
            raise ValueError(f"tensor parallel {tp} must divide {what} ({n})")


def _norm_bytes(spec: ModelSpec, tokens: int, dtype_bytes: int, cpu: bool = False) -> int:
    """A pre-norm: its input and output, its fp32 statistics; RMSNorm also x * rstd.

    16-bit on a CPU (measured, torch 2.13): LayerNorm keeps its statistics in the input's dtype;
    the composite RMSNorm computes in fp32 and keeps the fp32 input and x * rstd, the output
    and the fp32 rstd (not the 16-bit input). In fp32 both readings agree.
    """
    h, d = spec.hidden_size, dtype_bytes
    if spec.family == "gpt":  # LayerNorm: input, mean, rstd; the output (next linear's input)
        return 2 * tokens * h * d + 2 * tokens * (d if cpu else FP32)
    if cpu and d < FP32:
        return tokens * h * (2 * FP32 + d) + tokens * FP32
    # RMSNorm (torch's composite): input, rstd, the normalised x * rstd (for the weight's
    # gradient); the output
    return 3 * tokens * h * d + tokens * FP32


def _kv_saved_width(spec: ModelSpec, *, tp: int, micro_batch_size: int, flash_attention: bool) -> int:
    """Width of the k (and v) storages the attention kernel keeps, per tensor-parallel rank.

    Grouped-query attention expands k and v to every query head with `expand().reshape()`;
    reshape copies (full width h/t) unless it can be a view: with one local kv head the
    expanded heads share its storage (kv/t wide). Explicit attention then reshapes the
    (b, heads) dims together for `bmm`, which copies again unless b == 1.
    """
    heads, kv_heads = spec.num_heads // tp, spec.num_kv_heads // tp
    width, kv = spec.hidden_size // tp, kv_heads * spec.head_dim
    if kv_heads == heads:
        return width
    if kv_heads == 1 and (flash_attention or micro_batch_size == 1):
        return kv
    return width


def layer_activation_bytes(
    spec: ModelSpec,
    *,
    micro_batch_size: int,
    flash_attention: bool,
    recompute: str,
    tp: int = 1,
    dtype_bytes: int = 4,
    sequence_parallel: bool = False,
    cpu: bool = False,
) -> int:
    """Saved bytes of one transformer layer for one micro-batch, on one tensor-parallel rank
    (`cpu`: 16-bit side tensors as torch's CPU kernels keep them, `_norm_bytes`)."""
    b, s, h, d = micro_batch_size, spec.seq_len, spec.hidden_size, dtype_bytes
    tokens = b * s
    local = tokens // tp if sequence_parallel else tokens  # the norms' part of the sequence
    if recompute == "full":
        return local * h * d  # the reentrant checkpoint's input
    width = h // tp  # local attention width: (num_heads / t) * head_dim
    kv = spec.num_kv_heads * spec.head_dim // tp
    heads = spec.num_heads // tp
    ffn = spec.ffn_hidden_size // tp
    norms = 2 * _norm_bytes(spec, local, d, cpu)
    if recompute == "selective":
        attention = tokens * (2 * width + 2 * kv) * d  # checkpoint inputs q, k, v; the output
    else:
        kv_saved = _kv_saved_width(spec, tp=tp, micro_batch_size=b, flash_attention=flash_attention)
        attention = tokens * (2 * width + 2 * kv_saved) * d  # q, k, v as the kernel sees them; out
        if flash_attention:
            attention += b * heads * s * FP32  # SDPA's log-sum-exp, (b, a/t, s)
        else:
            attention += b * heads * s * s * d  # the softmax output
    mlp = (2 if spec.family == "gpt" else 4) * tokens * ffn * d
    return norms + attention + mlp


BOOL = 1  # the vocabulary-parallel masks


def embed_activation_bytes(spec: ModelSpec, *, micro_batch_size: int, tp: int = 1) -> int:
    """The first stage's extra: the int64 token ids the embedding keeps (split vocabulary: the
    shifted ids and the bool mask of tokens another rank holds)."""
    tokens = micro_batch_size * spec.seq_len
    return tokens * INT64 + (tokens * BOOL if tp > 1 else 0)


def head_activation_bytes(
    spec: ModelSpec,
    *,
    micro_batch_size: int,
    dtype_bytes: int = 4,
    tp: int = 1,
    sequence_parallel: bool = False,
    cpu: bool = False,
) -> int:
    """The last stage's extra: final norm (on this rank's part of the sequence with sequence
    parallelism), the fp32 log-softmax (softmax of this rank's vocabulary rows when split), the
    int64 targets, and the loss's total weight (split: the targets' mask)."""
    tokens = micro_batch_size * spec.seq_len
    local = tokens // tp if sequence_parallel else tokens
    loss = tokens * INT64 + (tokens * BOOL if tp > 1 else FP32)
    return _norm_bytes(spec, local, dtype_bytes, cpu) + tokens * (spec.vocab_size // tp) * FP32 + loss


def activation_bytes(
    spec: ModelSpec,
    *,
    stage: int,
    num_stages: int,
    micro_batch_size: int,
    flash_attention: bool,
    recompute: str,
    tp: int = 1,
    dtype_bytes: int = 4,
    layers: int | None = None,
    sequence_parallel: bool = False,
    cpu: bool = False,
) -> int:
    """Saved-for-backward bytes of ONE micro-batch on stage `stage` (one tensor-parallel rank)
    holding `layers` layers (None: the even split's); with `sequence_parallel` (tp > 1) the
    norms and the full-recompute checkpoints keep only this rank's part of the sequence.

    Equals the executor's `microbatch_bytes` (ActivationTracker) for CPU fp32 runs.
    """
    _check(spec, stage=stage, num_stages=num_stages, recompute=recompute, tp=tp)
    layers = stage_layer_count(spec, stage=stage, num_stages=num_stages, layers=layers)
    if micro_batch_size < 1 or dtype_bytes < 1:
        raise ValueError("micro_batch_size and dtype_bytes must be positive")
    total = layers * layer_activation_bytes(
        spec,
        micro_batch_size=micro_batch_size,
        flash_attention=flash_attention,
        recompute=recompute,
        tp=tp,
        dtype_bytes=dtype_bytes,
        sequence_parallel=sequence_parallel and tp > 1,
        cpu=cpu,
    )
    if stage == 0:
        total += embed_activation_bytes(spec, micro_batch_size=micro_batch_size, tp=tp)
    if stage == num_stages - 1:
        total += head_activation_bytes(
            spec, micro_batch_size=micro_batch_size, dtype_bytes=dtype_bytes, tp=tp,
            sequence_parallel=sequence_parallel and tp > 1, cpu=cpu,
        )  # fmt: skip
    return total
