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
from autotune.estimate.estimator import estimate
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
    screen_only: bool = False


@dataclass(frozen=True)
class Loaded:
    """A validated space and its valid configurations (nothing screened, nothing started)."""

    space: SearchSpace
    configs: list[Any]
    rejected: int


@dataclass(frozen=True)
class Prepared:
    space: SearchSpace
    cluster: Any
    configs: list[Any]
    rejected: int
    screening: Screening  # without a profile: memory is predicted exactly, time by the roofline


def load(space_path: str, *, device: str | None = None) -> Loaded:
    """Load and validate a space and enumerate its configurations (ConfigError on bad input).

    `device` (the CLI's --device) overrides the space's `device` key."""
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
    return Loaded(space, configs, len(rejected))


def screened(loaded: Loaded) -> Prepared:
    """Tier 1 without a profile: every configuration estimated, refused if none is predicted to fit."""
    space, configs = loaded.space, loaded.configs
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
    return Prepared(space, cluster, configs, loaded.rejected, screening)


def prepare(space_path: str, *, device: str | None = None) -> Prepared:
    """Load, validate and screen a space (ConfigError on bad input; writes nothing)."""
    return screened(load(space_path, device=device))


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
    """Run (or resume) the campaign over `space_path`; returns the best TrialRecord or None.

    In order, each refusal one line and exit 2: the space (loaded and enumerated), the study's
    lease (another live campaign on the study), the cluster (can it ever hold a trial of the
    space?), the screening (is anything predicted to fit?); then the store is written to."""
    loaded = load(space_path, device=options.device)
    space = loaded.space
    study_name = options.study or space.name
    _check_store(options.storage, study_name)
    if options.screen_only:
        return screen_only(loaded, options, study_name, echo)
    from storage import Store
    from storage.lease import hold

    with _ray(options, loaded, echo) as dispatcher:
        loaded = _holdable(loaded, dispatcher, options, echo)
        ready = screened(loaded)
        cluster, screening = ready.cluster, ready.screening
        with Store(options.storage) as store, hold(store, study_name) as lease:
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
                store=store, study=study_name, screening=screening, knobs=space.knobs,
                fingerprint=fingerprint, objective=space.objective, steps=space.steps,
                trial_timeout=space.trial_timeout, seed_top=space.seed_top, limits=limits,
                rerun=options.rerun, seed=options.seed, echo=echo, lease=lease,
                simulate=lambda cfg: estimate(cfg, cluster, profile=profile, record=True)["timeline"],
            )  # fmt: skip
            best = campaign.run(dispatcher)
            if best is not None:
                value = getattr(best, space.objective)
                echo(f"best: {describe(best.config)} -> {value:,.0f} {space.objective}")
    report_verdict(options.storage, study_name, echo)
    return best


def planned_fingerprint(space: SearchSpace) -> dict[str, Any]:
    """The hardware a screened-only study is for: this machine where the space runs on its CPU
    (its trials would run here), else the cluster the space names (not at hand: planned)."""
    if space.device == "cpu" and space.cluster == CPU_LOCAL:
        from trial_runners.fingerprint import hardware_fingerprint

        return hardware_fingerprint("cpu")
    return {"planned": True, "cluster": space.cluster, "device": space.device}


def screen_only(loaded: Loaded, options: TuneOptions, study: str, echo: Callable[[str], None]) -> Any:
    """`autotune tune --screen-only`: tier 1 alone, recorded as a study (its predictions), with no
    trial and no Ray, so `autotune best` and `autotune advise --study` answer from predictions:
    how a GPU run is sized from a laptop. On this CPU a profile already in the store is used."""
    from storage import Store
    from storage.lease import hold

    ready = screened(loaded)
    space, screening = ready.space, ready.screening
    with Store(options.storage) as store, hold(store, study):
        fingerprint = store.register_fingerprint(planned_fingerprint(space))
        store.create_study(
            study, space=space.source, model=space.model.name, cluster=space.cluster, fingerprint=fingerprint
        )
        stored = store.profile(fingerprint, space.model.name) if space.cluster == CPU_LOCAL else None
        if stored is not None:
            profile = parse_profile(stored)
            cluster = load_cluster(space.cluster, comm=profile.comm) if profile.comm else ready.cluster
            screening = screen(ready.configs, cluster, objective=space.objective, profile=profile)
        _report_screening(space, screening, ready.rejected, echo)
        store.save_predictions(study, [(c.config.to_dict(), c.predicted) for c in screening.fitting])
    echo(f"screened only: study {study!r} holds {len(screening.fitting)} predictions and no trial")
    report_verdict(options.storage, study, echo)
    return screening.fitting[0] if screening.fitting else None


