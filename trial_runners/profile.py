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
medians. Forward and backward are timed separately, `repeats` times spread over `rounds` passes
through every measurement (each after `warmup` untimed runs), and the median is kept; the
backward of "layer" and "embed" gets a random output gradient, the head's is `loss.backward()`.
Parameter gradients accumulate across repetitions, as across the micro-batches of a step. The
forward runs under the executor's saved-tensor hooks (the exact activation count), as in a
trial. On CUDA the device is synchronised around every timed region.

On a CPU each thread count t is measured as a trial runs its ranks: in `cores // t` fresh
processes started side by side with the launcher's environment (`worker_env`), each timing every
measurement at t threads, so each is slowed by real twins exactly as a rank is by the other
ranks of its trial; their samples are pooled. (Measured in the parent instead, a process that
has run other work, the same parts timed up to ~15 % apart from a trial's ranks here.)

The optimizer: AdamW steps over one and over four layers' parameters give the step's fixed and
per-parameter time, at each thread count.

Activation bytes are counted by `ActivationTracker` exactly as the executor counts them (saved
storages, parameters and buffers excluded). A block's count includes its saved input, which in
a real stage is the previous block's (or the embeddings') output; the head's includes the last
block's output (saved by the final norm) and the targets; the embeddings' is the saved token
indices. So one micro-batch on a stage saves exactly embed (first stage) + layers x layer +
head (last stage) bytes; tests check this against real stages.

Communication (`measure_p2p`): gloo point-to-point between two local processes, giving
`cpu-local` its bandwidth (a large-message ping-pong), handoff latency and post time (a
pipeline's handoffs between a computing and a waiting rank); skipped (null) on CUDA.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autotune.config import DEVICES, RECOMPUTE, ModelSpec
from autotune.errors import ConfigError
from autotune.estimate.profiles import FORMAT, PARTS, VERSION, parse_profile
from trial_runners.launch import _die_with_parent, worker_env
from trial_runners.memory import ActivationTracker
from trial_runners.models import StageModule, build_stage

_ROOT = Path(__file__).resolve().parent.parent
COMM_SIZES = {"medium": 4 * 2**20, "large": 32 * 2**20}  # bytes per ping-pong message


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
    spec: ModelSpec, part: str, *, flash_attention: bool, recompute: str, device: torch.device
) -> StageModule:
    """The real stage module holding only `part` (see the module docstring)."""
    kw: dict[str, Any] = {"flash_attention": flash_attention, "recompute": recompute, "device": device}
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
        self.shape = (b, spec.seq_len)
        self.hidden = (b, spec.seq_len, spec.hidden_size)
        self.vocab = spec.vocab_size
        # Timed as the executor runs a micro-batch: its saved tensors counted by the same hooks.
        self.tracker = ActivationTracker.for_module(module)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.part == "embed":
            return torch.randint(0, self.vocab, self.shape, device=self.device), None
        x = torch.randn(self.hidden, device=self.device, requires_grad=True)
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
) -> dict[int, list[float]]:
    """Seconds of the trial's optimizer step (AdamW.step over parameters holding fresh gradients)
    over one layer's and over four layers' parameters, by parameter count."""
    times: dict[int, list[float]] = {}
    for copies in (1, 4):
        params = [
            p
            for _ in range(copies)
            for p in part_module(
                spec, "layer", flash_attention=True, recompute="none", device=device
            ).parameters()
        ]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
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


