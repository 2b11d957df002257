"""The `autotune` command line.

Exit codes: 0 success, 2 bad input (one line on stderr naming the flag and the rule, nothing
written), 1 any other failure. Heavy parts (torch, the trial runners) are imported only by the
subcommands that need them, so `autotune --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from autotune import knobs
from autotune.config import (
    DEVICES,
    MODEL_FIELDS,
    TRIAL_DTYPES,
    TrialConfig,
    check_schedule,
    describe_later_knobs,
    flag,
    load_model,
    parse_bytes,
)
from autotune.errors import ConfigError, dump_stacks_on_sigusr1, raise_on_sigterm, sigterm_received
from autotune.limits import MAX_CPU_RANKS_PER_CORE, MAX_PROFILE_SIZES, MAX_SECONDS, check_bound
from autotune.redact import mask_secrets


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"autotune: error: {message}\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="a preset (tiny-gpt, tiny-llama, gpt3-175b, ...) or a YAML file"
    )
    for name in (
        "num-layers",
        "hidden-size",
        "num-heads",
        "num-kv-heads",
        "seq-len",
        "vocab-size",
        "ffn-hidden-size",
    ):
        p.add_argument(f"--{name}", type=int, default=None, help="override the model's shape")
    knobs.add_flags(p)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--num-microbatches", type=int, default=0, help="default: pp")
    batch.add_argument("--global-batch-size", type=int, default=0, help="= micro x num x dp")
    p.add_argument(
        "--bpipe-cap",
        type=int,
        default=None,
        help="BPipe's per-stage limit in micro-batches (default ceil((pp+1)/2))",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--memory-limit", default=None, help="per-device cap, e.g. 2GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


_SHAPE = MODEL_FIELDS


def config_from_args(args: argparse.Namespace, *, default_device: str | None = None) -> TrialConfig:
    """A validated TrialConfig from the common flags (raises ConfigError).

    Without --device: `default_device`, or cuda where a GPU is visible."""
    shape = {k: getattr(args, k) for k in _SHAPE}
    model = load_model(args.model, **shape)
    cfg = TrialConfig(
        model=model,
        num_microbatches=args.num_microbatches,
        global_batch_size=args.global_batch_size,
        device=args.device or "cpu",
        memory_limit=parse_bytes(args.memory_limit) if args.memory_limit else None,
        bpipe_cap=_bpipe_cap(args),
        **knobs.from_args(args),
    )
    if args.device is None and default_device is None and _default_device() == "cuda":  # imports torch: last
        cfg = dataclasses.replace(cfg, device="cuda")
    return cfg


def _bpipe_cap(args: argparse.Namespace) -> int:
    """--bpipe-cap as TrialConfig takes it (0: the default); given, it must be positive."""
    if args.bpipe_cap is None:
        return 0
    if args.bpipe_cap < 1:
        raise ConfigError("--bpipe-cap", f"must be a positive integer, got {args.bpipe_cap}")
    return int(args.bpipe_cap)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


Work = Callable[[], int]


def _check_device(device: str, world_size: int, layout: str = "--tp", flag_name: str = "--device") -> None:
    """The device exists here, with room for `world_size` ranks (a local run's processes);
    `layout` is the flag to name when there is not."""
    if device not in DEVICES:
        raise ConfigError(flag_name, f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(flag_name, "cuda was asked for but no GPU is visible")
        if world_size > torch.cuda.device_count():
            raise ConfigError(
                layout,
                f"tp x pp x dp = {world_size} ranks but only {torch.cuda.device_count()} GPUs are visible",
            )
        return
    most = MAX_CPU_RANKS_PER_CORE * (os.cpu_count() or 1)
    if world_size > most:
        raise ConfigError(
            layout,
            f"tp x pp x dp = {world_size} ranks, each a process on this machine: at most "
            f"{MAX_CPU_RANKS_PER_CORE} per core ({most} on {os.cpu_count() or 1} cores)",
        )


def _check_trial(args: argparse.Namespace) -> Work:
    if args.steps < 1:
        raise ConfigError("--steps", f"must be a positive integer, got {args.steps}")
    check_bound("steps", args.steps, "--steps")
    if not math.isfinite(args.timeout) or args.timeout <= 0 or args.timeout > MAX_SECONDS:
        raise ConfigError(
            "--timeout", f"must be positive seconds, at most {MAX_SECONDS:,}, got {args.timeout}"
        )
    cfg = config_from_args(args)
    knobs.check_trialable((k.name, getattr(cfg, k.name)) for k in knobs.REGISTRY)
    if cfg.trial_dtype not in TRIAL_DTYPES:
        raise ConfigError(
            "--dtype",
            f"trials train in {' or '.join(TRIAL_DTYPES)}: fp16 needs loss scaling, which they do not do",
        )
    layout = "--dp" if cfg.dp > 1 else "--pp" if cfg.pp > 1 else "--tp"
    _check_device(cfg.device, cfg.world_size, layout)
    if args.data is not None:
        from trial_runners.data import check_token_file

        try:
            check_token_file(args.data, cfg.model)
        except ValueError as exc:
            raise ConfigError("--data", str(exc)) from None

    def work() -> int:
        from trial_runners.trial import run_trial

        result = run_trial(cfg, steps=args.steps, seed=args.seed, timeout=args.timeout, data_path=args.data)
        print(json.dumps(result.to_dict()) if args.json else format_trial(result.to_dict()))
        return 0

    return work


def _check_schedule(args: argparse.Namespace) -> Work:
    for name in ("pp", "num_microbatches", "virtual_stages"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(flag(name), f"must be a positive integer, got {value}")
        check_bound(name, value, flag(name))
    cap = _bpipe_cap(args)
    check_schedule(args.schedule, args.pp, args.num_microbatches, cap, args.virtual_stages)

    def work() -> int:
        from autotune.schedules import generate, grid, to_text, validate

        schedule = generate(
            args.schedule, args.pp, args.num_microbatches, cap=cap or None, virtual_stages=args.virtual_stages
        )
        peaks = validate(schedule)
        print(to_text(schedule) if args.text else grid(schedule.programs))
        if not args.text:
            print(
                "peak resident micro-batches per stage: " + ", ".join(f"{s}: {n}" for s, n in peaks.items())
            )
        return 0

    return work


def _check_estimate(args: argparse.Namespace) -> Work:
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.profiles import load_profile

    cfg = config_from_args(args, default_device="cpu")
    if args.method not in ("ours", "paper"):
        raise ConfigError("--method", f"must be ours or paper, got {args.method!r}")
    profile = load_profile(args.profile, model=cfg.model, device=cfg.device) if args.profile else None
    cluster = load_cluster(args.cluster, comm=profile.comm if profile else None)

    def work() -> int:
        from autotune.estimate.estimator import estimate

        result = estimate(cfg, cluster, profile=profile)
        if args.method == "paper":
            from autotune.estimate.paper import paper_estimate

            result["paper"] = paper_estimate(cfg, cluster, profile=profile, estimated=result)
        print(json.dumps(result) if args.json else format_estimate(result))
        return 0

    return work


def _micro_batch_sizes(text: str) -> list[int]:
    flag_name = "--micro-batch-sizes"
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(flag_name, f"expected positive integers such as 1,2,4, got {text!r}")
    if len(sizes) > MAX_PROFILE_SIZES:
        raise ConfigError(flag_name, f"at most {MAX_PROFILE_SIZES} sizes, got {len(sizes)}")
    for size in sizes:
        check_bound("micro_batch_size", size, flag_name)
    return sorted(set(sizes))


def _check_profile(args: argparse.Namespace) -> Work:
    from autotune.files import check_output

    shape = {k: getattr(args, k) for k in _SHAPE}
    model = load_model(args.model, **shape)
    sizes = _micro_batch_sizes(args.micro_batch_sizes)
    device = args.device or _default_device()
    # the shard's rules are a configuration's: tp must split the heads, the MLP and the vocabulary
    shard = TrialConfig(model=model, tp=args.tp, device=device, dtype=args.dtype)
    if shard.trial_dtype not in TRIAL_DTYPES:
        raise ConfigError("--dtype", f"profiles measure {' or '.join(TRIAL_DTYPES)}, as trials train")
    out = check_output(args.out, "--out")
    _check_device(device, 1)

    def work() -> int:
        from autotune.estimate.profiles import save_profile
        from trial_runners.profile import run_profile

        def progress(line: str) -> None:
            print(f"  {line}", file=sys.stderr, flush=True)

        shard_of = f", one rank's shard at tp {shard.tp}" if shard.tp > 1 else ""
        what = f"{model.name} on {device} in {shard.trial_dtype}"
        print(f"profiling {what} at micro-batch sizes {sizes}{shard_of}", file=sys.stderr)
        profile = run_profile(
            model, micro_batch_sizes=sizes, device=device, progress=progress, tp=shard.tp,
            dtype=shard.trial_dtype,
        )  # fmt: skip
        path = save_profile(profile, out)
        print(
            json.dumps({"out": str(path), "entries": len(profile["entries"])})
            if args.json
            else f"wrote {path}"
        )
        return 0

    return work


def _later(cfg: dict[str, Any]) -> str:
    later = describe_later_knobs(cfg)
    return f" {later}" if later else ""


def format_estimate(result: dict[str, Any]) -> str:
    """A short human-readable report of an estimate."""
    cfg = result["config"]
    mfu = f", MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""
    flash = "on" if cfg["flash_attention"] else "off"
    lines = [
        f"{cfg['model']} on {result['cluster']}  tp={cfg['tp']} pp={cfg['pp']} dp={cfg['dp']} "
        f"mbs={cfg['micro_batch_size']} m={cfg['num_microbatches']} {cfg['schedule']} "
        f"recompute={cfg['recompute']} flash={flash}{_later(cfg)}  ({result['method']})",
        f"step time {result['step_time_s']:.4g} s, {result['tokens_per_s']:.4g} tokens/s{mfu}, "
        f"bubble {result['bubble_fraction']:.1%}, fits: {'yes' if result['fits'] else 'NO'} "
        f"(limit {result['memory_limit_bytes'] / 2**30:.1f} GiB)",
        f"{'stage':>5} {'activations GiB':>16} {'memory GiB':>11} {'evicted/step GiB':>17}",
    ]
    for st in result["stages"]:
        act, mem, ev = (
            st[k] / 2**30 for k in ("peak_activation_bytes", "peak_memory_bytes", "evicted_bytes")
        )
        lines.append(f"{st['stage']:>5} {act:>16.3f} {mem:>11.3f} {ev:>17.3f}")
    paper = result.get("paper")
    if paper and paper.get("baseline"):
        base, theirs, ours = paper["baseline"], paper["paper"], paper["ours"]
        lines.append(
            f"BPipe vs 1F1B at micro-batch {base['micro_batch_size']} (the largest that fits 1F1B): "
            f"paper's method {theirs['predicted_speedup']:.3f}x (MFU ratio {theirs['mfu_ratio']:.3f}, "
            f"bubble ratio {theirs['bubble_ratio']:.3f}); ours {ours['predicted_speedup']:.3f}x"
        )
    elif paper:
        lines.append(f"paper's method: {paper['reason']}")
    return "\n".join(lines)


def format_trial(result: dict[str, Any]) -> str:
    """A short human-readable report of a trial result's JSON (`TrialResult.to_dict()`)."""
    cfg = result["config"]
    head = (
        f"{cfg['model']}  tp={cfg['tp']} pp={cfg['pp']} dp={cfg['dp']} mbs={cfg['micro_batch_size']} "
        f"m={cfg['num_microbatches']} {cfg['schedule']} recompute={cfg['recompute']} "
        f"flash={'on' if cfg['flash_attention'] else 'off'}{_later(cfg)}"
    )
    lines = [head, f"status: {result['status']}" + (f" ({result['error']})" if result["error"] else "")]
    if result["status"] == "ok":
        lines.append(
            f"step time {result['step_time_s'] * 1e3:.1f} ms, {result['tokens_per_s']:.0f} tokens/s, "
            f"{result['achieved_tflops'] * 1e3:.2f} GFLOP/s, final loss {result['losses'][-1]:.4f}"
        )
        lines.append(f"{'stage':>5} {'peak activations':>18} {'peak memory':>14} {'evicted/step':>14}")
        for st in result["stages"]:
            lines.append(
                f"{st['stage']:>5} {st['peak_activation_bytes']:>18,} {st['peak_memory_bytes']:>14,} "
                f"{st['evicted_bytes']:>14,}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autotune",
        description="Find the fastest parallel configuration for training a "
        "transformer, and learn when BPipe pays off.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    trial = sub.add_parser("trial", help="one short real training run, printed as a result")
    _add_config_flags(trial)
    trial.add_argument("--steps", type=int, default=3, help="measured steps, after one warm-up (default 3)")
    trial.add_argument("--seed", type=int, default=0)
    trial.add_argument("--timeout", type=float, default=600.0, help="seconds before the trial is killed")
    trial.add_argument("--data", default=None, help="a uint16 token file (nanoGPT style); default synthetic")
    trial.set_defaults(check=_check_trial)
    est = sub.add_parser("estimate", help="predict a configuration's step time and memory without running it")
    _add_config_flags(est)
    est.add_argument(
        "--cluster", default="cpu-local", help="a preset (a100-80g-8x8, h100-80g-8x2, cpu-local) or YAML"
    )
    est.add_argument(
        "--profile", default=None, help="a profile written by `autotune profile` (default: roofline)"
    )
    est.add_argument(
        "--method", default="ours", help="ours, or paper: also the seed paper's MFU-based estimate"
    )
    est.set_defaults(check=_check_estimate)
    prof = sub.add_parser("profile", help="measure layer, embedding and head costs on this device")
    prof.add_argument("--model", required=True)
    for name in _SHAPE:
        prof.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    prof.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    prof.add_argument("--micro-batch-sizes", default="1,2,4")
    prof.add_argument(
        "--tp", type=int, default=1, help="time one rank's shard of a tp group this size (default 1)"
    )
    prof.add_argument("--dtype", default="", help="fp32 or bf16 (default: fp32 on a CPU, bf16 on a GPU)")
    prof.add_argument("--out", required=True, help="where to write the profile (JSON)")
    prof.add_argument("--json", action="store_true")
    prof.set_defaults(check=_check_profile)
    sched = sub.add_parser("schedule", help="print a schedule's per-stage programs as a grid")
    sched.add_argument("--schedule", default="1f1b")
    sched.add_argument("--pp", type=int, default=4)
    sched.add_argument("--num-microbatches", type=int, default=8)
    sched.add_argument("--bpipe-cap", type=int, default=None)
    knobs.KNOB["virtual_stages"].add_flag(sched)
    sched.add_argument(
        "--text", action="store_true", help="the round-trippable text form instead of the grid"
    )
    sched.set_defaults(check=_check_schedule)
    from autotune.cli_campaign import add_parsers

    add_parsers(sub, _Parser)
    return parser


def validate(argv: Sequence[str]) -> Work:
    """Parse `argv` and check it as `main` does, without doing the work: the command's work, or
    ConfigError (SystemExit(2) from argparse for malformed flags). For tests and tools."""
    args = build_parser().parse_args(argv)
    work: Work = args.check(args)
    return work


def main(argv: Sequence[str] | None = None) -> int:
    """The `autotune` command: parse, check (bad input: one line, exit 2), then work. Ctrl-C and
    SIGTERM stop it cleanly (what it started is stopped, `finally` blocks run): exit 130 / 143."""
    raise_on_sigterm()
    dump_stacks_on_sigusr1()
    args = build_parser().parse_args(argv)
    try:
        work: Work = args.check(args)
        return int(work())
    except ConfigError as exc:
        print(mask_secrets(f"autotune: error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated, or re-raised as KeyboardInterrupt)
        if sigterm_received():
            print("autotune: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print("autotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