def report_verdict(storage: str, study: str, echo: Callable[[str], None]) -> None:
    """The campaign's last words: the BPipe verdict for the study (`autotune advise --study`)."""
    from autotune.advise import bpipe_payoff

    try:
        advice = bpipe_payoff(storage=storage, study=study)
    except ConfigError as exc:
        echo(f"BPipe verdict: none ({exc.rule})")
        return
    lo, hi = advice.interval
    echo(
        f"BPipe verdict: {advice.verdict} ({advice.predicted_speedup:.3f}x, 80% interval {lo:.3f}-{hi:.3f}, "
        f"from {advice.basis}); `autotune advise --study {study}` for the reasons"
    )


def _check_store(url: str, study: str) -> None:
    """Before Ray starts: the database can be written to (checked without writing), and no other
    live campaign runs the study (a read-only look; the lease itself is taken later, race-free)."""
    from storage import Store
    from storage.engine import check_writable
    from storage.migrate import current

    check_writable(url)
    if current(url) is None:
        return  # a database the campaign will create or migrate: nobody runs a study in it yet
    with Store(url, read_only=True) as store:
        store.check_lease_free(study)


def _ray(options: TuneOptions, loaded: Loaded, echo: Callable[[str], None]) -> Any:
    """Start Ray here or join `--ray-address`. Locally a CPU space whose widest configuration has
    more ranks than this machine has cores gets that many CPUs (its ranks time-share the cores);
    otherwise Ray gets the machine as it is."""
    from trial_runners.dispatch import RayDispatcher

    cores = os.cpu_count() or 1
    widest = max(c.world_size for c in loaded.configs)
    cpus = max(cores, widest) if loaded.space.device == "cpu" else cores
    if options.ray_address:
        echo(f"joining Ray at {options.ray_address}")
    elif cpus > cores:
        echo(f"starting Ray here ({cpus} CPUs on {cores} cores: trials of {widest} ranks time-share them)")
    else:
        echo(f"starting Ray here ({cpus} CPUs)")
    dispatcher = RayDispatcher(address=options.ray_address, device=loaded.space.device, num_cpus=cpus)
    echo(f"Ray: {dispatcher.describe()}")
    return dispatcher


def _holdable(loaded: Loaded, dispatcher: Any, options: TuneOptions, echo: Callable[[str], None]) -> Loaded:
    """The configurations the cluster can ever hold (a rank per CPU, or per GPU with device cuda,
    trials spanning nodes); refused at once, naming what is missing, when there is none."""
    most = dispatcher.most_ranks()
    fits = [c for c in loaded.configs if c.world_size <= most]
    if fits:
        if len(fits) < len(loaded.configs):
            left = len(loaded.configs) - len(fits)
            echo(f"left out {left} configuration(s) wider than the {most} ranks the cluster can hold")
        return Loaded(loaded.space, fits, loaded.rejected + len(loaded.configs) - len(fits))
    space = loaded.space
    need = min(c.world_size for c in loaded.configs)
    unit = "GPUs (and a CPU beside each)" if space.device == "cuda" else "CPUs"
    where = f"the Ray cluster at {options.ray_address}" if options.ray_address else "this machine's Ray"
    raise ConfigError(
        "--ray-address" if options.ray_address else "device",
        f"every configuration of {space.name} needs at least {need} {unit}, one per rank, but {where} "
        f"can hold {most} ({dispatcher.describe()}); run it where the devices are (--ray-address)",
    )


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
