"""Training batches for trials: synthetic tokens by default, or rows of a token file.

Each step's global batch is a pure function of (seed, step): every rank draws the same batch
and takes its own micro-batches with `microbatch`. Layout of the global batch, along dim 0:
[dp rank][micro-batch][row], so dp rank d's micro-batch k is the `micro_batch_size` rows from
(d * num_microbatches + k) * micro_batch_size, with num_microbatches = global / (micro * dp).
"""

from __future__ import annotations

import functools
import hashlib
import os
from stat import S_ISDIR, S_ISREG

import numpy as np
import torch
from torch import Tensor

from autotune.config import ModelSpec


def _generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"batch:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@functools.lru_cache(maxsize=8)
def _token_file(path: str, size: int, mtime_ns: int, vocab_size: int) -> np.memmap:
    """The file as a uint16 memmap, checked once per (path, size, mtime) for out-of-vocab tokens."""
    if size < 2 or size % 2:
        raise ValueError(f"token file {path!r} must hold uint16 tokens: its size is {size} bytes")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    chunk = 1 << 24
    for start in range(0, len(data), chunk):
        part = data[start : start + chunk]
        top = int(part.max())
        if top >= vocab_size:
            where = start + int(np.argmax(part >= vocab_size))
            raise ValueError(
                f"token file {path!r} has token {int(data[where])} at position {where}, "
                f"outside the model's vocabulary (vocab_size {vocab_size}; max token {top})"
            )
    return data


def check_token_file(path: str, spec: ModelSpec) -> np.memmap:
    """The token file as uint16, or ValueError saying why it cannot feed `spec`."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ValueError(f"cannot read token file {path!r}: {exc.strerror}") from None
    if S_ISDIR(stat.st_mode):
        raise ValueError(f"{path!r} is a directory, not a token file")
    if not S_ISREG(stat.st_mode):
        raise ValueError(f"{path!r} is not a regular file (a device, pipe or socket), not a token file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read token file {path!r}: permission denied")
    data = _token_file(os.fspath(path), stat.st_size, stat.st_mtime_ns, spec.vocab_size)
    if len(data) < spec.seq_len + 1:
        raise ValueError(
            f"token file {path!r} is too short: it has {len(data)} tokens, a row needs "
            f"seq_len + 1 = {spec.seq_len + 1}"
        )
    return data


def batch_for_step(
    spec: ModelSpec, *, seed: int, step: int, global_batch_size: int, data_path: str | None = None
) -> tuple[Tensor, Tensor]:
    """(tokens, targets), both int64 (global_batch_size, seq_len); targets are tokens shifted by one.

    Synthetic: uniform tokens below vocab_size drawn from a generator seeded by (seed, step).
    With `data_path` (a flat uint16 token file, nanoGPT's train.bin): rows of seq_len + 1
    tokens from offsets drawn the same way.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    T, g = spec.seq_len, _generator(seed, step)
    if data_path is None:
        rows = torch.randint(0, spec.vocab_size, (global_batch_size, T + 1), generator=g)  # (B, T+1)
    else:
        data = check_token_file(data_path, spec)
        offsets = torch.randint(0, len(data) - T, (global_batch_size,), generator=g).tolist()
        rows = torch.from_numpy(np.stack([data[o : o + T + 1].astype(np.int64) for o in offsets]))  # (B, T+1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def microbatch(
    tokens: Tensor, targets: Tensor, *, index: int, micro_batch_size: int, dp_rank: int, dp: int
) -> tuple[Tensor, Tensor]:
    """Micro-batch `index` of data-parallel rank `dp_rank`: rows (dp_rank * num + index) * micro_batch_size
    onwards, num = global_batch_size / (micro_batch_size * dp)."""
    rows = tokens.shape[0]
    per_rank = micro_batch_size * dp
    if micro_batch_size < 1 or dp < 1 or rows % per_rank:
        raise ValueError(
            f"global batch of {rows} rows does not split into micro-batches of {micro_batch_size} x dp {dp} "
            f"({rows} % {per_rank} = {rows % per_rank if per_rank > 0 else 'n/a'})"
        )
    num = rows // per_rank
    if not 0 <= index < num or not 0 <= dp_rank < dp:
        raise ValueError(f"micro-batch {index} of dp rank {dp_rank}: need index < {num} and dp_rank < {dp}")
    start = (dp_rank * num + index) * micro_batch_size
    return tokens[start : start + micro_batch_size], targets[start : start + micro_batch_size]
