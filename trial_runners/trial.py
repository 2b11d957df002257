"""`run_trial`: one short real training run of a configuration, as a `TrialResult` (whose
`to_dict()` is contracts.md's JSON)."""

from __future__ import annotations

from typing import Any

from autotune.config import TrialConfig, model_flops_per_token
from autotune.results import Status, TrialResult
from trial_runners.launch import run_job, summarize

# Dense peak FLOP/s by device name fragment, for the precision trials run in (fp32 today).
_PEAK_FP32 = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}


def device_peak_flops(device: str) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPUs)."""
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in _PEAK_FP32.items() if k in name), None)


def run_trial(
    cfg: TrialConfig,
    *,
    steps: int = 3,
    seed: int = 0,
    timeout: float = 600.0,
    data_path: str | None = None,
    dump_dir: str | None = None,
) -> TrialResult:
    """Run `steps` measured steps after one warm-up on world-size fresh processes."""
    run = {
        "config": cfg.to_dict(),
        "steps": steps,
        "seed": seed,
        "data_path": data_path,
        "dump_dir": dump_dir,
    }
    outcome = run_job([run], world_size=cfg.world_size, timeout=timeout, device=cfg.device)
    return trial_result(cfg, outcome.status, outcome.error, outcome.results[0] if outcome.results else [])


def trial_run(cfg: TrialConfig, *, steps: int, seed: int) -> dict[str, Any]:
    """The job entry `run_job` takes for one trial of `cfg` (synthetic data)."""
    return {"config": cfg.to_dict(), "steps": steps, "seed": seed, "data_path": None, "dump_dir": None}


def trial_result(
    cfg: TrialConfig, status: Status | str, error: str | None, ranks: list[dict[str, Any]]
) -> TrialResult:
    """The trial's result from a job's status and its ranks' results (any order)."""
    if status != Status.OK:
        return TrialResult.failure(cfg.to_dict(), status=status, reason=error)
    return summarize(
        cfg,
        ranks,
        flops_per_token=model_flops_per_token(cfg.model, recompute=cfg.recompute),
        peak_flops=device_peak_flops(cfg.device),
    )
