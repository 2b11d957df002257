"""One rank of a trial: `python -m trial_runners.worker JOB.json RANK`.

The launcher starts one of these per rank. A job lists runs (configurations) that share the
world size; each rank builds its stage, runs one warm-up and the measured steps of each run
through the executor, and writes `run{i}.rank{r}.json` in the job's folder. On an error it
writes `status.rank{r}.json` (status "oom" or "failed" with a one-line reason) and exits
non-zero; the launcher then stops the other ranks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from autotune.config import TRIAL_DTYPES, TrialConfig
from autotune.estimate.costs import GRAD_BUCKET_ELEMENTS
from autotune.estimate.costs import static_bytes as optimizer_static_bytes
from autotune.placement import layout_of
from autotune.schedules import generate, validate
from trial_runners.data import batch_for_step, microbatch
from trial_runners.executor import StageExecutor, StageLinks
from trial_runners.faults import injected
from trial_runners.grad_reduce import OverlappedGradReduce
from trial_runners.memory import ActivationTracker, SimulatedOOM
from trial_runners.models import StageModule, build_stage
from trial_runners.optimizer import TrialOptimizer
from trial_runners.tensor_parallel import all_reduce_grads, sync_sequence_parallel_grads

EXIT_OOM = 3


@dataclass(frozen=True)
class Coords:
    """Where a rank sits in the tp x pp x dp grid (see `autotune.placement`)."""

    rank: int
    tp: int
    dp: int
    pp: int

    @classmethod
    def of(cls, rank: int, cfg: TrialConfig) -> Coords:
        stage, dp_rank, tp_rank = layout_of(cfg).coords(rank)
        return cls(rank, tp_rank, dp_rank, stage)


def global_rank(cfg: TrialConfig, *, tp: int, dp: int, pp: int) -> int:
    return layout_of(cfg).rank(stage=pp, dp_rank=dp, tp_rank=tp)


def _groups(cfg: TrialConfig, me: Coords) -> tuple[Any, Any]:
    """Create every tp and dp group (all ranks must call new_group in the same order)."""
    tp_group = dp_group = None
    if cfg.tp > 1:
        for pp in range(cfg.pp):
            for dp in range(cfg.dp):
                group = dist.new_group([global_rank(cfg, tp=t, dp=dp, pp=pp) for t in range(cfg.tp)])
                if (pp, dp) == (me.pp, me.dp):
                    tp_group = group
    if cfg.dp > 1:
        for pp in range(cfg.pp):
            for tp in range(cfg.tp):
                group = dist.new_group([global_rank(cfg, tp=tp, dp=d, pp=pp) for d in range(cfg.dp)])
                if (pp, tp) == (me.pp, me.tp):
                    dp_group = group
    return tp_group, dp_group


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
assert tuple(TORCH_DTYPES) == TRIAL_DTYPES  # autotune.config's list of what trials train in


def torch_dtype(cfg: TrialConfig) -> torch.dtype:
    """The trial's training dtype; fp16 needs loss scaling, which the trials do not do."""
    if cfg.trial_dtype not in TORCH_DTYPES:
        trains = " or ".join(TORCH_DTYPES)
        raise ValueError(f"--dtype {cfg.trial_dtype}: trials train in {trains} (fp16 needs loss scaling)")
    return TORCH_DTYPES[cfg.trial_dtype]


def _probe_microbatch_bytes(
    module: StageModule, cfg: TrialConfig, tracker: ActivationTracker, device: torch.device
) -> int:
    """Saved bytes of one micro-batch's forward on this stage (all micro-batches are alike)."""
    b, s = cfg.micro_batch_size, cfg.model.seq_len
    tokens = torch.zeros(b, s, dtype=torch.long, device=device)
    hidden = torch.zeros(cfg.activation_shape, dtype=torch_dtype(cfg), device=device, requires_grad=True)
    x = tokens if module.is_first else hidden
    probe = ActivationTracker(tracker.excluded)
    targets = torch.zeros(b, s, dtype=torch.long, device=device)  # its own storage, as in a real step
    with probe.capture(0):
        out = module(x, targets if module.is_last else None)
    del out
    return probe.sizes.get(0, 0)


def _inject_fault(config: dict[str, Any], rank: int, step: int) -> None:
    """Test hook (see trial_runners.faults): make this rank crash, hang, raise or run out of
    memory (through the same path as a real overrun of --memory-limit) at step 0."""
    kind = injected(config, rank, ("crash", "hang", "error", "oom")) if step == 0 else None
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(10**6)
    if kind == "error":
        raise RuntimeError("injected error")
    if kind == "oom":
        raise SimulatedOOM("injected: live memory would exceed the memory limit")


