"""The dashboard's data: every page, every chart and every `/api/` answer is built here, from a
store opened read-only; the pages and the JSON API only render these dicts (style.md, "compute
first, render second"). The verdict is `autotune advise`'s own (`advise_in`), the best
configuration `autotune best`'s (`best_in`).

Each builder takes the open store and returns plain JSON values. An unknown study or trial is
`storage.NotFoundError`; a bad filter or sort is `ValueError` naming it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from autotune.advise.advisor import advise_in
from autotune.advise.pairs import layout_pairs, sides
from autotune.answers import best_in
from autotune.config import KNOBS, TrialConfig
from autotune.errors import ConfigError
from autotune.knobs import KNOB, value_of
from autotune.timeline import chrome_trace, spans, step_time
from storage import NotFoundError, TrialRecord
from storage.engine import safe_url
from storage.records import FINISHED_STATUSES, PAGE_SORTS, TRIAL_STATUSES

MAX_PAGE = 500  # trials per page at most
REASONS = {"oom": "out of memory", "timeout": "timed out", "failed": "failed"}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def hardware(info: Mapping[str, Any] | None) -> str:
    """A fingerprint in a few words: `2 x Intel Xeon ... (24 GiB)` or the GPUs, or `planned`."""
    if not info:
        return "unknown"
    if info.get("planned"):
        return f"planned: {info.get('cluster')} ({info.get('device')})"
    gpus = info.get("gpus")
    if gpus:
        names = {str(g.get("name", g)) if isinstance(g, Mapping) else str(g) for g in gpus}
        return f"{len(gpus)} x {', '.join(sorted(names))}"
    return f"{info.get('cpus', '?')} cores, {info.get('cpu', 'CPU')} ({info.get('memory_gib', '?')} GiB)"


def knobs_of(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: value_of(dict(config), k) for k in KNOBS}


# -- studies ---------------------------------------------------------------------------------
def studies(store: Any, *, advice: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every study: model, cluster, hardware, counts by status, best configuration, verdict.

    `advice` (study name -> `verdict_summary`), where given, supplies the verdicts (the app keeps
    them between requests while nothing changes); otherwise they are computed here."""
    counts = store.status_counts()
    rows = []
    for record in store.studies():
        known = advice.get(record.name) if advice is not None else None
        verdict = known if known is not None else verdict_summary(store, record.name)
        rows.append(study_summary(store, record, counts.get(record.name, {}), verdict))
    return {"storage": safe_url(store.url), "studies": rows}


def study_summary(
    store: Any, record: Any, counts: Mapping[str, int], verdict: dict[str, Any] | None
) -> dict[str, Any]:
    """A study's line in the studies list (`verdict`: `verdict_summary`'s, or None: not asked)."""
    try:
        best: dict[str, Any] | None = best_in(store, study=record.name).to_dict()
    except ConfigError:
        best = None
    lease = store.lease(record.name)
    return {
        "name": record.name,
        "model": record.model,
        "cluster": record.cluster,
        "hardware": hardware(store.fingerprint(record.fingerprint)),
        "fingerprint": record.fingerprint[:12],
        "created": _iso(record.created),
        "objective": record.space.get("objective", "tokens_per_s"),
        "counts": {s: int(counts.get(s, 0)) for s in TRIAL_STATUSES},
        "trials": int(sum(counts.values())),
        "running": lease is not None or bool(counts.get("running")),
        "best": best,
        "verdict": verdict,
    }