def _optimizer_fit(threads: int, times: dict[int, list[float]]) -> dict[str, Any]:
    """fixed_s + per_param_s x parameters through the medians at two parameter counts."""
    (small, t_small), (large, t_large) = sorted((n, statistics.median(ts)) for n, ts in times.items())
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
    step, gathered over several passes; medians at the end."""

    def __init__(self, spec: ModelSpec, device: torch.device, sync: Callable[[], None], *, warmup: int):
        self.spec, self.device, self.sync, self.warmup = spec, device, sync, warmup
        self.times: dict[tuple[Any, ...], tuple[list[float], list[float]]] = {}
        self.nbytes: dict[tuple[Any, ...], int] = {}
        self.optimizer_times: dict[int, dict[int, list[float]]] = {}

    def one_pass(
        self, threads: int, sizes: list[int], flash: list[bool], recompute: list[str], *, repeats: int
    ) -> None:
        """`repeats` timed runs of every part at `threads`, and of the optimizer step."""
        spec, dev = self.spec, self.device
        for fl, rc in itertools.product(dict.fromkeys(flash), dict.fromkeys(recompute)):
            modules = {
                part: part_module(spec, part, flash_attention=fl, recompute=rc, device=dev) for part in PARTS
            }
            for b in sizes:
                for part, module in modules.items():
                    p = _Part(spec, part, b, module, dev)
                    key = (part, b, fl, rc, threads)
                    if key not in self.nbytes:
                        self.nbytes[key] = p.activation_bytes()
                    fwd, bwd = _measure(p, warmup=self.warmup, repeats=repeats, sync=self.sync)
                    got = self.times.setdefault(key, ([], []))
                    got[0].extend(fwd)
                    got[1].extend(bwd)
        steps = _measure_optimizer(
            spec, dev, threads=threads, warmup=self.warmup, repeats=repeats, sync=self.sync
        )
        for n, ts in steps.items():
            self.optimizer_times.setdefault(threads, {}).setdefault(n, []).extend(ts)

    def to_json(self) -> dict[str, Any]:
        return {
            "times": [[list(k), fwd, bwd] for k, (fwd, bwd) in self.times.items()],
            "nbytes": [[list(k), n] for k, n in self.nbytes.items()],
            "optimizer": [[t, n, ts] for t, by_n in self.optimizer_times.items() for n, ts in by_n.items()],
        }

    def add(self, data: dict[str, Any]) -> None:
        """Pool another process's samples (`to_json`) into these."""
        for key, fwd, bwd in data["times"]:
            got = self.times.setdefault(tuple(key), ([], []))
            got[0].extend(fwd)
            got[1].extend(bwd)
        for key, n in data["nbytes"]:
            self.nbytes.setdefault(tuple(key), n)
        for t, n, ts in data["optimizer"]:
            self.optimizer_times.setdefault(t, {}).setdefault(n, []).extend(ts)

    def entries(self) -> list[dict[str, Any]]:
        return [
            {
                "part": part,
                "micro_batch_size": b,
                "flash_attention": fl,
                "recompute": rc,
                "threads": t,
                "fwd_s": statistics.median(fwd),
                "bwd_s": statistics.median(bwd),
                "activation_bytes": self.nbytes[(part, b, fl, rc, t)],
            }
            for (part, b, fl, rc, t), (fwd, bwd) in self.times.items()
        ]

    def optimizer(self) -> list[dict[str, Any]]:
        return [_optimizer_fit(t, times) for t, times in self.optimizer_times.items()]