def run_one(run: dict[str, Any], rank: int, out_dir: Path, run_index: int) -> None:
    """Build this rank's stage for one configuration, train it, and write its result file."""
    cfg = TrialConfig.from_dict(run["config"])
    me = Coords.of(rank, cfg)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    )
    tp_group, dp_group = _groups(cfg, me)
    stages = [c * cfg.pp + me.pp for c in range(cfg.virtual_stages)]  # this rank's model stages
    chunks = [
        build_stage(
            cfg.model,
            stage=g,
            num_stages=cfg.num_model_stages,
            flash_attention=cfg.flash_attention,
            recompute=cfg.recompute,
            tp_group=tp_group,
            seed=run.get("seed", 0),
            device=device,
            dtype=torch_dtype(cfg),
            split=cfg.split,
            sequence_parallel=cfg.sequence_parallel,
        )
        for g in stages
    ]
    module = chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)
    schedule = generate(
        cfg.schedule,
        cfg.pp,
        cfg.num_microbatches,
        cap=cfg.bpipe_cap or None,
        virtual_stages=cfg.virtual_stages,
    )
    validate(schedule)
    static_bytes = optimizer_static_bytes(  # parameters, gradients, AdamW's moments (sharded over dp)
        sum(p.numel() for p in module.parameters()), dtype=cfg.trial_dtype, dp=cfg.dp,
        distributed_optimizer=cfg.distributed_optimizer,
    )  # fmt: skip
    tracker = ActivationTracker.for_module(module, static_bytes=static_bytes, limit=cfg.memory_limit)
    mb_bytes = _probe_microbatch_bytes(chunks[0], cfg, tracker, device)
    executor = StageExecutor(
        module,
        schedule.program(me.pp),
        cap=schedule.cap,
        stages=stages,
        num_model_stages=cfg.num_model_stages,
        links=_links(cfg, me, schedule.partner[me.pp], mb_bytes, device),
        activation_shape=cfg.activation_shape,
        dtype=torch_dtype(cfg),
        device=device,
        tracker=tracker,
        loss_scale=1.0 / (cfg.num_microbatches * cfg.dp),
    )
    times, losses, evicted, overlapped = _train(run, cfg, me, executor, dp_group, device, tp_group)
    timeline = executor.timeline or []
    result = {
        "rank": rank,
        "stage": me.pp,
        "tp_rank": me.tp,
        "dp_rank": me.dp,
        "peak_activation_bytes": tracker.peak,
        "static_bytes": static_bytes,
        "microbatch_bytes": mb_bytes,
        "evicted_bytes": evicted,
        "overlapped_buckets": overlapped,
        "step_times": times,
        "losses": losses,
        "device_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "timeline": [[label, start, end, kind] for label, start, end, kind in timeline],
    }
    (out_dir / f"run{run_index}.rank{rank}.json").write_text(json.dumps(result))