class StudyPoints:
    """Each study's chart points (`trial_points`), kept current by reading only what changed
    since the last read: trials added since, and those running then (they may have finished).
    A study that got new predictions is read whole (other studies' trials may answer it now)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[tuple[tuple[int, int], int, tuple[int, ...]], list[dict[str, Any]]]] = {}

    def __call__(self, name: str) -> list[dict[str, Any]]:
        marks = self._store.point_marks(name)  # before the rows: what changes later is read next time
        with self._lock:
            kept = self._kept.get(name)
        if kept is not None and kept[0] == marks:
            return kept[1]
        if kept is None or kept[0][0] != marks[0]:
            rows = self._store.trial_points(name, answering=True)
        else:
            (_, last, running), old = kept
            by_id = {p["id"]: p for p in old}
            for p in self._store.trial_points(name, answering=True, newer_than=last, ids=running):
                by_id[p["id"]] = p
            rows = [by_id[i] for i in sorted(by_id)]
        with self._lock:
            self._kept[name] = (marks, rows)
        return rows


def study(
    store: Any, name: str, points_of: Callable[[str], list[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """One study: its summary, its knobs and objective, and every trial as a chart point (its
    own and the ones of other studies that answer it from the store), by column: `points` maps
    each field (and `knobs` each knob) to one list, in trial order. `points_of` (a
    `StudyPoints`) keeps the rows between calls."""
    record = store.study(name)
    if record is None:
        raise NotFoundError(f"no study {name!r}")
    counts = store.status_counts().get(name, {})
    summary = study_summary(store, record, counts, None)  # the verdict comes from /advice
    summary.pop("verdict")
    rows = points_of(name) if points_of is not None else store.trial_points(name, answering=True)
    measured = [p["tokens_per_s"] for p in rows]
    predicted = [p["predicted_tokens_per_s"] for p in rows]
    points: dict[str, Any] = {f: [p[f] for p in rows] for f in ("id", "own", "status")}
    points |= {f: [_iso(p[f]) for p in rows] for f in ("started_at", "finished_at")}
    points |= {
        "tokens_per_s": measured,
        "step_time_s": [p["step_time_s"] for p in rows],
        "mfu": [p["mfu"] for p in rows],
        "predicted_tokens_per_s": predicted,
        "prediction_error": [
            m / q - 1 if m and q else None for m, q in zip(measured, predicted, strict=True)
        ],
        "knobs": {k: [p[k] for p in rows] for k in KNOBS},
    }
    space_knobs = record.space.get("knobs") or {}
    return {
        **summary,
        "space_knobs": {k: space_knobs.get(k) for k in KNOBS},
        "points": points,
    }


def verdict_summary(store: Any, name: str) -> dict[str, Any]:
    """The study's verdict in a few fields (the studies list), or why there is none."""
    try:
        advice = advise_in(store, study=name)
    except ConfigError as exc:
        return {"verdict": None, "why": str(exc)}
    return {
        "verdict": advice.verdict,
        "predicted_speedup": advice.predicted_speedup,
        "interval": list(advice.interval),
        "measured_speedup": advice.measured_speedup,
        "basis": advice.basis,
        "measured_pairs": advice.measured_pairs,
    }


def advice(store: Any, name: str) -> dict[str, Any]:
    """`autotune advise --study NAME --json`, or `{"verdict": None, "why": ...}` where the study
    holds no BPipe configuration or no baseline."""
    if store.study(name) is None:
        raise NotFoundError(f"no study {name!r}")
    try:
        return advise_in(store, study=name).to_dict()
    except ConfigError as exc:
        return {"verdict": None, "why": str(exc)}


# -- trials ----------------------------------------------------------------------------------
def trial_row(rec: TrialRecord, study: str | None = None) -> dict[str, Any]:
    """A trial as the trials table shows it."""
    predicted = (rec.predicted or {}).get("tokens_per_s")
    duration = (rec.finished_at - rec.started_at).total_seconds() if rec.finished_at else None
    return {
        "id": rec.id,
        "study": rec.study,
        "own": study is None or rec.study == study,
        "source": "trial" if study is None or rec.study == study else f"store (study {rec.study})",
        "status": rec.status,
        "reason": REASONS.get(rec.status),
        "error": rec.error,
        "knobs": knobs_of(rec.config),
        "tokens_per_s": rec.tokens_per_s,
        "step_time_s": rec.step_time_s,
        "mfu": rec.mfu,
        "predicted_tokens_per_s": predicted,
        "prediction_error": rec.tokens_per_s / predicted - 1 if rec.tokens_per_s and predicted else None,
        "started_at": _iso(rec.started_at),
        "finished_at": _iso(rec.finished_at),
        "duration_s": duration,
    }


def parse_filters(query: Mapping[str, str]) -> dict[str, Any]:
    """Knob filters from query parameters (`schedule=bpipe`, `tp=2`, `flash_attention=true`);
    ValueError naming a parameter whose value is not a knob's."""
    out: dict[str, Any] = {}
    for knob in KNOBS:
        raw = query.get(knob)
        if raw is None or raw == "":
            continue
        kind = KNOB[knob].kind
        if kind == "choice":
            out[knob] = raw
        elif kind == "switch":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{knob}: {raw!r} is not true or false")
            out[knob] = raw.lower() in ("true", "1")
        else:
            try:
                out[knob] = int(raw)
            except ValueError:
                raise ValueError(f"{knob}: {raw!r} is not an integer") from None
    return out