def _run_side_by_side(
    folder: Path, argv: list[list[str]], env: dict[str, str], what: str, *, timeout: float | None = None
) -> None:
    """`python -m trial_runners.profile ARGS` for each ARGS in `argv`, all at once (their logs in
    `folder`); RuntimeError naming `what` and the failing process's last log line, or the
    timeout. The processes die with this one and are killed on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, args in enumerate(argv):
            log = open(folder / f"process{i}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "trial_runners.profile", *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(_ROOT),
                    preexec_fn=_die_with_parent,
                )
            )
            log.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for i, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=None if deadline is None else max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{what} did not finish within {timeout:g} s") from None
            if code != 0:
                tail = (folder / f"process{i}.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"{what} process {i} failed (exit {code}): {tail[-1] if tail else ''}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


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
) -> _Samples:
    """Every measurement at `threads`, its `repeats` timed runs spread over `rounds` passes
    through all of them, so a slow spell of a shared machine touches every entry alike."""
    collected = _Samples(spec, dev, sync, warmup=warmup)
    rng = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with _num_threads(threads):
            for r in range(rounds):
                per_round = repeats // rounds + (1 if r < repeats % rounds else 0)
                collected.one_pass(threads, sizes, flash, recompute, repeats=per_round)
    finally:
        torch.random.set_rng_state(rng)
    return collected


def _in_processes(spec: ModelSpec, task: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """`_measure_all(**task)` in `count` fresh processes at once (the launcher's environment for
    `count` ranks); each one's samples (`_Samples.to_json`)."""
    with tempfile.TemporaryDirectory(prefix="autotune-profile-") as tmp:
        folder = Path(tmp)
        (folder / "task.json").write_text(json.dumps({"model": spec.to_dict(), **task}))
        _run_side_by_side(
            folder, [["measure", tmp, str(i)] for i in range(count)], worker_env(count, "cpu"), "profile"
        )
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
) -> dict[str, Any]:
    """Measure `spec`'s parts on this device; returns the profile as a JSON-able dict.

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
    collected = _Samples(spec, dev, sync, warmup=warmup)
    for t in thread_counts:
        task: dict[str, Any] = {
            "threads": t, "sizes": sizes, "flash": list(flash), "recompute": list(recompute),
            "warmup": warmup, "repeats": repeats, "rounds": rounds,
        }  # fmt: skip
        if device == "cpu":
            twins = max(1, (os.cpu_count() or 1) // t)
            for samples in _in_processes(spec, task, twins):
                collected.add(samples)
        else:
            collected.add(_measure_all(spec, dev, sync, **task).to_json())
            twins = 1
        if progress is not None:
            for r in range(rounds):
                per_round = repeats // rounds + (1 if r < repeats % rounds else 0)
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
    profile = _document(spec, dev, comm=comm_figures, entries=entries, optimizer=optimizer)
    parse_profile(profile)  # the dict is exactly what load_profile accepts
    return profile


def _document(
    spec: ModelSpec,
    dev: torch.device,
    *,
    comm: dict[str, float] | None,
    entries: list[dict[str, Any]],
    optimizer: list[dict[str, Any]],
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
        "dtype": "float32",
        "torch": torch.__version__,
        "model": spec.to_dict(),
        "tp": 1,
        "comm": comm,
        "entries": entries,
        "optimizer": optimizer,
    }


# -- gloo point-to-point ----------------------------------------------------------------------------


def measure_p2p(*, warmup: int = 3, repeats: int = 10, timeout: float = 120.0) -> dict[str, float]:
    """Gloo send/recv between two local processes:
    {"p2p_bandwidth": B/s, "p2p_latency": s, "p2p_post": s}.

    Bandwidth: ping-pong (rank 0 sends, rank 1 sends it back) of a 4 MiB and a 32 MiB tensor
    (`repeats` times each after `warmup` round trips); half the median round trip is the one-way
    time, and bandwidth is the slope between the two, (32 MiB - 4 MiB) / (t32 - t4), so latency
    noise (on a busy machine, scheduler wake-ups of a few ms) cancels out.

    Latency and post: a pipeline's handoffs, as two pipeline stages make them (`_handoffs`):
    rank 0 computes, sends an activation-sized (`HANDOFF_BYTES`) message and computes again
    before it waits for the reply; rank 1 waits for it, computes, and replies. Both compute at
    the thread count a trial gives each of two ranks, so a message is sent by a busy rank to a
    waiting one, as in a pipeline, and the gloo threads compete with compute for the cores.
    `p2p_latency` is the median time from a send's post returning to the waiting receiver
    resuming, less the message's bytes over the bandwidth (`transfer_s` adds them back);
    `p2p_post` is the mean time of an `isend` or `irecv` call over `4 x repeats` handoffs each
    way (the mean: a step pays every call, the slow ones too). Here (2 cores) a post takes
    40-90 us, paid twice per micro-batch on a pipeline's critical stage; a handoff's latency
    0-50 us.
    """
    with tempfile.TemporaryDirectory(prefix="autotune-profile-comm-") as tmp:
        folder = Path(tmp)
        env = worker_env(2, "cpu")
        env["GLOO_SOCKET_IFNAME"] = "lo"
        args = [["p2p", tmp, str(rank), str(warmup), str(repeats)] for rank in range(2)]
        _run_side_by_side(folder, args, env, "gloo p2p measurement", timeout=timeout)
        measured = json.loads((folder / "p2p.json").read_text())
    extra = COMM_SIZES["large"] - COMM_SIZES["medium"]
    slope = measured["large"] - measured["medium"]
    # Where noise swamped the difference, the large message's average rate instead.
    bandwidth = extra / slope if slope > 0 else COMM_SIZES["large"] / measured["large"]
    latency = max(0.0, measured["handoff"] - HANDOFF_BYTES / bandwidth)
    return {"p2p_bandwidth": bandwidth, "p2p_latency": latency, "p2p_post": measured["post"]}


HANDOFF_BYTES = 64 * 2**10  # an activation of a small model's micro-batch
HANDOFF_COMPUTE_S = 0.002  # compute between handoffs, about a small layer's forward


def _compute(a: torch.Tensor, seconds: float) -> torch.Tensor:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a.T * 0.01)
    return a


def _handoffs(rank: int, count: int, warmup: int) -> list[list[float]]:
    """The pipeline pattern of `measure_p2p`, `count` handoffs each way after `warmup`: [this
    rank's isend call durations, its irecv call durations, when each of its sends' posts
    returned, when it began waiting for each receive, when that wait returned]. Times are
    `time.monotonic()`, one clock for both processes."""
    peer = 1 - rank
    msg = torch.zeros(HANDOFF_BYTES // 4)
    a = torch.randn(128, 128)
    posts: dict[Any, list[float]] = {dist.isend: [], dist.irecv: []}
    sent: list[float] = []
    waited: list[float] = []
    resumed: list[float] = []

    def post(fn: Callable[..., Any], tag: int) -> Any:
        t0 = time.monotonic()
        work = fn(msg, peer, tag=tag)
        t1 = time.monotonic()
        posts[fn].append(t1 - t0)
        return work, t1

    def wait(work: Any) -> tuple[float, float]:
        t0 = time.monotonic()
        work.wait()
        return t0, time.monotonic()

    for i in range(warmup + count):
        if rank == 0:  # forward, send the activation, the next compute, wait for the gradient
            a = _compute(a, HANDOFF_COMPUTE_S)
            send, t_sent = post(dist.isend, 2 * i)
            recv, _ = post(dist.irecv, 2 * i + 1)
            a = _compute(a, HANDOFF_COMPUTE_S)
            t_wait = wait(recv)
            send.wait()
        else:  # wait for the activation, compute, send the gradient
            recv, _ = post(dist.irecv, 2 * i)
            t_wait = wait(recv)
            a = _compute(a, HANDOFF_COMPUTE_S)
            send, t_sent = post(dist.isend, 2 * i + 1)
            send.wait()
        if i < warmup:
            for durations in posts.values():
                durations.clear()
            continue
        sent.append(t_sent)
        waited.append(t_wait[0])
        resumed.append(t_wait[1])
    return [posts[dist.isend], posts[dist.irecv], sent, waited, resumed]


def _p2p_worker(folder: str, rank: int, warmup: int, repeats: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # a trial's ranks when two share the cores
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        out: dict[str, float] = {}
        for name in ("medium", "large"):
            buf = torch.zeros(COMM_SIZES[name], dtype=torch.uint8)
            times = []
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times) / 2
        mine = torch.tensor(_handoffs(rank, 4 * repeats, warmup), dtype=torch.float64)
        if rank == 1:
            dist.send(mine, 0)
        else:
            theirs = torch.empty_like(mine)
            dist.recv(theirs, 1)
            isends, irecvs, sent, waited, resumed = mine.tolist()
            their_isends, their_irecvs, their_sent, their_waited, their_resumed = theirs.tolist()
            # Message i of rank 0 (sent at sent[i]) resumed rank 1 at their_resumed[i]; rank 1's
            # reply resumed rank 0 at resumed[i]. Only where the receiver was already waiting.
            pairs = [
                *zip(sent, their_waited, their_resumed, strict=True),
                *zip(their_sent, waited, resumed, strict=True),
            ]
            delays = [r - s for s, w, r in pairs if w <= s]
            out["handoff"] = statistics.median(delays) if delays else 0.0
            out["post"] = statistics.fmean(isends + irecvs + their_isends + their_irecvs)
        dist.barrier()
        if rank == 0:
            (Path(folder) / "p2p.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "p2p":
        _p2p_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) == 4 and sys.argv[1] == "measure":
        _measure_worker(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(
            "usage: python -m trial_runners.profile p2p FOLDER RANK WARMUP REPEATS | measure FOLDER INDEX"
        )