def _links(
    cfg: TrialConfig, me: Coords, partner_stage: int | None, mb_bytes: int, device: torch.device
) -> StageLinks:
    """This rank's pipeline neighbours and BPipe partner; the pair's transfers carry micro-batches
    of the evictor (the pair's earlier stage), whose size every rank shares here."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([mb_bytes], dtype=torch.long, device=device))
    partner = None if partner_stage is None else global_rank(cfg, tp=me.tp, dp=me.dp, pp=partner_stage)
    evictor = None
    if partner is not None and partner_stage is not None:
        evictor = me.rank if me.pp < partner_stage else partner
    ring = cfg.virtual_stages > 1  # the last rank's chunk c feeds the first rank's chunk c + 1
    return StageLinks(
        prev=global_rank(cfg, tp=me.tp, dp=me.dp, pp=(me.pp - 1) % cfg.pp) if me.pp > 0 or ring else None,
        next=global_rank(cfg, tp=me.tp, dp=me.dp, pp=(me.pp + 1) % cfg.pp)
        if me.pp < cfg.pp - 1 or ring
        else None,
        partner=partner,
        partner_mb_bytes=int(sizes[evictor].item()) if evictor is not None else 0,
    )


def _train(
    run: dict[str, Any],
    cfg: TrialConfig,
    me: Coords,
    executor: StageExecutor,
    dp_group: Any,
    device: torch.device,
    tp_group: Any = None,
) -> tuple[list[float], list[float], int, list[int]]:
    """One warm-up and `steps` measured steps; (step times, losses, bytes evicted per step, and
    with --overlap-grad-reduce the gradient buckets whose all-reduce began during each step's
    backward).
    The last step's timeline is recorded (`executor.timeline`), from the moment the ranks leave
    its barrier."""
    params = list(executor.module.parameters())
    optimizer = TrialOptimizer(
        params, lr=run.get("lr", 1e-3), dp_group=dp_group, distributed=cfg.distributed_optimizer
    )
    grads = optimizer.grads  # what holds each parameter's gradient (fp32 masters in mixed precision)
    reducer = None
    if cfg.overlap_grad_reduce and dp_group is not None:
        reducer = OverlappedGradReduce(
            params, grads, group=dp_group, accumulations=cfg.num_microbatches,
            bucket_elements=int(run.get("grad_bucket_elements", GRAD_BUCKET_ELEMENTS)),
        )  # fmt: skip
    overlapped: list[int] = []
    times: list[float] = []
    losses: list[float] = []
    evicted = 0
    last = int(run.get("steps", 3))
    for step in range(last + 1):
        tokens, targets = batch_for_step(
            cfg.model,
            seed=run.get("seed", 0),
            step=step,
            global_batch_size=cfg.global_batch_size,
            data_path=run.get("data_path"),
        )

        def batch(mb: int, tokens: torch.Tensor = tokens, targets: torch.Tensor = targets) -> tuple:
            t, y = microbatch(
                tokens, targets, index=mb, micro_batch_size=cfg.micro_batch_size, dp_rank=me.dp, dp=cfg.dp
            )
            return t.clone().to(device), y.clone().to(device)

        dist.barrier()
        start = time.perf_counter()
        _inject_fault(run["config"], me.rank, step)
        optimizer.zero_grad()
        loss, evicted = executor.run_step(batch, timeline=start if step == last else None)
        if dp_group is not None:
            if reducer is not None:
                overlapped.append(reducer.finish())
            else:
                all_reduce_grads(grads, dp_group)
            loss_t = torch.tensor([loss], device=device)
            dist.all_reduce(loss_t, group=dp_group)
            loss = float(loss_t.item())
        sync_sequence_parallel_grads(grads, tp_group)  # sums commute: after the dp all-reduce
        if step == 0 and run.get("dump_dir"):
            _dump_grads(executor.chunks, grads, Path(run["dump_dir"]) / f"rank{me.rank}.npz")
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss)
    return times, losses, evicted, overlapped


def _dump_grads(chunks: list[torch.nn.Module], grads: list[torch.Tensor], path: Path) -> None:
    """Write every parameter's gradient (held by `grads`, in the parameters' order, chunk after
    chunk; fp32) and its tp shard dim as .npz, by the full model's names; no pickles."""
    arrays = {}
    named = [item for chunk in chunks for item in chunk.named_parameters()]
    for (name, p), holder in zip(named, grads, strict=True):
        if holder.grad is not None:
            arrays[name] = holder.grad.detach().float().cpu().numpy()
        arrays[f"__shard_dim__{name}"] = np.array(getattr(p, "tp_shard_dim", -1))
    np.savez(path, **arrays)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    job_path, rank = Path(argv[0]), int(argv[1])
    job = json.loads(job_path.read_text())
    out_dir = job_path.parent
    backend = "nccl" if job.get("device") == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.set_num_threads(int(job.get("threads", 1)))
    dist.init_process_group(
        backend,
        init_method=job.get("init_method") or f"file://{job['init_file']}",
        rank=rank,
        world_size=job["world_size"],
    )
    for i, run in enumerate(job["runs"]):
        try:
            if run["config"].get("device") == "cuda" and run["config"].get("memory_limit"):
                total = torch.cuda.get_device_properties(rank % torch.cuda.device_count()).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, run["config"]["memory_limit"] / total))
            run_one(run, rank, out_dir, i)
        except (SimulatedOOM, torch.cuda.OutOfMemoryError) as exc:
            _write_status(out_dir, rank, i, "oom", f"rank {rank}: out of memory: {exc}".splitlines()[0])
            return EXIT_OOM
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason
            traceback.print_exc()
            _write_status(
                out_dir, rank, i, "failed", f"rank {rank}: {type(exc).__name__}: {exc}".splitlines()[0]
            )
            return 1
    dist.destroy_process_group()
    return 0


def _write_status(out_dir: Path, rank: int, run: int, status: str, error: str) -> None:
    (out_dir / f"status.rank{rank}.json").write_text(
        json.dumps({"run": run, "status": status, "error": error})
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
