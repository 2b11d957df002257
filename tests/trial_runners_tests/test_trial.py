"""`autotune trial` end to end: the JSON contract, out-of-memory, crashes, hangs, and that no
process outlives the command."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autotune.config import TrialConfig, load_model
from tests.autotune_tests.test_results import CONTRACT_KEYS
from trial_runners.trial import run_trial

TRIAL = [sys.executable, "-m", "autotune.cli", "trial", "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[2]


def worker_pids() -> list[int]:
    """Live trial worker processes on this machine (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"trial_runners.worker" in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


def cli_trial(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict:
    proc = subprocess.run(
        [*TRIAL, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one JSON object on stdout"
    return json.loads(lines[0])


def test_json_contract() -> None:
    out = cli_trial(
        "--model",
        "tiny-llama",
        "--pp",
        "2",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--schedule",
        "1f1b",
        "--steps",
        "2",
    )
    assert out["status"] == "ok" and out["error"] is None
    assert list(out) == list(CONTRACT_KEYS)
    cfg = out["config"]
    assert cfg["model"] == "tiny-llama" and cfg["world_size"] == 2 and cfg["num_microbatches"] == 4
    assert cfg["flash_attention"] is True and cfg["recompute"] == "none" and cfg["device"] == "cpu"
    assert out["step_time_s"] > 0
    assert out["tokens_per_s"] == pytest.approx(8 * 32 / out["step_time_s"])
    assert out["achieved_tflops"] > 0 and out["mfu"] is None  # a CPU's peak is unknown
    assert len(out["losses"]) == 3  # the warm-up, then two measured steps
    assert out["losses"][0] == pytest.approx(math.log(256), rel=0.02)  # uniform synthetic tokens, fresh init
    assert [s["stage"] for s in out["stages"]] == [0, 1]
    for stage in out["stages"]:
        assert set(stage) == {"stage", "peak_activation_bytes", "peak_memory_bytes", "evicted_bytes"}
        assert stage["peak_memory_bytes"] > stage["peak_activation_bytes"] > 0
        assert stage["evicted_bytes"] == 0


def test_token_file(tmp_path: Path) -> None:
    good = tmp_path / "train.bin"
    np.arange(4096, dtype=np.uint16).__mod__(256).astype(np.uint16).tofile(good)
    out = cli_trial("--model", "tiny-gpt", "--data", str(good), "--steps", "1")
    assert out["status"] == "ok"
    bad = tmp_path / "bad.bin"
    np.full(100, 300, dtype=np.uint16).tofile(bad)
    for path, rule in ((bad, "outside the model's vocabulary"), (tmp_path / "none.bin", "cannot read")):
        proc = subprocess.run(
            [*TRIAL, "--model", "tiny-gpt", "--data", str(path)], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith("autotune: error: --data:") and rule in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin", "train.bin"]


def test_memory_limit_between_peaks_ooms_1f1b_and_trains_bpipe() -> None:
    """BPipe matters: the same configuration under a cap between the two schedules' peaks."""
    common = ["--model", "tiny-gpt", "--pp", "4", "--num-microbatches", "8", "--steps", "1"]
    free = {s: cli_trial(*common, "--schedule", s) for s in ("1f1b", "bpipe")}
    peak = {s: max(st["peak_memory_bytes"] for st in r["stages"]) for s, r in free.items()}
    assert peak["bpipe"] < peak["1f1b"]
    limit = (peak["bpipe"] + peak["1f1b"]) // 2
    capped = {s: cli_trial(*common, "--schedule", s, "--memory-limit", str(limit)) for s in ("1f1b", "bpipe")}
    assert capped["1f1b"]["status"] == "oom"
    assert "memory limit" in capped["1f1b"]["error"] and "\n" not in capped["1f1b"]["error"]
    assert capped["bpipe"]["status"] == "ok"
    assert capped["bpipe"]["losses"] == free["1f1b"]["losses"]  # same training, less memory
    assert capped["bpipe"]["stages"][0]["evicted_bytes"] > 0
    assert not worker_pids()
    for schedule, result in free.items():  # the last measured step, recorded on every stage
        _check_timeline(result["timeline"], pp=4, m=8, bpipe=schedule == "bpipe")


def _check_timeline(spans: list[dict], *, pp: int, m: int, bpipe: bool) -> None:
    """Each stage runs every forward and backward once, in its program's order, spans never
    overlap on a stage, and BPipe's evictions show as transfers on the evicting stages."""
    from autotune.schedules import generate
    from autotune.timeline import KINDS, Span

    program = generate("bpipe" if bpipe else "1f1b", pp, m).programs
    for stage in range(pp):
        mine = sorted((Span.from_dict(s) for s in spans if s["stage"] == stage), key=lambda s: s.start)
        assert mine and {s.kind for s in mine} <= set(KINDS)
        actions = [s.label for s in mine if s.kind != "wait"]
        assert actions == [str(a) for a in program[stage]]
        assert all(a.end <= b.start + 1e-6 for a, b in zip(mine, mine[1:], strict=False))
        assert mine[0].start >= 0
    evictions = [s for s in spans if s["label"].startswith("EV")]
    assert bool(evictions) == bpipe and all(s["kind"] == "transfer" for s in evictions)


@pytest.mark.parametrize(
    ("fault", "status", "reason"),
    [
        ("crash@1", "failed", "rank 1 died (signal SIGKILL)"),
        ("error@0", "failed", "RuntimeError: injected error"),
        ("hang@1", "timeout", "did not finish within 15 s"),
    ],
)
def test_faults_are_recorded_and_leave_no_process(
    monkeypatch: pytest.MonkeyPatch, fault: str, status: str, reason: str
) -> None:
    monkeypatch.setenv("AUTOTUNE_INJECT_FAULT", fault)
    cfg = TrialConfig(model=load_model("tiny-gpt"), pp=2, num_microbatches=2)
    started = time.monotonic()
    result = run_trial(cfg, steps=1, timeout=15)
    assert result.status == status
    assert result.error is not None and reason in result.error
    assert result.step_time_s is None and result.stages == ()
    assert time.monotonic() - started < 60
    assert not worker_pids()


def test_killing_the_launcher_kills_its_ranks() -> None:
    """Even a SIGKILLed `autotune trial` leaves no rank behind (PR_SET_PDEATHSIG)."""
    proc = subprocess.Popen(
        [*TRIAL, "--model", "tiny-gpt", "--pp", "2", "--timeout", "120"],
        cwd=ROOT,
        env={**os.environ, "AUTOTUNE_INJECT_FAULT": "hang@0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(worker_pids()) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not worker_pids()


def test_distributed_optimizer_trains_the_same_and_shards_the_state() -> None:
    """dp 2 with the optimizer state sharded (ZeRO-1): the same losses, step after step, as the
    unsharded optimizer; each rank's static bytes (and the estimate's) hold half the moments."""
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.costs import stage_params
    from autotune.estimate.estimator import estimate

    base = TrialConfig(model=load_model("tiny-gpt"), dp=2, num_microbatches=2)
    sharded = TrialConfig(model=load_model("tiny-gpt"), dp=2, num_microbatches=2, distributed_optimizer=True)
    plain_run, sharded_run = run_trial(base, steps=3), run_trial(sharded, steps=3)
    assert plain_run.ok and sharded_run.ok, (plain_run.error, sharded_run.error)
    assert len(plain_run.losses) == 4 and len(set(plain_run.losses)) > 1  # the optimizer moved
    assert sharded_run.losses == pytest.approx(plain_run.losses, rel=1e-6)
    params = stage_params(base.model, stage=0, num_stages=1, tp=1)
    shard = -(-params // 2)
    for cfg, run, want in ((base, plain_run, 16 * params), (sharded, sharded_run, 8 * params + 8 * shard)):
        stage = run.stages[0]
        assert stage.peak_memory_bytes - stage.peak_activation_bytes == want  # parameters, grads, state
        predicted = estimate(cfg, load_cluster("cpu-local"))["stages"][0]
        assert predicted["peak_memory_bytes"] == stage.peak_memory_bytes


def test_overlapped_gradient_reduction_trains_the_same_and_starts_during_the_backward(tmp_path: Path) -> None:
    """dp 2, --overlap-grad-reduce with small buckets: the same losses and gradients as the
    all-reduce after the backward, and buckets reduced while the backward still ran."""
    from trial_runners.launch import run_job

    base = TrialConfig(model=load_model("tiny-llama"), pp=2, dp=2, num_microbatches=3)
    overlap = TrialConfig(
        model=load_model("tiny-llama"), pp=2, dp=2, num_microbatches=3, overlap_grad_reduce=True
    )
    assert (
        TrialConfig(model=load_model("tiny-llama"), overlap_grad_reduce=True).overlap_grad_reduce is False
    )  # dp 1
    runs = [
        {"config": cfg.to_dict(), "steps": 2, "seed": 0, "grad_bucket_elements": 20_000,
         "dump_dir": str(tmp_path / name)}
        for name, cfg in (("base", base), ("overlap", overlap))
    ]  # fmt: skip
    for run in runs:
        Path(run["dump_dir"]).mkdir()
    outcome = run_job(runs, world_size=4, timeout=300)
    assert outcome.status == "ok", outcome.error
    plain, over = outcome.results
    for a, b in zip(plain, over, strict=True):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-6)
    assert all(max(r["overlapped_buckets"]) >= 1 for r in over), [r["overlapped_buckets"] for r in over]
    for rank in range(4):
        a = np.load(tmp_path / "base" / f"rank{rank}.npz")
        b = np.load(tmp_path / "overlap" / f"rank{rank}.npz")
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-9, err_msg=name)
