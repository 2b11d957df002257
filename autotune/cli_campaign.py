"""The campaign subcommands: `tune`, `best` and `db upgrade` (registered by autotune.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from autotune.errors import ConfigError
from autotune.redact import mask_secrets

DEFAULT_STORAGE = "sqlite:///autotune.db"


def _duration(text: str) -> float:
    from autotune.tuner.space import parse_duration

    return parse_duration(text, "--timeout")


def _positive(flag: str, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise ConfigError(flag, f"must be a positive integer, got {value}")
    return value


def _check_tune(args: argparse.Namespace) -> Callable[[], int]:
    from autotune.tuner.run import TuneOptions, tune

    options = TuneOptions(
        storage=args.storage,
        study=args.study,
        trials=_positive("--trials", args.trials),
        timeout=_duration(args.timeout) if args.timeout else None,
        patience=_positive("--patience", args.patience),
        ray_address=args.ray_address,
        device=args.device,
        rerun=args.rerun,
        seed=args.seed,
    )
    _check_storage(args.storage, persistent=True)
    log = sys.stderr if args.json else sys.stdout

    def echo(line: str) -> None:
        print(mask_secrets(line), file=log, flush=True)

    def work() -> int:
        best = tune(args.space, options, echo=echo)
        if args.json:
            print(json.dumps(None if best is None else _record_json(best)))
        return 0 if best is not None else 1

    return work


def _check_storage(url: str, *, persistent: bool = False) -> None:
    """The URL's form, checked without I/O; a campaign's database must outlive it."""
    from storage.engine import is_persistent, parse_url

    parse_url(url)
    if persistent and not is_persistent(url):
        raise ConfigError(
            "--storage",
            f"{url!r} is an in-memory database, which keeps nothing once the campaign ends; "
            "name a file (sqlite:///autotune.db) or a server",
        )


def _record_json(rec: Any) -> dict[str, Any]:
    return {
        "config": rec.config, "tokens_per_s": rec.tokens_per_s, "measured": True, "trial_id": rec.id,
        "study": rec.study, "step_time_s": rec.step_time_s, "mfu": rec.mfu,
    }  # fmt: skip


def _check_best(args: argparse.Namespace) -> Callable[[], int]:
    if not args.study and not (args.model and args.cluster):
        raise ConfigError("--study", "give --study, or both --model and --cluster")
    _check_storage(args.storage)

    def work() -> int:
        from autotune.answers import best_config
        from autotune.tuner.campaign import describe

        best = best_config(storage=args.storage, study=args.study, model=args.model, cluster=args.cluster)
        if args.json:
            print(json.dumps(best.to_dict()))
            return 0
        how = f"measured (trial {best.trial_id})" if best.measured else "predicted, not measured"
        print(f"best: {describe(best.config)}  m={best.config['num_microbatches']}")
        study = f", study {best.study}" if best.study else ""
        print(f"      {best.value:,.4g} {best.objective}, {how}{study}")
        return 0

    return work


def _check_db(args: argparse.Namespace) -> Callable[[], int]:
    _check_storage(args.storage, persistent=True)

    def work() -> int:
        from storage.engine import safe_url
        from storage.migrate import current, upgrade

        upgrade(args.storage)
        print(f"{safe_url(args.storage)}: at revision {current(args.storage)}")
        return 0

    return work


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Register `tune`, `best` and `db` on the main parser's subcommands."""
    tune = sub.add_parser("tune", help="run (or resume) a tuning campaign over a search space")
    tune.add_argument("space", help="a search space YAML (or a shipped space's name, e.g. demo-cpu)")
    tune.add_argument("--storage", default=DEFAULT_STORAGE, help=f"database URL (default {DEFAULT_STORAGE})")
    tune.add_argument("--study", default=None, help="study name (default: the space's name)")
    tune.add_argument(
        "--trials", type=int, default=None, help="real trials in the study (default: the space's)"
    )
    tune.add_argument("--timeout", default=None, help="wall time of this run, e.g. 90s, 30m, 8h")
    tune.add_argument("--patience", type=int, default=None, help="stop after N trials without improvement")
    tune.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start Ray here)")
    tune.add_argument("--device", default=None, help="cpu or cuda (default: the space's device)")
    tune.add_argument("--resume", action="store_true", help="continue the study (rerunning does the same)")
    tune.add_argument("--rerun", action="store_true", help="measure again what other studies measured here")
    tune.add_argument("--seed", type=int, default=0, help="sampler and data seed")
    tune.add_argument("--json", action="store_true", help="progress on stderr, the best as JSON on stdout")
    tune.set_defaults(check=_check_tune)
    best = sub.add_parser("best", help="the best configuration in the store")
    best.add_argument("--storage", default=DEFAULT_STORAGE)
    best.add_argument("--study", default=None)
    best.add_argument("--model", default=None)
    best.add_argument("--cluster", default=None)
    best.add_argument("--json", action="store_true")
    best.set_defaults(check=_check_best)
    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True, parser_class=parser_class)
    up = dbsub.add_parser("upgrade", help="create or migrate autotune's tables to the latest revision")
    up.add_argument("--storage", default=DEFAULT_STORAGE)
    up.set_defaults(check=_check_db)