def trials(
    store: Any, name: str, *, offset: int = 0, limit: int = 50, sort: str = "id", order: str = "asc",
    status: str | None = None, knobs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One page of a study's trials (its own and those answering it), sorted and filtered in the
    database: `{"total", "offset", "limit", "sort", "order", "trials": [trial_row, ...]}`."""
    if sort not in PAGE_SORTS and sort not in KNOBS:
        raise ValueError(f"sort: {sort!r} is not one of {', '.join(PAGE_SORTS + KNOBS)}")
    if order not in ("asc", "desc"):
        raise ValueError(f"order: {order!r} is not asc or desc")
    if status is not None and status not in TRIAL_STATUSES:
        raise ValueError(f"status: {status!r} is not one of {', '.join(TRIAL_STATUSES)}")
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit: {limit} is not between 1 and {MAX_PAGE}")
    if offset < 0:
        raise ValueError(f"offset: {offset} is negative")
    total, page = store.trial_page(name, offset=offset, limit=limit, sort=sort, descending=order == "desc",
                                   status=status, knobs=dict(knobs or {}), answering=True)  # fmt: skip
    return {"total": total, "offset": offset, "limit": limit, "sort": sort, "order": order,
            "trials": [trial_row(r, name) for r in page]}  # fmt: skip


def trial(store: Any, trial_id: int) -> dict[str, Any]:
    """One trial: its row, configuration, losses, per-stage memory (measured, predicted, the cap,
    evicted bytes) and the trial it is compared with by default (its timeline: `timeline`)."""
    rec = store.trial(trial_id)
    cap = rec.config.get("memory_limit") or (rec.predicted or {}).get("memory_limit_bytes")
    return {
        **trial_row(rec),
        "config": rec.config,
        "fingerprint": rec.fingerprint[:12],
        "worker": rec.worker,
        "attempt": rec.attempt,
        "optuna_number": rec.optuna_number,
        "achieved_tflops": rec.achieved_tflops,
        "losses": list(rec.losses),
        "predicted": rec.predicted,
        "stages": [dict(st) for st in rec.stages],
        "cap_bytes": cap,
        "counterpart": counterpart(store, rec),
    }


def counterpart(store: Any, rec: TrialRecord) -> int | None:
    """The trial a trial is compared with by default: for a BPipe trial the fastest measured
    baseline at its layout (the layout pair's), for a baseline the pair's BPipe trial; None
    where its layout has no such pair."""
    if rec.status not in FINISHED_STATUSES:
        return None
    c = rec.config
    group = (rec.fingerprint, str(c["model"]), int(c["global_batch_size"]))
    layout = (int(c["tp"]), int(c["pp"]), int(c["dp"]))
    for pair in layout_pairs(sides(store.trials(study=rec.study))):
        if pair.baseline is None or pair.bpipe.layout != pair.baseline.layout:
            continue  # no pair, or a headline pair across two layouts
        mine, other = (pair.bpipe, pair.baseline) if c["schedule"] == "bpipe" else (pair.baseline, pair.bpipe)
        if mine.group == group and mine.layout == layout and other.trial_id not in (None, rec.id):
            return other.trial_id
    return None


def timeline(store: Any, trial_id: int) -> dict[str, Any]:
    """A trial's measured step and the simulator's, as span dicts on one time axis (seconds).

    A trial recorded before timelines were kept has no measured one; its simulated one is then
    computed here from the study's stored profile, as the campaign would have."""
    rec = store.trial(trial_id)
    stored = store.timeline(trial_id)
    stored = stored if isinstance(stored, dict) else {}
    measured = spans(stored.get("measured"))
    simulated = spans(stored.get("simulated"))
    source = "stored"
    if not simulated:
        simulated, source = spans(_simulate(store, rec)), "computed"
    return {
        "trial": trial_id,
        "config": knobs_of(rec.config),
        "stages": int(rec.config.get("pp", 1)),
        "measured": [s.to_dict() for s in measured],
        "simulated": [s.to_dict() for s in simulated],
        "simulated_source": source,
        "measured_step_s": step_time(measured) or None,
        "simulated_step_s": step_time(simulated) or None,
    }


def _simulate(store: Any, rec: TrialRecord) -> list[dict[str, Any]]:
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.estimator import estimate
    from autotune.estimate.profiles import parse_profile

    record = store.study(rec.study)
    try:
        cfg = TrialConfig.from_dict(rec.config)
        stored = store.profile(rec.fingerprint, cfg.model.name)
        profile = parse_profile(stored) if stored else None
        cluster = load_cluster(record.cluster, comm=profile.comm if profile and profile.comm else None)
        result = estimate(cfg, cluster, profile=profile, record=True)
    except (ConfigError, ValueError, KeyError, RuntimeError):
        return []
    return list(result.get("timeline") or [])


def chrome(store: Any, trial_id: int) -> dict[str, Any]:
    """The trial's timelines as a Chrome trace (Perfetto, chrome://tracing)."""
    data = timeline(store, trial_id)
    tracks = {"measured": spans(data["measured"]), "simulated": spans(data["simulated"])}
    return chrome_trace({k: v for k, v in tracks.items() if v}, name=f"trial {trial_id}")


def compare(store: Any, a: int, b: int | None) -> dict[str, Any]:
    """Two trials side by side (`b` defaults to `a`'s counterpart): rows and timelines."""
    first = trial(store, a)
    other = b if b is not None else first["counterpart"]
    if other is None:
        raise NotFoundError(f"trial {a} has no counterpart to compare with; name one (?b=ID)")
    second = trial(store, other)
    return {"a": first, "b": second, "timelines": [timeline(store, a), timeline(store, other)]}
