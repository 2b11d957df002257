"""Start one process per rank, watch them, and turn what they wrote into a trial result.

No process outlives the launcher: all ranks share one process group that is killed as a whole
on any failure, timeout or exit, and each rank asks the kernel to kill it if the launcher dies
(PR_SET_PDEATHSIG), even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.config import TrialConfig
from autotune.results import StageResult, Status, TrialResult
from autotune.timeline import kept

_ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class JobOutcome:
    """What a job's ranks left behind: per-run per-rank results, or the failure."""

    status: str  # ok | oom | failed | timeout
    error: str | None
    results: list[list[dict[str, Any]]] = field(default_factory=list)  # [run][rank]
    failed_run: int | None = None


_OWNER = "owner.json"  # in every job folder: who made it (host, pid, the pid's start time)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22: starttime


def _orphaned(folder: Path, host: str) -> bool:
    """A job folder whose maker, on this host, is gone (killed outright, so it could not clean
    up); a folder of another host, of a live process or without an owner file is kept."""
    try:
        owner = json.loads((folder / _OWNER).read_text())
        pid, started = int(owner["pid"]), owner["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return owner.get("host") == host and _start_time(pid) != started


@contextlib.contextmanager
def job_folder(prefix: str, workdir: str | None = None) -> Iterator[Path]:
    """A temporary folder for one job's files, removed when the block ends (an exception,
    Ctrl-C or SIGTERM included). Folders that jobs killed outright (SIGKILL) left behind in the
    same place are removed first, once their maker is known to be gone."""
    parent = Path(workdir or tempfile.gettempdir())
    host = socket.gethostname()
    for old in parent.glob("autotune-*"):
        if old.is_dir() and _orphaned(old, host):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=workdir) as tmp:
        folder = Path(tmp)
        owner = {"host": host, "pid": os.getpid(), "start": _start_time(os.getpid())}
        (folder / _OWNER).write_text(json.dumps(owner))
        yield folder


def _spawn(cmd: list[str], log: Path, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start `cmd` in the project root, its output going to `log`; it dies with this process."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(_ROOT), preexec_fn=_die_with_parent,
            **kwargs,
        )  # fmt: skip


