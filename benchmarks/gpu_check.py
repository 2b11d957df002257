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
   speedup by our simulator and by the paper's MFU-based method, from the kernel model.
4. **The same cases from a measured profile**: `autotune profile --tp 8 --dtype bf16` of each
   model on this GPU (one rank's shard of every part, micro-batch 1, 2, 4, flash on and off,
   every recomputation mode), fed to `autotune estimate --profile` of the same cases on a
   cluster of this device (`--device-row`), printing BPipe's speedups from measurements.

    python -m benchmarks.gpu_check [--out benchmarks/results] [--repeats 10]
    python -m benchmarks.gpu_check --dry-run   # on the CPU, tiny shapes (the test suite runs it)

Writes `gpu-check-<device>.json` and `.log` under `--out`, naming the device, and the profiles
beside them (`profile-<model>-tp8-<device>.json`).
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
    # the paper's cases: their models, the estimate's flags, the sizes profiled
    case_models: tuple[str, ...]
    case_flags: tuple[str, ...]
    profile_sizes: str


_PAPER_FLAGS = ("--tp", "8", "--pp", "8", "--global-batch-size", "1024", "--micro-batch-size", "4")
GPU = Plan(("gpt3-175b", "llama-65b"), 8, torch.bfloat16, 2, (1, 2, 4, 8), 2048, "cuda",
           ("--model", "tiny-gpt", "--device", "cuda", "--steps", "3"),
           ("gpt3-65b", "llama-65b"), _PAPER_FLAGS, "1,2,4")  # fmt: skip
DRY = Plan(("tiny-gpt", "tiny-llama"), 2, torch.float32, 4, (1, 2), None, "cpu",
           ("--model", "tiny-gpt", "--device", "cpu", "--steps", "1"),
           ("tiny-gpt", "tiny-llama"), ("--tp", "2", "--pp", "4", "--global-batch-size", "8",
           "--micro-batch-size", "2"), "1,2")  # fmt: skip


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


def paper_cases(
    plan: Plan, *, cluster: str, timeout: float, profiles: dict[str, Path] | None = None
) -> list[dict[str, Any]]:
    """BPipe's predicted speedup in the paper's cases on `cluster`: by the kernel model, or from
    each model's measured profile (`profiles`)."""
    out: list[dict[str, Any]] = []
    for model in plan.case_models:
        source = ("--profile", str(profiles[model])) if profiles else ()
        for flash in ("--flash-attention", "--no-flash-attention"):
            proc = _cli(
                "estimate", "--model", model, "--cluster", cluster, *plan.case_flags, "--schedule", "bpipe",
                flash, "--method", "paper", "--json", *source, timeout=timeout,
            )  # fmt: skip
            if proc.returncode != 0:
                error = proc.stderr.strip()[-300:]
                out.append({"model": model, "flash_attention": flash == "--flash-attention", "error": error})
                continue
            paper = json.loads(proc.stdout).get("paper") or {}
            out.append({
                "model": model, "flash_attention": flash == "--flash-attention",
                "ours": (paper.get("ours") or {}).get("predicted_speedup"),
                "paper": (paper.get("paper") or {}).get("predicted_speedup"),
                "reason": paper.get("reason"),
            })  # fmt: skip
    return out


def profile_models(plan: Plan, out_dir: Path, device_name: str, timeout: float) -> dict[str, Path]:
    """`autotune profile` of each case model as one tp rank's shard, in the plan's dtype, on this
    device; the profile files by model (a model whose profile failed is left out)."""
    dtype = "bf16" if plan.dtype == torch.bfloat16 else "fp32"
    out: dict[str, Path] = {}
    for model in plan.case_models:
        path = out_dir / f"profile-{model}-tp{plan.tp}-{device_name}.json"
        proc = _cli(
            "profile", "--model", model, "--device", plan.device, "--tp", str(plan.tp), "--dtype", dtype,
            "--micro-batch-sizes", plan.profile_sizes, "--out", str(path), timeout=timeout,
        )  # fmt: skip
        if proc.returncode == 0:
            out[model] = path
        else:
            print(f"gpu_check: profile of {model} failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
    return out


def _case_lines(title: str, cases: list[dict[str, Any]]) -> list[str]:
    lines = ["", title]
    for c in cases:
        ours = f"{c['ours']:.3f}x" if c.get("ours") else "-"
        theirs = f"{c['paper']:.3f}x" if c.get("paper") else "-"
        note = c.get("reason") or c.get("error") or ""
        mode = "on " if c.get("flash_attention") else "off"
        lines.append(f"  {c['model']:<10} flash {mode} {ours:>8} {theirs:>8} {note}")
    return lines


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
    layout = " ".join(plan.case_flags)
    roofline_cluster = "a100-80g-8x8" if plan.device == "cuda" else "cpu-local"
    cases = paper_cases(plan, cluster=roofline_cluster, timeout=120)
    lines += _case_lines(
        f"BPipe vs the best 1F1B that fits, {layout} on {roofline_cluster}, kernel model "
        "(ours / paper's method):",
        cases,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = "dry-run" if args.dry_run else name.lower().replace(" ", "-")
    profiles = profile_models(plan, args.out, device_name, timeout=600)
    measured_cluster = f"{args.device_row}-8x8" if plan.device == "cuda" else "cpu-local"
    profiled = paper_cases(plan, cluster=measured_cluster, timeout=120, profiles=profiles) if profiles else []
    lines += _case_lines(
        f"the same from profiles measured here (tp {plan.tp} shards), on {measured_cluster} "
        "(ours / paper's method):",
        profiled,
    )
    elapsed = time.perf_counter() - started
    lines += ["", f"done in {elapsed:.0f} s"]
    text = "\n".join(lines)
    print(text)
    stem = f"gpu-check-{device_name}"
    report = {"device": name, "device_row": args.device_row, "shards": shards, "trial": trial_status,
              "paper_cases": cases, "profiled_cases": profiled,
              "profiles": {m: p.name for m, p in profiles.items()}, "seconds": elapsed}  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.log").write_text(text + "\n")
    return 0 if trial_status == "ok" and len(profiles) == len(plan.case_models) else 1


if __name__ == "__main__":
    sys.exit(main())
