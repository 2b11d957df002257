"""One prepared GPU check (issue 14, item 7): the kernel model against one GPU, a real trial, and
the paper's BPipe cases, within a few minutes.

1. **Layer shards at tp-8 shapes**: one transformer block of a GPT-3-175B-like and of LLaMA-65B,
   as one tensor-parallel rank of 8 holds it (`tensor_parallel.ShardShapes`: rank 0's shard of
   every split layer, collectives skipped: the compute one GPU does), bf16, sequence 2048, at
   micro-batch 1, 2, 4, 8, flash attention on and off; forward and backward timed with CUDA
   events (median of `--repeats` after a warm-up), beside the kernel model's prediction for the
   same shard (`kernels.layer_times` on `--device-row`'s figures, no communication).
2. **A real trial**: `autotune trial --device cuda` (tiny-gpt, 3 steps) must end `ok`.
3. **The paper's cases**: `autotune estimate --method paper` of gpt3-65b and llama-65b at tp 8,
   pp 8, global batch 1024 on `a100-80g-8x8` (BPipe at micro-batch 4), printing BPipe's predicted
   speedup by our simulator and by the paper's MFU-based method.

    python -m benchmarks.gpu_check [--out benchmarks/results] [--repeats 10]
    python -m benchmarks.gpu_check --dry-run   # on the CPU, tiny shapes (the test suite runs it)

Writes `gpu-check-<device>.json` and `.log` under `--out`, naming the device. Not yet: feeding
a measured tp-8 bf16 profile to `autotune estimate` (`autotune profile` measures tp 1 in fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from autotune.config import ModelSpec, load_model
from autotune.estimate import kernels
from autotune.estimate.clusters import device_table, load_cluster
from trial_runners.models import build_stage
from trial_runners.tensor_parallel import ShardShapes

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    tp: int
    dtype: torch.dtype
    dtype_bytes: int
    micro_batch_sizes: tuple[int, ...]
    seq_len: int | None
    device: str
    trial: tuple[str, ...]


GPU = Plan(("gpt3-175b", "llama-65b"), 8, torch.bfloat16, 2, (1, 2, 4, 8), 2048, "cuda",
           ("--model", "tiny-gpt", "--device", "cuda", "--steps", "3"))  # fmt: skip
DRY = Plan(("tiny-gpt", "tiny-llama"), 2, torch.float32, 4, (1, 2), None, "cpu",
           ("--model", "tiny-gpt", "--device", "cpu", "--steps", "1"))  # fmt: skip


def _timed(fn: Any, *, device: str, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def layer_shard(
    spec: ModelSpec, plan: Plan, *, b: int, flash: bool, repeats: int, device_row: str
) -> dict[str, Any]:
    """One block of `spec` as one tp rank holds it: measured forward/backward vs the kernel model."""
    block = dataclasses.replace(spec, num_layers=3)
    module = build_stage(
        block, stage=1, num_stages=3, flash_attention=flash, recompute="none", tp_group=ShardShapes(plan.tp),
        device=plan.device, dtype=plan.dtype,
    )  # fmt: skip
    x = torch.randn(
        b, spec.seq_len, spec.hidden_size, device=plan.device, dtype=plan.dtype, requires_grad=True
    )
    grad = torch.randn_like(x)
    out: dict[str, torch.Tensor] = {}

    def forward() -> None:
        out["y"] = module(x)

    def backward() -> None:
        out["y"] = module(x)
        out["y"].backward(grad)

    fwd = _timed(forward, device=plan.device, repeats=repeats)
    both = _timed(backward, device=plan.device, repeats=repeats)
    c = load_cluster(f"{device_row}-8x1")
    assert c.peak_flops is not None
    dev = kernels.Device(c.peak_flops, c.gemm_efficiency, c.hbm_bandwidth, plan.dtype_bytes)
    pf, pb = kernels.layer_times(
        spec, micro_batch_size=b, tp=plan.tp, recompute="none", flash_attention=flash, device=dev
    )
    return {
        "model": spec.name, "micro_batch_size": b, "flash_attention": flash, "tp": plan.tp,
        "measured_fwd_s": fwd, "measured_bwd_s": max(both - fwd, 0.0),
        "predicted_fwd_s": pf, "predicted_bwd_s": pb,
    }  # fmt: skip


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autotune.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def paper_cases(timeout: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for model in ("gpt3-65b", "llama-65b"):
        for flash in ("--flash-attention", "--no-flash-attention"):
            proc = _cli(
                "estimate", "--model", model, "--cluster", "a100-80g-8x8", "--tp", "8", "--pp", "8",
                "--global-batch-size", "1024", "--micro-batch-size", "4", "--schedule", "bpipe", flash,
                "--method", "paper", "--json", timeout=timeout,
            )  # fmt: skip
            if proc.returncode != 0:
                out.append({"model": model, "flash": flash, "error": proc.stderr.strip()[-300:]})
                continue
            paper = json.loads(proc.stdout).get("paper") or {}
            out.append({
                "model": model, "flash_attention": flash == "--flash-attention",
                "ours": (paper.get("ours") or {}).get("predicted_speedup"),
                "paper": (paper.get("paper") or {}).get("predicted_speedup"),
                "reason": paper.get("reason"),
            })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes (tp 2, fp32)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--device-row", default="h200-141g", help="devices.yaml row the kernel model is read for"
    )
    args = parser.parse_args(argv)
    plan = DRY if args.dry_run else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run", file=sys.stderr)
        return 2
    if args.device_row not in device_table():
        print(f"gpu_check: --device-row must be one of {', '.join(device_table())}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (dry run)"
    lines = [f"gpu_check on {name}; kernel model read for {args.device_row}", ""]
    started = time.perf_counter()
    shards = []
    lines.append(f"{'model':<12} {'mbs':>3} {'flash':>5} {'fwd ms':>8} {'pred':>8} {'bwd ms':>8} {'pred':>8}")
    for model in plan.models:
        spec = load_model(model) if plan.seq_len is None else load_model(model, seq_len=plan.seq_len)
        for b in plan.micro_batch_sizes:
            for flash in (True, False):
                r = layer_shard(
                    spec, plan, b=b, flash=flash, repeats=args.repeats, device_row=args.device_row
                )
                shards.append(r)
                keys = ("measured_fwd_s", "predicted_fwd_s", "measured_bwd_s", "predicted_bwd_s")
                ms = " ".join(f"{r[k] * 1e3:>8.3f}" for k in keys)
                lines.append(f"{model:<12} {b:>3} {'on' if flash else 'off':>5} {ms}")
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
    trial = _cli("trial", *plan.trial, "--json", timeout=300)
    trial_status = json.loads(trial.stdout)["status"] if trial.returncode == 0 and trial.stdout else "failed"
    lines += ["", f"autotune trial {' '.join(plan.trial)}: {trial_status}"]
    cases = paper_cases(timeout=120)
    lines += [
        "",
        "BPipe (mbs 4) vs the best 1F1B that fits, tp 8 pp 8 on a100-80g-8x8 (ours / paper's method):",
    ]
    for c in cases:
        ours = f"{c['ours']:.3f}x" if c.get("ours") else "-"
        theirs = f"{c['paper']:.3f}x" if c.get("paper") else "-"
        note = c.get("reason") or c.get("error") or ""
        mode = "on " if c.get("flash_attention") else "off"
        lines.append(f"  {c['model']:<10} flash {mode} {ours:>8} {theirs:>8} {note}")
    elapsed = time.perf_counter() - started
    lines += ["", f"done in {elapsed:.0f} s"]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-check-" + ("dry-run" if args.dry_run else name.lower().replace(" ", "-"))
    report = {"device": name, "device_row": args.device_row, "shards": shards, "trial": trial_status,
              "paper_cases": cases, "seconds": elapsed}  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.log").write_text(text + "\n")
    return 0 if trial_status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