def worker_env(world_size: int, device: str, *, local: bool = True) -> dict[str, str]:
    """The ranks' environment; `local`: every rank on this machine (gloo over loopback)."""
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // world_size)))
    # glibc's default allocator, as real training runs: MALLOC_MMAP_THRESHOLD_=65536 would make
    # RSS follow freed activations but costs ~40% of CPU compute, and the accounting uses
    # saved-tensor hooks, not RSS. Profiles are measured under the same allocator.
    if device == "cpu" and local:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_side_by_side(
    module: str,
    argv: list[list[str]],
    folder: Path,
    env: dict[str, str],
    what: str,
    *,
    timeout: float | None = None,
) -> None:
    """`python -m MODULE ARGS` for each ARGS in `argv`, all at once (their logs in `folder`), for
    measurements that run beside each other (unlike `run_job`, no ranks or result files);
    RuntimeError naming `what` and the failing process's last log line, or the timeout. The
    processes die with this one and are killed on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, args in enumerate(argv):
            procs.append(_spawn([sys.executable, "-m", module, *args], folder / f"process{i}.log", env))
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


def run_job(
    runs: list[dict[str, Any]],
    *,
    world_size: int,
    timeout: float,
    device: str = "cpu",
    workdir: str | None = None,
    ranks: list[int] | None = None,
    init_method: str | None = None,
) -> JobOutcome:
    """Run `runs` (each {"config": TrialConfig.to_dict(), "steps", "seed", ...}) on fresh ranks.

    By default every rank runs here and they meet through a file; `ranks` starts only those
    (the rest run on other nodes) and `init_method` (`tcp://HOST:PORT`) is where all meet.
    Results are per run, one per local rank, in `ranks` order.
    """
    local = list(range(world_size)) if ranks is None else ranks
    with job_folder("autotune-trial-", workdir) as folder:
        threads = max(1, (os.cpu_count() or 1) // len(local))
        job = {
            "world_size": world_size,
            "init_file": str(folder / "rendezvous"),
            "init_method": init_method,
            "device": device,
            "threads": threads,
            "runs": runs,
        }
        (folder / "job.json").write_text(json.dumps(job))
        env = worker_env(len(local), device, local=init_method is None)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in local:
                cmd = [sys.executable, "-m", "trial_runners.worker", str(folder / "job.json"), str(rank)]
                group = procs[0].pid if procs else 0
                procs.append(_spawn(cmd, folder / f"rank{rank}.log", env, process_group=group))
            status, error = _watch(procs, folder, timeout, local)
        finally:
            _kill_all(procs)
        if status != "ok":
            failed = _failed_run(folder)
            return JobOutcome(status, error, failed_run=failed)
        results = [
            [json.loads((folder / f"run{i}.rank{r}.json").read_text()) for r in local]
            for i in range(len(runs))
        ]
        return JobOutcome("ok", None, results)


def _watch(
    procs: list[subprocess.Popen[bytes]], folder: Path, timeout: float, ranks: list[int]
) -> tuple[str, str | None]:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return "ok", None
        bad = [(r, c) for r, c in zip(ranks, codes, strict=True) if c is not None and c != 0]
        if bad:
            time.sleep(0.05)  # let a rank that failed cleanly finish writing its status
            return _diagnose(folder, bad)
        if time.monotonic() > deadline:
            return "timeout", f"trial did not finish within {timeout:g} s (killed all {len(procs)} ranks)"
        time.sleep(0.02)


def _diagnose(folder: Path, bad: list[tuple[int, int]]) -> tuple[str, str]:
    """The root cause: an out-of-memory rank, else a rank that died without a word (its peers
    then fail on broken connections), else the first rank's recorded error."""
    statuses = {
        int(p.name[len("status.rank") : -len(".json")]): json.loads(p.read_text())
        for p in folder.glob("status.rank*.json")
    }
    for data in statuses.values():
        if data["status"] == "oom":
            return "oom", data["error"]
    for rank, code in bad:
        if rank not in statuses:
            reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            tail = _log_tail(folder / f"rank{rank}.log")
            return "failed", f"rank {rank} died ({reason}){': ' + tail if tail else ''}"
    first = statuses[min(statuses)]
    return first["status"], first["error"]


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _failed_run(folder: Path) -> int | None:
    for path in folder.glob("status.rank*.json"):
        return int(json.loads(path.read_text())["run"])
    return None


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    if not procs:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(procs[0].pid, signal.SIGKILL)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def summarize(
    cfg: TrialConfig, ranks: list[dict[str, Any]], *, flops_per_token: float, peak_flops: float | None
) -> TrialResult:
    """The ok trial result of one run of `cfg`, from its per-rank results (any order)."""
    steps = len(ranks[0]["step_times"])
    per_step = [max(r["step_times"][i] for r in ranks) for i in range(steps)]
    measured = per_step[1:] or per_step
    step_time = statistics.median(measured)
    tokens = cfg.tokens_per_step
    achieved = flops_per_token * tokens / step_time
    last = next(r for r in ranks if r["stage"] == cfg.pp - 1 and r["tp_rank"] == 0 and r["dp_rank"] == 0)
    stages = []
    for s in range(cfg.pp):
        mine = [r for r in ranks if r["stage"] == s]
        stages.append(
            StageResult(
                stage=s,
                peak_activation_bytes=max(r["peak_activation_bytes"] for r in mine),
                peak_memory_bytes=max(
                    r["peak_activation_bytes"] + r["static_bytes"] + (r["device_peak_bytes"] or 0)
                    for r in mine
                ),
                evicted_bytes=max(r["evicted_bytes"] for r in mine),
            )
        )
    timeline = [
        {"stage": r["stage"], "label": label, "start": start, "end": end, "kind": kind}
        for r in sorted(ranks, key=lambda r: r["stage"])
        if r["tp_rank"] == 0 and r["dp_rank"] == 0
        for label, start, end, kind in r.get("timeline", ())
    ]
    return TrialResult(
        status=Status.OK,
        error=None,
        config=cfg.to_dict(),
        step_time_s=step_time,
        tokens_per_s=tokens / step_time,
        achieved_tflops=achieved / 1e12,
        mfu=achieved / (peak_flops * cfg.world_size) if peak_flops else None,
        losses=tuple(last["losses"]),
        stages=tuple(stages),
        timeline=tuple(kept(timeline)),
    )
