"""`autotune profile`: measure one layer, the embeddings and the head on this device.

For each micro-batch size, flash attention on/off, recompute mode and thread count, three parts
are run forward and backward on their own, as the real stage modules (`build_stage`):

- "layer": the middle stage of a 3-stage split of the model cut to 3 layers, i.e. exactly one
  block, fed hidden states (B, T, H) that require grad, as a middle pipeline stage is;
- "embed": stage 0 of a 2-stage split with its block removed: token (and position) embeddings
  only, fed int64 tokens (B, T);
- "head": the last stage of a 2-stage split with its block removed: final norm, LM head and mean
  cross-entropy, fed hidden states (B, T, H) and int64 targets with their own storage.

Each part is timed directly (no subtraction), so no part's time is a difference of two noisy
figures. Forward and backward are timed separately, `repeats` times spread over `rounds` passes
through every measurement (each after `warmup` untimed runs), and the mean is kept (a step pays
every operation's time, the slow ones too: here the mean is 2-4 % above the median); the
backward of "layer" and "embed" gets a random output gradient, the head's is `loss.backward()`.
Parameter gradients accumulate across repetitions, as across the micro-batches of a step. The
forward runs under the executor's saved-tensor hooks (the exact activation count), as in a
trial. On CUDA the device is synchronised around every timed region.

On a CPU each thread count t is measured as a trial runs its ranks: in `cores // t` fresh
processes started side by side with the launcher's environment (`worker_env`), each timing every
measurement at t threads, so each is slowed by real twins exactly as a rank is by the other
ranks of its trial; each figure is the slowest process's mean, since a step waits for its
slowest rank and the cores of a shared machine are not alike (here one of two processes ran up
to ~40 % slower than its twin, and pooled samples under-predicted pp=2 trials by ~10 %).
(Measured in the parent instead, a process that has run other work, the same parts timed up to
~15 % apart from a trial's ranks here.)

The optimizer: AdamW steps over one and over four layers' parameters give the step's fixed and
per-parameter time, at each thread count.

Activation bytes are counted by `ActivationTracker` exactly as the executor counts them (saved
storages, parameters and buffers excluded). A block's count includes its saved input, which in
a real stage is the previous block's (or the embeddings') output; the head's includes the last
block's output (saved by the final norm) and the targets; the embeddings' is the saved token
indices. So one micro-batch on a stage saves exactly embed (first stage) + layers x layer +
head (last stage) bytes; tests check this against real stages.

Communication (`trial_runners.comm_profile.measure_p2p`): gloo point-to-point between two local
processes, giving `cpu-local` its bandwidth (a large-message ping-pong), handoff latency (a
pipeline's handoffs between a computing and a waiting rank) and post time (the executor's send
and receive actions in a two-stage pipeline); skipped (null) on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autotune.config import DEVICES, RECOMPUTE, ModelSpec
from autotune.errors import ConfigError
from autotune.estimate.profiles import FORMAT, PARTS, VERSION, parse_profile
from trial_runners.comm_profile import measure_p2p
from trial_runners.launch import job_folder, run_side_by_side, worker_env
from trial_runners.memory import ActivationTracker
from trial_runners.models import StageModule, build_stage
from trial_runners.optimizer import adamw
from trial_runners.tensor_parallel import ShardShapes
from trial_runners.worker import TORCH_DTYPES


def default_threads() -> list[int]:
    """The thread counts the trial launcher gives ranks here: cpu_count // world_size, at least 1."""
    cores = os.cpu_count() or 1
    return sorted({max(1, cores // w) for w in range(1, cores + 1)})


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def part_module(
    spec: ModelSpec,
    part: str,
    *,
    flash_attention: bool,
    recompute: str,
    device: torch.device,
    tp: int = 1,
    dtype: torch.dtype = torch.float32,
) -> StageModule:
    """The real stage module holding only `part` (see the module docstring); with `tp` > 1, one
    tensor-parallel rank's shard of it (`ShardShapes`: rank 0's, collectives skipped)."""
    kw: dict[str, Any] = {
        "flash_attention": flash_attention, "recompute": recompute, "device": device, "dtype": dtype,
        "tp_group": ShardShapes(tp) if tp > 1 else None,
    }  # fmt: skip
    if part == "layer":
        return build_stage(dataclasses.replace(spec, num_layers=3), stage=1, num_stages=3, **kw)
    if part not in ("embed", "head"):
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    module = build_stage(
        dataclasses.replace(spec, num_layers=2), stage=0 if part == "embed" else 1, num_stages=2, **kw
    )
    module.layers = nn.ModuleDict()  # embeddings or head alone
    return module


class _Part:
    """One part's module and the inputs of a micro-batch of size b."""

    def __init__(self, spec: ModelSpec, part: str, b: int, module: StageModule, device: torch.device):
        self.part, self.module, self.device = part, module, device
        self.dtype = next(module.parameters()).dtype
        self.shape = (b, spec.seq_len)
        self.hidden = (b, spec.seq_len, spec.hidden_size)
        self.vocab = spec.vocab_size
        # Timed as the executor runs a micro-batch: its saved tensors counted by the same hooks.
        self.tracker = ActivationTracker.for_module(module)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.part == "embed":
            return torch.randint(0, self.vocab, self.shape, device=self.device), None
        x = torch.randn(self.hidden, device=self.device, dtype=self.dtype, requires_grad=True)
        if self.part == "head":
            return x, torch.randint(0, self.vocab, self.shape, device=self.device)  # own storage
        return x, None

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        with self.tracker.capture(0):
            return self.module(x, targets)  # type: ignore[no-any-return]

    def backward(self, out: torch.Tensor, grad: torch.Tensor | None) -> None:
        if grad is None:
            out.backward()
        else:
            torch.autograd.backward(out, grad)
        self.tracker.release(0)

    def activation_bytes(self) -> int:
        tracker = ActivationTracker.for_module(self.module)
        x, targets = self.inputs()
        with tracker.capture(0):
            out = self.module(x, targets)
        del out
        return tracker.sizes.get(0, 0)


def _timed(sync: Callable[[], None], fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, result


def _measure(
    p: _Part, *, warmup: int, repeats: int, sync: Callable[[], None]
) -> tuple[list[float], list[float]]:
    """Forward and backward seconds of `repeats` runs after `warmup` untimed ones."""
    fwd: list[float] = []
    bwd: list[float] = []
    for i in range(warmup + repeats):
        x, targets = p.inputs()
        tf, out = _timed(sync, lambda x=x, targets=targets: p.forward(x, targets))  # type: ignore[misc]
        grad = None if p.part == "head" else torch.randn_like(out)
        tb, _ = _timed(sync, lambda out=out, grad=grad: p.backward(out, grad))  # type: ignore[misc]
        del out, x, targets, grad
        if i >= warmup:
            fwd.append(tf)
            bwd.append(tb)
    return fwd, bwd


def _measure_optimizer(
    spec: ModelSpec,
    device: torch.device,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    sync: Callable[[], None],
    tp: int = 1,
) -> dict[int, list[float]]:
    """Seconds of the trial's optimizer step (AdamW.step over fp32 parameters holding fresh
    gradients: the parameters, or in mixed precision their masters) over one layer's and over four
    layers' parameters (one tp rank's shard), by parameter count."""
    times: dict[int, list[float]] = {}
    for copies in (1, 4):
        params = [
            p
            for _ in range(copies)
            for p in part_module(
                spec, "layer", flash_attention=True, recompute="none", device=device, tp=tp
            ).parameters()
        ]
        optimizer = adamw(params, 1e-3)
        samples = []
        for i in range(warmup + repeats):
            optimizer.zero_grad(set_to_none=True)
            for p in params:
                p.grad = torch.randn_like(p)
            elapsed, _ = _timed(sync, optimizer.step)
            if i >= warmup:
                samples.append(elapsed)
        times[sum(p.numel() for p in params)] = samples
    return times


def _optimizer_fit(threads: int, times: dict[int, float]) -> dict[str, Any]:
    """fixed_s + per_param_s x parameters through the times at two parameter counts."""
    (small, t_small), (large, t_large) = sorted(times.items())
    per_param = max(0.0, (t_large - t_small) / (large - small))
    fixed = max(0.0, t_small - per_param * small)
    return {"threads": threads, "fixed_s": fixed, "per_param_s": per_param}


def _describe(e: dict[str, Any]) -> str:
    flash = "on " if e["flash_attention"] else "off"
    return (
        f"{e['part']:5s} mbs {e['micro_batch_size']} flash {flash} recompute {e['recompute']:9s} "
        f"threads {e['threads']}: fwd {e['fwd_s'] * 1e3:.3f} ms, bwd {e['bwd_s'] * 1e3:.3f} ms, "
        f"{e['activation_bytes']} activation bytes"
    )


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_args(
    micro_batch_sizes: list[int], device: str, threads: list[int], flash: list[bool], recompute: list[str]
) -> None:
    if not micro_batch_sizes:
        raise ConfigError("--micro-batch-sizes", "needs at least one micro-batch size")
    for b in micro_batch_sizes:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ConfigError("--micro-batch-sizes", f"must be positive integers, got {b!r}")
    if device not in DEVICES:
        raise ConfigError("--device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda was asked for but torch sees no GPU")
    if not threads or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in threads):
        raise ConfigError("--threads", f"must be positive integers, got {threads!r}")
    if not flash or any(not isinstance(f, bool) for f in flash):
        raise ConfigError("--flash-attention", f"must be a non-empty list of booleans, got {flash!r}")
    if not recompute or any(r not in RECOMPUTE for r in recompute):
        raise ConfigError("--recompute", f"must be among {', '.join(RECOMPUTE)}, got {recompute!r}")


class _Samples:
    """Timings of every (part, micro-batch size, flash, recompute, threads) and of the optimizer
    step, gathered over several passes, by process (`add` brings in another process's); at the
    end each figure is the mean of the slowest process."""

    def __init__(
        self,
        spec: ModelSpec,
        device: torch.device,
        sync: Callable[[], None],
        *,
        warmup: int,
        tp: int = 1,
        dtype: str = "fp32",
    ):
        self.spec, self.device, self.sync, self.warmup = spec, device, sync, warmup
        self.tp, self.dtype = tp, TORCH_DTYPES[dtype]
        # key -> one (forward samples, backward samples) per process
        self.times: dict[tuple[Any, ...], list[tuple[list[float], list[float]]]] = {}
        self.nbytes: dict[tuple[Any, ...], int] = {}
        # threads -> parameter count -> one list of samples per process
        self.optimizer_times: dict[int, dict[int, list[list[float]]]] = {}

    def one_pass(
        self, threads: int, sizes: list[int], flash: list[bool], recompute: list[str], *, repeats: int
    ) -> None:
        """`repeats` timed runs of every part at `threads`, and of the optimizer step (this
        process's samples: the first process of every figure)."""
        spec, dev = self.spec, self.device
        for fl, rc in itertools.product(dict.fromkeys(flash), dict.fromkeys(recompute)):
            modules = {
                part: part_module(
                    spec, part, flash_attention=fl, recompute=rc, device=dev, tp=self.tp, dtype=self.dtype
                )
                for part in PARTS
            }
            for b in sizes:
                for part, module in modules.items():
                    p = _Part(spec, part, b, module, dev)
                    key = (part, b, fl, rc, threads)
                    if key not in self.nbytes:
                        self.nbytes[key] = p.activation_bytes()
                    fwd, bwd = _measure(p, warmup=self.warmup, repeats=repeats, sync=self.sync)
                    got = self.times.setdefault(key, [([], [])])
                    got[0][0].extend(fwd)
                    got[0][1].extend(bwd)
        steps = _measure_optimizer(
            spec, dev, threads=threads, warmup=self.warmup, repeats=repeats, sync=self.sync, tp=self.tp
        )
        for n, ts in steps.items():
            self.optimizer_times.setdefault(threads, {}).setdefault(n, [[]])[0].extend(ts)

    def to_json(self) -> dict[str, Any]:
        """This process's samples (a `_Samples` filled by `one_pass` only)."""
        return {
            "times": [[list(k), fwd, bwd] for k, [(fwd, bwd)] in self.times.items()],
            "nbytes": [[list(k), n] for k, n in self.nbytes.items()],
            "optimizer": [[t, n, ts] for t, by_n in self.optimizer_times.items() for n, [ts] in by_n.items()],
        }

    def add(self, data: dict[str, Any]) -> None:
        """Another process's samples (`to_json`), kept apart from the others'."""
        for key, fwd, bwd in data["times"]:
            self.times.setdefault(tuple(key), []).append((fwd, bwd))
        for key, n in data["nbytes"]:
            self.nbytes.setdefault(tuple(key), n)
        for t, n, ts in data["optimizer"]:
            self.optimizer_times.setdefault(t, {}).setdefault(n, []).append(ts)

    def entries(self) -> list[dict[str, Any]]:
        """Each forward and backward time: the largest of the processes' means."""
        return [
            {
                "part": part,
                "micro_batch_size": b,
                "flash_attention": fl,
                "recompute": rc,
                "threads": t,
                "fwd_s": _slowest(fwd for fwd, _ in by_process),
                "bwd_s": _slowest(bwd for _, bwd in by_process),
                "activation_bytes": self.nbytes[(part, b, fl, rc, t)],
            }
            for (part, b, fl, rc, t), by_process in self.times.items()
        ]

    def optimizer(self) -> list[dict[str, Any]]:
        return [
            _optimizer_fit(t, {n: _slowest(samples) for n, samples in by_n.items()})
            for t, by_n in self.optimizer_times.items()
        ]


def _slowest(by_process: Iterable[list[float]]) -> float:
    """The largest of the processes' mean times: ranks measured side by side as a trial's run
    at different speeds (the cores of a shared machine are not alike; here one process ran up to
    ~40 % slower than its twin), and a step waits for its slowest rank; the mean, as a step pays
    every operation's time, the slow ones too."""
    return max(statistics.fmean(samples) for samples in by_process)


def _split(repeats: int, rounds: int) -> list[int]:
    """The timed runs of each pass when `repeats` are spread over `rounds` passes."""
    return [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]


def _measure_all(
    spec: ModelSpec,
    dev: torch.device,
    sync: Callable[[], None],
    *,
    threads: int,
    sizes: list[int],
    flash: list[bool],
    recompute: list[str],
    warmup: int,
    repeats: int,
    rounds: int,
    tp: int = 1,
    dtype: str = "fp32",
) -> _Samples:
    """Every measurement at `threads`, its `repeats` timed runs spread over `rounds` passes
    through all of them, so a slow spell of a shared machine touches every entry alike."""
    collected = _Samples(spec, dev, sync, warmup=warmup, tp=tp, dtype=dtype)
    rng = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with _num_threads(threads):
            for per_round in _split(repeats, rounds):
                collected.one_pass(threads, sizes, flash, recompute, repeats=per_round)
    finally:
        torch.random.set_rng_state(rng)
    return collected


def _in_processes(spec: ModelSpec, task: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """`_measure_all(**task)` in `count` fresh processes at once (the launcher's environment for
    `count` ranks); each one's samples (`_Samples.to_json`)."""
    with job_folder("autotune-profile-") as folder:
        tmp = str(folder)
        (folder / "task.json").write_text(json.dumps({"model": spec.to_dict(), **task}))
        argv = [["measure", tmp, str(i)] for i in range(count)]
        run_side_by_side("trial_runners.profile", argv, folder, worker_env(count, "cpu"), "profile")
        return [json.loads((folder / f"samples{i}.json").read_text()) for i in range(count)]


def _measure_worker(folder: str, index: int) -> None:
    task = json.loads((Path(folder) / "task.json").read_text())
    spec = ModelSpec(**task.pop("model"))
    dev = torch.device("cpu")
    samples = _measure_all(spec, dev, lambda: None, **task)
    (Path(folder) / f"samples{index}.json").write_text(json.dumps(samples.to_json()))


def run_profile(
    spec: ModelSpec,
    *,
    micro_batch_sizes: list[int],
    device: str = "cpu",
    threads: list[int] | None = None,
    flash: list[bool] = [True, False],  # noqa: B006 - read only
    recompute: list[str] = ["none", "selective", "full"],  # noqa: B006 - read only
    warmup: int = 2,
    repeats: int = 5,
    rounds: int = 3,
    progress: Callable[[str], None] | None = None,
    comm: bool = True,
    tp: int = 1,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Measure `spec`'s parts on this device; returns the profile as a JSON-able dict.

    `tp` > 1: the parts as one rank of a tp group of that size holds them (its shard of every
    split layer, collectives skipped: what `estimate` adds from the links), recorded as the
    profile's `tp`; `dtype` (fp32 or bf16) the parts' parameters and activations.

    `threads` (CPU): torch thread counts to measure at; default `default_threads()`. On CUDA the
    default is the current thread count only. `comm=False` skips the gloo measurement (null).
    The `repeats` timed runs of each measurement are split over `rounds` passes through all of
    them (each pass with its own warm-up). `progress` gets one line per pass and thread count,
    then one per entry (part, micro-batch size, flash, recompute, threads) and per optimizer fit.
    """
    sizes = sorted(set(micro_batch_sizes))
    if threads is None:
        threads = default_threads() if device == "cpu" else [torch.get_num_threads()]
    thread_counts = sorted(set(threads))
    _check_args(sizes, device, thread_counts, list(flash), list(recompute))
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(dev)) if device == "cuda" else (lambda: None)
    rounds = max(1, min(rounds, repeats))
    collected = _Samples(spec, dev, sync, warmup=warmup, tp=tp, dtype=dtype)
    for t in thread_counts:
        task: dict[str, Any] = {
            "threads": t, "sizes": sizes, "flash": list(flash), "recompute": list(recompute),
            "warmup": warmup, "repeats": repeats, "rounds": rounds, "tp": tp, "dtype": dtype,
        }  # fmt: skip
        if device == "cpu":
            twins = max(1, (os.cpu_count() or 1) // t)
            for samples in _in_processes(spec, task, twins):
                collected.add(samples)
        else:
            collected.add(_measure_all(spec, dev, sync, **task).to_json())
            twins = 1
        if progress is not None:
            for r, per_round in enumerate(_split(repeats, rounds)):
                progress(
                    f"round {r + 1} of {rounds}, threads {t}: {per_round} timed runs of each part "
                    f"in each of {twins} process{'es' if twins > 1 else ''}"
                )
    entries = collected.entries()
    optimizer = collected.optimizer()
    if progress is not None:
        for entry in entries:
            progress(_describe(entry))
        for o in optimizer:
            progress(
                f"optimizer threads {o['threads']}: {o['fixed_s'] * 1e3:.3f} ms + "
                f"{o['per_param_s'] * 1e9:.3f} ns per parameter"
            )
    comm_figures = None
    if comm and device == "cpu":
        comm_figures = measure_p2p()
        if progress is not None:
            progress(
                f"gloo p2p: handoff latency {comm_figures['p2p_latency'] * 1e6:.1f} us, post "
                f"{comm_figures['p2p_post'] * 1e6:.1f} us, "
                f"bandwidth {comm_figures['p2p_bandwidth'] / 1e9:.2f} GB/s"
            )
    profile = _document(
        spec, dev, comm=comm_figures, entries=entries, optimizer=optimizer, tp=tp, dtype=dtype
    )
    parse_profile(profile)  # the dict is exactly what load_profile accepts
    return profile


def _document(
    spec: ModelSpec,
    dev: torch.device,
    *,
    comm: dict[str, float] | None,
    entries: list[dict[str, Any]],
    optimizer: list[dict[str, Any]],
    tp: int = 1,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """The profile file's JSON object (see `autotune.estimate.profiles`)."""
    cuda = dev.type == "cuda"
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {
            "type": dev.type,
            "name": torch.cuda.get_device_name(dev) if cuda else cpu_name(),
            "count": torch.cuda.device_count() if cuda else (os.cpu_count() or 1),
        },
        "dtype": str(TORCH_DTYPES[dtype]).removeprefix("torch."),
        "torch": torch.__version__,
        "model": spec.to_dict(),
        "tp": tp,
        "comm": comm,
        "entries": entries,
        "optimizer": optimizer,
    }


# -- gloo point-to-point ----------------------------------------------------------------------------


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "measure":
        _measure_worker(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m trial_runners.profile measure FOLDER INDEX")
