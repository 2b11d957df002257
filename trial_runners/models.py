"""The two model families, built one pipeline stage at a time (nanoGPT style, read top-down).

- gpt: token + learned position embeddings; pre-LayerNorm blocks of multi-head attention
  (separate q, k, v projections and an output projection `o`, all with bias) and a GeLU MLP
  (fc1, fc2, with bias); a final LayerNorm and an untied LM head.
- llama: token embedding only; pre-RMSNorm (eps 1e-5) blocks of grouped-query attention
  (`num_kv_heads` key/value heads, expanded to `num_heads`) with RoPE (base 10000) on q and k,
  and a SwiGLU MLP (gate, up, down); no biases; a final RMSNorm and an untied LM head.

`build_stage` builds stage `s` of a split (uniform, layers [s*L/p, (s+1)*L/p), unless `split`
gives each stage's count), plus the embeddings on stage 0 and the final norm, head and loss on
the last stage. Parameter names are the full model's names (`layers` is keyed by the global
layer index), and every parameter is initialised from its own generator seeded by (seed, name)
at its full shape, so any split and any tensor-parallel rank holds exactly the matching slices
of `build_full_model`'s parameters.

Tensor parallel (Megatron, no sequence parallel): q/k/v, fc1 and gate/up are column-parallel
(heads split evenly over the ranks), o, fc2 and down row-parallel; the token embedding and the
LM head are split over the vocabulary, with the loss computed from the split logits
(`tensor_parallel.VocabParallelEmbedding`, `vocab_parallel_cross_entropy`); norms and gpt's
position embedding are replicated. Constants (RoPE tables, the causal mask) are non-persistent buffers made
once, so an activation counter that skips parameter and buffer storages sees only activations.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from autotune.config import FAMILIES, RECOMPUTE, ModelSpec
from trial_runners.tensor_parallel import (
    SEQUENCE_PARALLEL_ATTR,
    SHARD_DIM_ATTR,
    ColumnParallelLinear,
    Group,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    tp_rank,
    tp_size,
    vocab_parallel_cross_entropy,
    vocab_range,
)

Rope = tuple[Tensor, Tensor]
INIT_STD = 0.02


def _norm(spec: ModelSpec, device: Any, dtype: torch.dtype, *, sp: bool = False) -> nn.Module:
    """The family's norm; in the sequence-parallel region its parameters are marked for the
    gradient sum over the tp group (each rank normalises its part of the sequence)."""
    norm: nn.Module
    if spec.family == "gpt":
        norm = nn.LayerNorm(spec.hidden_size, device=device, dtype=dtype)
    else:
        norm = nn.RMSNorm(spec.hidden_size, eps=1e-5, device=device, dtype=dtype)
    if sp:
        for p in norm.parameters():
            setattr(p, SEQUENCE_PARALLEL_ATTR, True)
    return norm


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> Rope:
    """cos, sin of shape (T, hs) for the rotate-half form of RoPE (computed in fp32)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, nh, T, hs) rotated by position: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_core(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None) -> Tensor:
    """Causal attention: q (B, nh, T, hs), k and v (B, nkv, T, hs) -> (B, nh, T, hs).

    `mask` None uses scaled_dot_product_attention (flash, no (T, T) tensors kept); otherwise
    `mask` is the (T, T) bool buffer, True above the diagonal, for the explicit softmax path.
    """
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    if nkv != nh:  # grouped-query attention: query head i reads key/value head i // (nh / nkv)
        k = k[:, :, None].expand(B, nkv, nh // nkv, T, hs).reshape(B, nh, T, hs)  # (B, nh, T, hs)
        v = v[:, :, None].expand(B, nkv, nh // nkv, T, hs).reshape(B, nh, T, hs)  # (B, nh, T, hs)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    scores = scores.masked_fill(mask[:T, :T], float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, nh, T, hs)


class Attention(nn.Module):
    """Multi-head (gpt) or grouped-query (llama) causal self-attention, column/row parallel."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        selective: bool,
        tp_group: Any,
        device: Any,
        dtype: torch.dtype,
        sp: bool = False,
    ):
        super().__init__()
        t, h, hs = tp_size(tp_group), spec.hidden_size, spec.head_dim
        bias = spec.family == "gpt"
        kw: dict[str, Any] = {"bias": bias, "device": device, "dtype": dtype, "sequence_parallel": sp}
        self.tp_group, self.selective, self.head_dim, self.sp = tp_group, selective, hs, sp
        self.n_head, self.n_kv_head = spec.num_heads // t, spec.num_kv_heads // t  # local heads
        self.q = ColumnParallelLinear(h, spec.num_heads * hs, tp_group, **kw)
        self.k = ColumnParallelLinear(h, spec.num_kv_heads * hs, tp_group, **kw)
        self.v = ColumnParallelLinear(h, spec.num_kv_heads * hs, tp_group, **kw)
        self.o = RowParallelLinear(spec.num_heads * hs, h, tp_group, **kw)

    def forward(self, x: Tensor, rope: Rope | None, mask: Tensor | None) -> Tensor:
        B = x.shape[0]
        if not self.sp:  # with sequence parallelism the linears gather x (B, T/t, H) themselves
            x = copy_to_tp_region(x, self.tp_group)
        q = self.q(x)
        T = q.shape[1]  # the whole sequence
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        core = functools.partial(attention_core, mask=mask)
        if self.selective and torch.is_grad_enabled():
            y = checkpoint(core, q, k, v, use_reentrant=True)
        else:
            y = core(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H/t)
        return self.o(y)  # (B, T, H) all-reduced over the tp group (sequence parallel: (B, T/t, H))


class GptMLP(nn.Module):
    def __init__(self, spec: ModelSpec, *, tp_group: Any, device: Any, dtype: torch.dtype, sp: bool = False):
        super().__init__()
        h, f = spec.hidden_size, spec.ffn_hidden_size
        self.tp_group, self.sp = tp_group, sp
        kw: dict[str, Any] = {"device": device, "dtype": dtype, "sequence_parallel": sp}
        self.fc1 = ColumnParallelLinear(h, f, tp_group, bias=True, **kw)
        self.fc2 = RowParallelLinear(f, h, tp_group, bias=True, **kw)

    def forward(self, x: Tensor) -> Tensor:
        if not self.sp:
            x = copy_to_tp_region(x, self.tp_group)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, T, F/t) -> (B, T, H)


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, *, tp_group: Any, device: Any, dtype: torch.dtype, sp: bool = False):
        super().__init__()
        h, f = spec.hidden_size, spec.ffn_hidden_size
        self.tp_group, self.sp = tp_group, sp
        kw: dict[str, Any] = {"device": device, "dtype": dtype, "sequence_parallel": sp}
        self.gate = ColumnParallelLinear(h, f, tp_group, bias=False, **kw)
        self.up = ColumnParallelLinear(h, f, tp_group, bias=False, **kw)
        self.down = RowParallelLinear(f, h, tp_group, bias=False, **kw)

    def forward(self, x: Tensor) -> Tensor:
        if not self.sp:
            x = copy_to_tp_region(x, self.tp_group)
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (B, T, F/t) -> (B, T, H)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        selective: bool,
        tp_group: Any,
        device: Any,
        dtype: torch.dtype,
        sp: bool = False,
    ):
        super().__init__()
        kw: dict[str, Any] = {"tp_group": tp_group, "device": device, "dtype": dtype, "sp": sp}
        self.attn_norm = _norm(spec, device, dtype, sp=sp)
        self.attn = Attention(spec, selective=selective, **kw)
        self.mlp_norm = _norm(spec, device, dtype, sp=sp)
        self.mlp = GptMLP(spec, **kw) if spec.family == "gpt" else LlamaMLP(spec, **kw)

    def forward(self, x: Tensor, rope: Rope | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, H)


class StageModule(nn.Module):
    """One pipeline stage: [embeddings] -> layers -> [final norm, head, mean cross-entropy]."""

    rope_cos: Tensor | None
    rope_sin: Tensor | None
    causal_mask: Tensor | None

    def __init__(
        self,
        spec: ModelSpec,
        *,
        stage: int,
        num_stages: int,
        flash_attention: bool,
        recompute: str,
        tp_group: Any,
        device: Any,
        dtype: torch.dtype,
        split: tuple[int, ...] | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        split = _check_split(
            spec, stage=stage, num_stages=num_stages, recompute=recompute, tp=tp_size(tp_group), split=split
        )
        self.spec, self.stage, self.num_stages, self.recompute = spec, stage, num_stages, recompute
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        start = sum(split[:stage])
        self.layer_ids = range(start, start + split[stage])
        h, v, T = spec.hidden_size, spec.vocab_size, spec.seq_len
        self.tp_group = tp_group if tp_size(tp_group) > 1 else None  # vocabulary split when set
        self.sp = sp = sequence_parallel and self.tp_group is not None  # hidden states split along T
        self.embed: nn.Module | None = None
        if self.is_first:
            self.embed = (
                VocabParallelEmbedding(v, h, tp_group, device=device, dtype=dtype, sequence_parallel=sp)
                if self.tp_group is not None
                else nn.Embedding(v, h, device=device, dtype=dtype)
            )
        self.pos_embed = (
            nn.Embedding(T, h, device=device, dtype=dtype) if self.is_first and spec.family == "gpt" else None
        )
        if sp and self.pos_embed is not None:
            setattr(self.pos_embed.weight, SEQUENCE_PARALLEL_ATTR, True)  # each rank adds its positions
        kw: dict[str, Any] = {"tp_group": tp_group, "device": device, "dtype": dtype, "sp": sp}
        self.layers = nn.ModuleDict(
            {str(i): Block(spec, selective=recompute == "selective", **kw) for i in self.layer_ids}
        )
        self.norm = _norm(spec, device, dtype, sp=sp) if self.is_last else None
        self.head: nn.Module | None = None
        if self.is_last:
            self.head = (
                ColumnParallelLinear(
                    h, v, tp_group, bias=False, device=device, dtype=dtype, sequence_parallel=sp
                )
                if self.tp_group is not None
                else nn.Linear(h, v, bias=False, device=device, dtype=dtype)
            )
        # Constants, made once as non-persistent buffers (not in the state dict, not counted as activations).
        llama = spec.family == "llama"
        cos, sin = rope_tables(T, spec.head_dim)  # (T, hs) each
        mask = None if flash_attention else torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)
        self.register_buffer("rope_cos", cos.to(device, dtype) if llama else None, persistent=False)
        self.register_buffer("rope_sin", sin.to(device, dtype) if llama else None, persistent=False)
        self.register_buffer("causal_mask", mask, persistent=False)  # (T, T), True above the diagonal

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """Tokens (B, T) on the first stage, hidden states (B, T, H) on the others ((B, T/t, H),
        this rank's part of the sequence, with sequence parallelism).

        Returns the mean cross-entropy over the micro-batch on the last stage (`targets` (B, T)
        required), the hidden states on the others.
        """
        t = tp_size(self.tp_group) if self.sp else 1
        T = x.shape[1] * (1 if self.embed is not None else t)  # the whole sequence
        if self.spec.seq_len < T:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len {self.spec.seq_len}")
        if self.embed is not None:
            x = self.embed(x)  # (B, T, H); (B, T/t, H) with sequence parallelism
            if self.pos_embed is not None:
                pos = self.pos_embed.weight[:T]  # (T, H); slicing saves no index tensor
                x = x + (pos.chunk(t, dim=0)[tp_rank(self.tp_group)] if self.sp else pos)
        full = self.recompute == "full" and torch.is_grad_enabled()
        if full and not x.requires_grad:
            raise ValueError(
                "recompute='full' uses reentrant checkpointing, which needs a stage input with "
                "requires_grad=True (pass hidden states with .requires_grad_())"
            )
        cos, sin, mask = self.rope_cos, self.rope_sin, self.causal_mask  # (T, hs), (T, hs), (T, T) or None
        rope = None if cos is None or sin is None else (cos[:T], sin[:T])
        for block in self.layers.values():
            if full:
                x = checkpoint(functools.partial(block, rope=rope, mask=mask), x, use_reentrant=True)
            else:
                x = block(x, rope, mask)
        if self.norm is None or self.head is None:
            return x  # (B, T, H) or (B, T/t, H)
        if targets is None:
            raise ValueError("the last stage needs targets (B, T) to compute the loss")
        if self.tp_group is None:
            logits = self.head(self.norm(x))  # (B, T, V)
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        y = self.norm(x)
        logits = self.head(y if self.sp else copy_to_tp_region(y, self.tp_group))  # (B, T, V/t)
        start, _ = vocab_range(self.spec.vocab_size, self.tp_group)
        return vocab_parallel_cross_entropy(logits, targets, start, self.tp_group).mean()

    def output_shape(self, micro_batch_size: int) -> tuple[int, ...]:
        """(B, T, H) for a stage that passes hidden states on ((B, T/t, H) with sequence
        parallelism), () for the last stage's loss."""
        t = tp_size(self.tp_group) if self.sp else 1
        return () if self.is_last else (micro_batch_size, self.spec.seq_len // t, self.spec.hidden_size)


def _check_split(
    spec: ModelSpec, *, stage: int, num_stages: int, recompute: str, tp: int, split: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The layers per stage (`split`, else the even split), checked."""
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown model family {spec.family!r}; expected one of {', '.join(FAMILIES)}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, num_stages={num_stages}), got {stage}")
    L = spec.num_layers
    if split is not None:
        if len(split) != num_stages or sum(split) != L or min(split) < 1:
            raise ValueError(f"split {list(split)} does not give {num_stages} stages of {L} layers")
    elif L % num_stages:
        raise ValueError(
            f"{L} layers cannot be split into {num_stages} equal stages "
            f"({L} % {num_stages} = {L % num_stages})"
        )
    for what, n in (
        ("num_heads", spec.num_heads),
        ("num_kv_heads", spec.num_kv_heads),
        ("ffn_hidden_size", spec.ffn_hidden_size),
        ("vocab_size", spec.vocab_size),
    ):
        if n % tp:
            raise ValueError(f"tensor parallel {tp} must divide {what} ({n} % {tp} = {n % tp})")
    return tuple(split) if split is not None else (L // num_stages,) * num_stages


def _param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, full parameter name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _init_parameters(model: StageModule, *, seed: int, tp_group: Any) -> None:
    """Fill every parameter with the slice of its full-shape value: N(0, 0.02) weights (output
    projections scaled by 1/sqrt(2L), as GPT-2), zero biases, unit norm weights."""
    t, rank = tp_size(tp_group), tp_rank(tp_group)
    out_std = INIT_STD / math.sqrt(2 * model.spec.num_layers)
    for prefix, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            dim: int | None = getattr(p, SHARD_DIM_ATTR, None)
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= t
            if pname == "bias":
                full = torch.zeros(shape)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                full = torch.ones(shape)
            else:
                std = out_std if isinstance(module, RowParallelLinear) else INIT_STD
                full = torch.empty(shape).normal_(0.0, std, generator=_param_generator(seed, name))
            if dim is not None:
                full = full.chunk(t, dim)[rank]
            with torch.no_grad():
                p.copy_(full)


def build_stage(
    spec: ModelSpec,
    *,
    stage: int,
    num_stages: int,
    flash_attention: bool,
    recompute: str,
    tp_group: Group = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    split: tuple[int, ...] | None = None,
    sequence_parallel: bool = False,
) -> StageModule:
    """Stage `stage` of `num_stages`, sharded over `tp_group` (None: no TP); `split` gives the
    layers per stage (None: uniform); `sequence_parallel` splits the hidden states between the
    tensor-parallel regions along the sequence (with a tp group of more than one rank).

    Args:
        recompute: "none"; "selective" (checkpoint the attention core only); "full" (checkpoint
            every block). Checkpoints are reentrant, so they save their inputs with
            save_for_backward where saved-tensor hooks see them.
        tp_group: a torch.distributed process group; size > 1 shards the attention and MLP.
    """
    model = StageModule(
        spec,
        stage=stage,
        num_stages=num_stages,
        flash_attention=flash_attention,
        recompute=recompute,
        tp_group=tp_group,
        device=device,
        dtype=dtype,
        split=split,
        sequence_parallel=sequence_parallel,
    )
    _init_parameters(model, seed=seed, tp_group=tp_group)
    return model


def build_full_model(
    spec: ModelSpec,
    *,
    flash_attention: bool,
    recompute: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StageModule:
    """The unsplit reference model: `build_stage(stage=0, num_stages=1)`."""
    return build_stage(
        spec,
        stage=0,
        num_stages=1,
        flash_attention=flash_attention,
        recompute=recompute,
        seed=seed,
        device=device,
        dtype=dtype,
    )
