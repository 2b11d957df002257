"""The store's subcommands: `tune`, `best`, `advise`, `dashboard` and `db upgrade` (registered by
autotune.cli)."""

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
        screen_only=args.screen_only,
    )
    _check_storage(args.storage, persistent=True)
    log = sys.stderr if args.json else sys.stdout

    def echo(line: str) -> None:
        print(mask_secrets(line), file=log, flush=True)

    def work() -> int:
        best = tune(args.space, options, echo=echo)
        if options.screen_only:  # the best prediction
            if args.json:
                print(json.dumps(None if best is None else _prediction_json(best, options.study)))
            return 0
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


def _prediction_json(candidate: Any, study: str | None) -> dict[str, Any]:
    predicted = candidate.predicted
    return {
        "config": candidate.config.to_dict(), "tokens_per_s": predicted.get("tokens_per_s"),
        "measured": False, "trial_id": None, "study": study, "step_time_s": predicted.get("step_time_s"),
        "mfu": predicted.get("mfu"),
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


def _check_advise(args: argparse.Namespace) -> Callable[[], int]:
    given = [f for f, v in (("--study", args.study), ("--model", args.model), ("--space", args.space)) if v]
    if len(given) != 1:
        raise ConfigError("--study", "give one of --study, --model with --cluster, or --space")
    if args.model and not args.cluster:
        raise ConfigError("--cluster", "--model needs --cluster (the advice is for a model on a cluster)")
    if args.cluster and not args.model:
        raise ConfigError("--model", "--cluster needs --model")
    if args.global_batch_size is not None and args.global_batch_size < 1:
        raise ConfigError("--global-batch-size", f"must be a positive integer, got {args.global_batch_size}")
    _check_storage(args.storage)

    def work() -> int:
        from autotune.advise import bpipe_payoff
        from autotune.advise.render import format_advice

        advice = bpipe_payoff(
            storage=args.storage, study=args.study, model=args.model, cluster=args.cluster,
            global_batch_size=args.global_batch_size, space=args.space,
        )  # fmt: skip
        print(json.dumps(advice.to_dict()) if args.json else format_advice(advice))
        return 0

    return work


def _check_dashboard(args: argparse.Namespace) -> Callable[[], int]:
    _check_storage(args.storage)
    if not 0 < args.port < 65536:
        raise ConfigError("--port", f"must be between 1 and 65535, got {args.port}")
    import socket

    from storage import Store
    from storage.engine import safe_url

    store = Store(args.storage, read_only=True)  # StoreError: one line, nothing written
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as exc:
        store.close()
        why = exc.strerror or str(exc)
        raise ConfigError("--port", f"cannot listen on {args.host}:{args.port}: {why}") from None
    except BaseException:
        store.close()
        raise

    def work() -> int:
        import uvicorn

        from autotune.dashboard.app import create_app

        try:
            app = create_app(store)
            where = f"[{args.host}]" if ":" in args.host else args.host
            print(f"dashboard: http://{where}:{args.port}/  ({safe_url(store.url)}, read-only; Ctrl-C stops)",
                  flush=True)  # fmt: skip
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
        finally:
            store.close()
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
    tune.add_argument(
        "--screen-only",
        action="store_true",
        help="screen and record the predictions as a study; no trial, no Ray",
    )
    tune.set_defaults(check=_check_tune)
    best = sub.add_parser("best", help="the best configuration in the store")
    best.add_argument("--storage", default=DEFAULT_STORAGE)
    best.add_argument("--study", default=None)
    best.add_argument("--model", default=None)
    best.add_argument("--cluster", default=None)
    best.add_argument("--json", action="store_true")
    best.set_defaults(check=_check_best)
    adv = sub.add_parser("advise", help="does BPipe pay off here? the verdict, its interval and reasons")
    adv.add_argument("--storage", default=DEFAULT_STORAGE)
    adv.add_argument("--study", default=None, help="a study in the store")
    adv.add_argument("--model", default=None, help="a model (with --cluster): every study of it there")
    adv.add_argument("--cluster", default=None)
    adv.add_argument("--global-batch-size", type=int, default=None, help="with --model: this global batch")
    adv.add_argument("--space", default=None, help="a search space, screened now (need not have run)")
    adv.add_argument("--json", action="store_true", help="one JSON object on stdout")
    adv.set_defaults(check=_check_advise)
    dash = sub.add_parser("dashboard", help="read-only web pages and a JSON API over the store")
    dash.add_argument("--storage", default=DEFAULT_STORAGE)
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    dash.set_defaults(check=_check_dashboard)
    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True, parser_class=parser_class)
    up = dbsub.add_parser("upgrade", help="create or migrate autotune's tables to the latest revision")
    up.add_argument("--storage", default=DEFAULT_STORAGE)
    up.set_defaults(check=_check_db)
