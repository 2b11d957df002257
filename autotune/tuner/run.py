"""`autotune tune`: everything a campaign does, in order, with bad input refused up front.

The space is loaded and screened before the database is opened, so malformed YAML, an
unknown key or a space with no valid configuration writes nothing; an unreachable database
is refused before Ray starts. Then: the hardware fingerprint, the study and its predictions
recorded, Ray started (or joined), the Optuna loop run, and the best configuration returned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.errors import ConfigError
from autotune.estimate.clusters import CPU_LOCAL, load_cluster
from autotune.estimate.profiles import Profile, check_compatible, parse_profile
from autotune.tuner.campaign import Campaign, Limits, describe
from autotune.tuner.screen import Screening, screen
from autotune.tuner.space import SearchSpace, load_space, space_from_dict


@dataclass(frozen=True)
class TuneOptions:
    """The command line's overrides of the space's `search` section."""

    storage: str = "sqlite:///autotune.db"
    study: str | None = None
    trials: int | None = None
    timeout: float | None = None
    patience: int | None = None
    ray_address: str | None = None
    device: str | None = None
    rerun: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Prepared:
    space: SearchSpace
    cluster: Any
    configs: list[Any]
    rejected: int
    screening: Screening  # without a profile: memory is predicted exactly, time by the roofline


def prepare(space_path: str, *, device: str | None = None) -> Prepared:
    """Load, validate and screen a space (ConfigError on bad input; writes nothing).

    `device` (the CLI's --device) overrides the space's `device` key.
    """
    space = load_space(space_path)
    if device is not None and device != space.device:
        space = space_from_dict({**space.source, "device": device}, space_path)
    configs, rejected = space.configs()
    if not configs:
        reasons = sorted({f"{r.field}: {r.reason}" for r in rejected})
        example = f"; e.g. {reasons[0]}" if reasons else ""
        raise ConfigError(
            "knobs", f"the space has no valid configuration ({len(rejected)} rejected{example})"
        )
    if space.objective == "mfu" and space.device == "cpu":
        raise ConfigError("objective", "mfu needs a device with a known peak FLOP/s; use tokens_per_s on cpu")
    cluster = load_cluster(space.cluster)
    screening = screen(configs, cluster, objective=space.objective)
    if not screening.fitting:
        big = screening.too_big[0].predicted
        need = max(st["peak_memory_bytes"] for st in big["stages"])
        raise ConfigError(
            "memory_limit",
            f"no valid configuration is predicted to fit: all {len(configs)} exceed "
            f"{big['memory_limit_bytes']:,} bytes per device (e.g. {describe(big['config'])} needs {need:,})",
        )
    return Prepared(space, cluster, configs, len(rejected), screening)


def cpu_profile(
    space: SearchSpace, store: Any, fingerprint: str, echo: Callable[[str], None]
) -> Profile | None:
    """On this CPU, a measured profile of the model (kept in the store per hardware), else None."""
    if space.device != "cpu" or space.cluster != CPU_LOCAL:
        return None
    sizes = sorted(set(space.knobs["micro_batch_size"]))
    stored = store.profile(fingerprint, space.model.name)
    if stored is not None:
        profile = parse_profile(stored)
        if set(sizes) <= set(profile.micro_batch_sizes) and _same_model(profile, space):
            return profile
    from trial_runners.profile import run_profile

    echo(f"profiling {space.model.name} on this CPU at micro-batch sizes {sizes} (once per machine)")
    start = time.monotonic()
    data = run_profile(space.model, micro_batch_sizes=sizes, device="cpu")
    store.save_profile(fingerprint, space.model.name, data)
    echo(f"profiled in {time.monotonic() - start:.1f} s")
    return parse_profile(data)


def _same_model(profile: Profile, space: SearchSpace) -> bool:
    try:
        check_compatible(profile, model=space.model, device=space.device)
    except ConfigError:
        return False
    return True


def tune(space_path: str, options: TuneOptions, *, echo: Callable[[str], None] = print) -> Any:
    """Run (or resume) the campaign over `space_path`; returns the best TrialRecord or None."""
    ready = prepare(space_path, device=options.device)
    space, cluster, screening = ready.space, ready.cluster, ready.screening
    study_name = options.study or space.name
    from storage import Store

    with Store(options.storage) as store, _ray(options, space.device, screening, echo) as dispatcher:
        fingerprint = store.register_fingerprint(dispatcher.fingerprint())
        store.create_study(
            study_name,
            space=space.source,
            model=space.model.name,
            cluster=space.cluster,
            fingerprint=fingerprint,
        )
        profile = cpu_profile(space, store, fingerprint, echo)
        if profile is not None:
            cluster = load_cluster(space.cluster, comm=profile.comm) if profile.comm else cluster
            screening = screen(ready.configs, cluster, objective=space.objective, profile=profile)
        _report_screening(space, screening, ready.rejected, echo)
        if not screening.fitting:
            raise ConfigError(
                "memory_limit", "no valid configuration is predicted to fit with the measured profile"
            )
        store.save_predictions(study_name, [(c.config.to_dict(), c.predicted) for c in screening.fitting])
        limits = Limits(
            trials=options.trials or space.trials,
            timeout=options.timeout or space.timeout,
            patience=options.patience or space.patience,
            concurrency=space.concurrency
            or dispatcher.capacity(max(c.config.world_size for c in screening.fitting)),
        )
        campaign = Campaign(
            store=store, study=study_name, screening=screening, knobs=space.knobs, fingerprint=fingerprint,
            objective=space.objective, steps=space.steps, trial_timeout=space.trial_timeout,
            seed_top=space.seed_top, limits=limits, rerun=options.rerun, seed=options.seed, echo=echo,
        )  # fmt: skip
        best = campaign.run(dispatcher)
        if best is not None:
            echo(f"best: {describe(best.config)} -> {getattr(best, space.objective):,.0f} {space.objective}")
        return best


def _ray(options: TuneOptions, device: str, screening: Screening, echo: Callable[[str], None]) -> Any:
    """Start Ray here (with room for the widest configuration) or join `--ray-address`."""
    from trial_runners.dispatch import RayDispatcher

    cpus = max(os.cpu_count() or 1, max(c.config.world_size for c in screening.fitting))
    echo(
        f"joining Ray at {options.ray_address}" if options.ray_address else f"starting Ray here ({cpus} CPUs)"
    )
    dispatcher = RayDispatcher(address=options.ray_address, device=device, num_cpus=cpus)
    cpu, gpu = (dispatcher.resources().get(k, 0.0) for k in ("CPU", "GPU"))
    echo(f"Ray: {dispatcher.nodes()} node(s), {cpu:g} CPUs, {gpu:g} GPUs")
    return dispatcher


def _report_screening(
    space: SearchSpace, screening: Screening, rejected: int, echo: Callable[[str], None]
) -> None:
    fitting, too_big = len(screening.fitting), len(screening.too_big)
    echo(
        f"screened {fitting + too_big + rejected} configurations of {space.name}: {rejected} invalid, "
        f"{too_big} predicted not to fit, {fitting} to search"
    )
    for c in screening.fitting[:3]:
        value = c.predicted.get(space.objective)
        echo(f"  predicted {value:,.0f} {space.objective}: {describe(c.config.to_dict())}")
