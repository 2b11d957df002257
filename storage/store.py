"""The SQL store: SQLite or PostgreSQL through SQLAlchemy, one transaction per call.

`_session` is the one place that opens a session, commits and rolls back. Every method reads
or writes inside it and turns rows into frozen records before the session closes, so no ORM
object leaves this package; a database that cannot take the write (a full disk, a read-only or
damaged file) becomes one `StoreError` line there. See `storage.base` for the contract every
store keeps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Select, and_, delete, func, inspect, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, contains_eager, sessionmaker

from autotune.knobs import KNOB
from autotune.results import TrialResult
from storage import _convert as conv
from storage.base import BaseStore
from storage.engine import FIELD, READ_ONLY, open_engine, parse_url, safe_url, sqlite_path, storage_failures
from storage.errors import FinishedTrialError, NotFoundError, StoreError
from storage.migrate import current_engine, ensure_current
from storage.models import (
    Base,
    Config,
    Fingerprint,
    Lease,
    Prediction,
    Profile,
    Study,
    Timeline,
    Trial,
    TrialStage,
    utcnow,
)
from storage.records import (
    INTERRUPTED,
    PAGE_KNOBS,
    PAGE_SORTS,
    LeaseRecord,
    PredictionRecord,
    StudyRecord,
    TrialRecord,
    config_hash,
    fingerprint_hash,
)

__all__ = ["Store", "StoreError", "FinishedTrialError", "NotFoundError", "config_hash", "fingerprint_hash"]


def _require_file(url: str) -> None:
    """A store opened only to read must not create an empty SQLite file."""
    path = sqlite_path(parse_url(url))
    if path is not None and not path.exists():
        raise StoreError(FIELD, f"no database at {str(path)!r}")


class Store(BaseStore):
    """A store at a database URL (`sqlite:///PATH`, `postgresql://USER@HOST/DB`).

    Opening validates the URL, checks the database and connects (`StoreError` on failure,
    nothing written: see `storage.engine.open_engine`), then migrates the schema to the newest
    revision unless `migrate=False`. `read_only=True` is for commands that only read (`autotune
    best`): it opens SQLite with `mode=ro` and PostgreSQL in read-only transactions, never
    migrates, refuses a database without autotune's data, and its write methods raise
    `RuntimeError`. `url` is the URL with its driver pinned (`postgresql://` becomes
    `postgresql+psycopg://`), ready for Optuna's storage; it holds the password, so show
    `storage.engine.safe_url(store.url)` instead.
    """

    def __init__(self, url: str, *, migrate: bool = True, read_only: bool = False) -> None:
        self.read_only = read_only
        self._migrated = migrate and not read_only
        if read_only or not migrate:
            _require_file(url)
        self._engine = open_engine(url, read_only=read_only)
        self.url = self._engine.url.render_as_string(hide_password=False)
        try:
            if self._migrated:
                ensure_current(self._engine)
            elif current_engine(self._engine) is None:
                raise StoreError(
                    FIELD,
                    f"{safe_url(self.url)} holds no autotune data (run a campaign or `autotune db upgrade`)",
                )
        except BaseException:
            self._engine.dispose()
            raise
        self._writes = sessionmaker(self._engine, expire_on_commit=False)
        self._reads = sessionmaker(
            self._engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _session(self, *, write: bool = True) -> Iterator[Session]:
        if write and self.read_only:
            raise RuntimeError(
                f"the store at {safe_url(self.url)} was opened read-only; use Store(url) to write"
            )
        with storage_failures(self.url, write=write):
            session = (self._writes if write else self._reads)()
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

    def _insert_missing(self, session: Session, table: type[Base], /, **values: Any) -> None:
        """INSERT unless a row with the same key exists, also against concurrent writers."""
        insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else pg_insert
        session.execute(insert(table).values(**values).on_conflict_do_nothing())

    def _study_id(self, session: Session, name: str) -> int:
        sid = session.scalar(select(Study.id).where(Study.name == name))
        if sid is None:
            raise NotFoundError(f"no study {name!r} in {safe_url(self.url)}")
        return sid

    def _check_fingerprint(self, session: Session, fingerprint: str) -> None:
        if session.get(Fingerprint, fingerprint) is None:
            raise NotFoundError(f"no hardware fingerprint {fingerprint!r}; register_fingerprint() it first")

    def _add_config(self, session: Session, config: dict[str, Any]) -> str:
        stored = conv.as_stored(config)
        key = config_hash(stored)
        self._insert_missing(session, Config, hash=key, config=stored)
        return key

    def register_fingerprint(self, info: dict[str, Any]) -> str:
        stored = conv.as_stored(info)
        key = fingerprint_hash(stored)
        with self._session() as s:
            self._insert_missing(s, Fingerprint, hash=key, info=stored, created=utcnow())
        return key

    def fingerprint(self, key: str) -> dict[str, Any] | None:
        with self._session(write=False) as s:
            row = s.get(Fingerprint, key)
            return None if row is None else dict(row.info)

    def create_study(
        self, name: str, *, space: dict[str, Any], model: str, cluster: str, fingerprint: str
    ) -> StudyRecord:
        want = {
            "space": conv.as_stored(space),
            "model": model,
            "cluster": cluster,
            "fingerprint_hash": fingerprint,
        }
        with self._session() as s:
            self._check_fingerprint(s, fingerprint)
            self._insert_missing(s, Study, name=name, created=utcnow(), **want)
            row = s.scalars(select(Study).where(Study.name == name)).one()
            clash = [k.removesuffix("_hash") for k, v in want.items() if getattr(row, k) != v]
            if clash:
                rule = f"study {name!r} already exists with a different {', '.join(clash)}"
                raise StoreError(
                    "--study", f"{rule} (model {row.model}, cluster {row.cluster}); choose another name"
                )
            return conv.study_record(row)

    def study(self, name: str) -> StudyRecord | None:
        with self._session(write=False) as s:
            row = s.scalars(select(Study).where(Study.name == name)).one_or_none()
            return None if row is None else conv.study_record(row)

    def studies(self) -> list[StudyRecord]:
        with self._session(write=False) as s:
            return [conv.study_record(r) for r in s.scalars(select(Study).order_by(Study.id))]

    def save_predictions(self, study: str, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Replace the study's predictions; `rows` are `(config, predicted)`, best first (rank 1)."""
        with self._session() as s:
            sid = self._study_id(s, study)
            s.execute(delete(Prediction).where(Prediction.study_id == sid))
            for rank, (config, predicted) in enumerate(rows, start=1):
                key = self._add_config(s, config)
                s.add(
                    Prediction(study_id=sid, config_hash=key, predicted=conv.as_stored(predicted), rank=rank)
                )

    def predictions(
        self, study: str | None = None, *, model: str | None = None, cluster: str | None = None
    ) -> list[PredictionRecord]:
        query = _by_study(
            select(Prediction).join(Prediction.study), study=study, model=model, cluster=cluster
        )
        query = query.options(contains_eager(Prediction.study)).order_by(Study.id, Prediction.rank)
        with self._session(write=False) as s:
            return [conv.prediction_record(r) for r in s.scalars(query).unique()]

    def start_trial(
        self,
        study: str,
        *,
        config: dict[str, Any],
        fingerprint: str,
        predicted: dict[str, Any] | None = None,
        optuna_number: int | None = None,
        attempt: int = 1,
        worker: str | None = None,
    ) -> int:
        with self._session() as s:
            sid = self._study_id(s, study)
            self._check_fingerprint(s, fingerprint)
            row = Trial(
                study_id=sid,
                config_hash=self._add_config(s, config),
                fingerprint_hash=fingerprint,
                status="running",
                predicted=None if predicted is None else conv.as_stored(predicted),
                optuna_number=optuna_number,
                attempt=attempt,
                worker=worker,
                started_at=utcnow(),
            )
            s.add(row)
            s.flush()
            return row.id

    def finish_trial(
        self,
        trial_id: int,
        result: TrialResult | dict[str, Any],
        *,
        attempt: int | None = None,
        worker: str | None = None,
        simulated: list[dict[str, Any]] | None = None,
    ) -> TrialRecord:
        """Record a running trial's result; `FinishedTrialError` if it is already finished.

        The result's measured timeline, and `simulated` (the simulator's timeline of the same
        configuration) beside it, are kept as the trial's timeline (`timeline(trial_id)`:
        `{"measured": [...], "simulated": [...]}`, span dicts of `autotune.timeline`)."""
        if not isinstance(result, TrialResult):
            result = TrialResult.from_dict(result)
        values = conv.finish_values(result)
        values.update({k: v for k, v in (("attempt", attempt), ("worker", worker)) if v is not None})
        with self._session() as s:
            done = s.execute(
                update(Trial)
                .where(Trial.id == trial_id, Trial.status == "running")
                .values(finished_at=utcnow(), **values)
                .returning(Trial.predicted)
            ).one_or_none()
            if done is None:
                status = s.scalar(select(Trial.status).where(Trial.id == trial_id))
                if status is None:
                    raise NotFoundError(f"no trial {trial_id} in {safe_url(self.url)}")
                raise FinishedTrialError(
                    f"trial {trial_id} already finished ({status}); finished trials never change"
                )
            s.add_all(
                TrialStage(trial_id=trial_id, **row) for row in conv.stage_values(result, done.predicted)
            )
            if result.timeline or simulated:
                timeline = {"measured": list(result.timeline), "simulated": list(simulated or ())}
                s.merge(Timeline(trial_id=trial_id, timeline=conv.as_stored(timeline)))
            s.flush()
            return self._trial_in(s, trial_id)

    def interrupt_running(self, study: str) -> list[TrialRecord]:
        with self._session() as s:
            sid = self._study_id(s, study)
            ids = s.scalars(
                update(Trial)
                .where(Trial.study_id == sid, Trial.status == "running")
                .values(status="failed", error=INTERRUPTED, finished_at=utcnow())
                .returning(Trial.id)
            ).all()
            return [self._trial_in(s, i) for i in sorted(ids)]

    def trial(self, trial_id: int) -> TrialRecord:
        with self._session(write=False) as s:
            return self._trial_in(s, trial_id)

    def _trial_in(self, session: Session, trial_id: int) -> TrialRecord:
        query = _trial_query().where(Trial.id == trial_id).execution_options(populate_existing=True)
        row = session.scalars(query).unique().one_or_none()
        if row is None:
            raise NotFoundError(f"no trial {trial_id} in {safe_url(self.url)}")
        return conv.trial_record(row)

    def trials(
        self,
        *,
        study: str | None = None,
        model: str | None = None,
        cluster: str | None = None,
        fingerprint: str | None = None,
        status: str | None = None,
        config_hash: str | None = None,
    ) -> list[TrialRecord]:
        query = _by_study(_trial_query(), study=study, model=model, cluster=cluster)
        query = _matching(query, (Trial.fingerprint_hash, fingerprint), (Trial.status, status))
        query = _matching(query, (Trial.config_hash, config_hash))
        with self._session(write=False) as s:
            return [conv.trial_record(r) for r in s.scalars(query.order_by(Trial.id)).unique()]

    def trial_page(
        self,
        study: str,
        *,
        offset: int = 0,
        limit: int = 50,
        sort: str = "id",
        descending: bool = False,
        status: str | None = None,
        knobs: dict[str, Any] | None = None,
        answering: bool = False,
    ) -> tuple[int, list[TrialRecord]]:
        if sort not in PAGE_SORTS and sort not in PAGE_KNOBS:
            raise ValueError(f"sort {sort!r} is not one of {', '.join(PAGE_SORTS + PAGE_KNOBS)}")
        unknown = sorted(set(knobs or {}) - set(PAGE_KNOBS))
        if unknown:
            raise ValueError(f"knob {unknown[0]!r} is not one of {', '.join(PAGE_KNOBS)}")
        with self._session(write=False) as s:
            where = [self._of_study(s, study, answering)]
            if status is not None:
                where.append(Trial.status == status)
            matching = [_knob_equals(knob, value) for knob, value in (knobs or {}).items()]
            if matching:  # each configuration's JSON read once, not once per trial
                where.append(Trial.config_hash.in_(select(Config.hash).where(*matching)))
            key = getattr(Trial, sort) if sort in PAGE_SORTS else _knob_column(sort)
            order = [key.desc() if descending else key.asc(), Trial.id.desc() if descending else Trial.id]
            if sort in PAGE_SORTS and sort != "id":  # trials without the value come last either way
                order.insert(0, key.is_(None))
            # one pass: the page and, beside each row, how many match (a window count)
            query = select(Trial.id, func.count().over()).where(*where)
            if sort in PAGE_KNOBS:
                query = query.join(Trial.config)
            found = s.execute(query.order_by(*order).offset(offset).limit(limit)).all()
            if not found:  # past the end: count alone
                counted = select(func.count()).select_from(select(Trial.id).where(*where).subquery())
                return int(s.scalar(counted) or 0), []
            total, page = int(found[0][1]), [row[0] for row in found]
            rows = s.scalars(_trial_query().where(Trial.id.in_(page))).unique().all()
            by_id = {r.id: conv.trial_record(r) for r in rows}
            return total, [by_id[i] for i in page]

    def trial_points(
        self, study: str, *, answering: bool = False, newer_than: int | None = None, ids: Sequence[int] = ()
    ) -> list[dict[str, Any]]:
        knobs = [_knob_column(k).label(k) for k in PAGE_KNOBS]
        cols = (Trial.id, Trial.status, Trial.started_at, Trial.finished_at, Trial.tokens_per_s,
                Trial.step_time_s, Trial.mfu, Trial.study_id,
                Trial.predicted["tokens_per_s"].as_float().label("predicted_tokens_per_s"),
                Trial.predicted["step_time_s"].as_float().label("predicted_step_time_s"))  # fmt: skip
        with self._session(write=False) as s:  # values taken out of the JSON by the database
            sid = self._study_id(s, study)
            query = select(*cols, *knobs).join(Trial.config).where(self._of_study(s, sid, answering))
            if newer_than is not None:
                query = query.where(or_(Trial.id > newer_than, Trial.id.in_(list(ids))))
            result = s.execute(query.order_by(Trial.id))
            names = list(result.keys())
            out = []
            for row in result:
                point = dict(zip(names, row, strict=True))
                point["own"] = point.pop("study_id") == sid
                out.append(point)
            return out

    def point_marks(self, study: str) -> tuple[tuple[int, int], int, tuple[int, ...]]:
        with self._session(write=False) as s:
            sid = self._study_id(s, study)
            mine = Prediction.study_id == sid
            predictions = s.execute(select(func.count(), func.max(Prediction.id)).where(mine)).one()
            last = s.scalar(select(func.max(Trial.id))) or 0
            running = s.scalars(select(Trial.id).where(Trial.status == "running").order_by(Trial.id)).all()
            return (int(predictions[0]), int(predictions[1] or 0)), int(last), tuple(running)

    def _of_study(self, session: Session, study: str | int, answering: bool) -> Any:
        """The trials of `study` (a name, or its id); with `answering`, also the finished trials of
        other studies on its hardware that measured one of its configurations (they answer it
        from the store)."""
        sid = study if isinstance(study, int) else self._study_id(session, study)
        if not answering:
            return Trial.study_id == sid
        fingerprint = session.scalar(select(Study.fingerprint_hash).where(Study.id == sid))
        mine = select(Prediction.config_hash).where(Prediction.study_id == sid)
        return or_(
            Trial.study_id == sid,
            and_(
                Trial.fingerprint_hash == fingerprint,
                Trial.status != "running",
                Trial.config_hash.in_(mine),
            ),
        )

    def status_counts(self) -> dict[str, dict[str, int]]:
        query = (
            select(Study.name, Trial.status, func.count())
            .join(Trial.study)
            .group_by(Study.name, Trial.status)
        )
        with self._session(write=False) as s:
            counts: dict[str, dict[str, int]] = {}
            for name, status, n in s.execute(query):
                counts.setdefault(name, {})[status] = n
            return counts

    def save_profile(self, fingerprint: str, model: str, profile: dict[str, Any]) -> None:
        with self._session() as s:
            self._check_fingerprint(s, fingerprint)
            s.add(
                Profile(
                    fingerprint_hash=fingerprint,
                    model=model,
                    profile=conv.as_stored(profile),
                    created=utcnow(),
                )
            )

    def profile(self, fingerprint: str, model: str) -> dict[str, Any] | None:
        query = (
            select(Profile.profile)
            .where(Profile.fingerprint_hash == fingerprint, Profile.model == model)
            .order_by(Profile.created.desc(), Profile.id.desc())
            .limit(1)
        )
        with self._session(write=False) as s:
            return s.scalar(query)

    def save_timeline(self, trial_id: int, timeline: list[Any] | dict[str, Any]) -> None:
        with self._session() as s:
            if s.get(Trial, trial_id) is None:
                raise NotFoundError(f"no trial {trial_id} in {safe_url(self.url)}")
            s.merge(Timeline(trial_id=trial_id, timeline=conv.as_stored(timeline)))

    def timeline(self, trial_id: int) -> list[Any] | dict[str, Any] | None:
        with self._session(write=False) as s:
            return s.scalar(select(Timeline.timeline).where(Timeline.trial_id == trial_id))

    def acquire_lease(
        self, study: str, *, holder: str, host: str, pid: int, stale_after: float = 30.0
    ) -> LeaseRecord:
        now = utcnow()
        mine = {"holder": holder, "host": host, "pid": pid, "heartbeat_at": now}
        with self._session() as s:  # SQLite: BEGIN IMMEDIATE holds the write lock from here
            insert = sqlite_insert if s.get_bind().dialect.name == "sqlite" else pg_insert
            for _ in range(3):  # a lease released between our INSERT and SELECT: insert again
                took = s.execute(
                    insert(Lease)
                    .values(study=study, acquired_at=now, **mine)
                    .on_conflict_do_nothing()
                    .returning(Lease.study)
                ).first()
                if took is not None:
                    return self._lease_in(s, study)
                # PostgreSQL: FOR UPDATE makes a racing taker wait here, then see our lease
                query = select(Lease).where(Lease.study == study).with_for_update()
                row = s.scalars(query.execution_options(populate_existing=True)).one_or_none()
                if row is None:
                    continue
                held = conv.lease_record(row)
                if row.holder != holder and not held.abandoned(host=host, now=now, stale_after=stale_after):
                    raise StoreError("--study", held.refusal(now))
                values = mine if row.holder == holder else {**mine, "acquired_at": now}
                s.execute(
                    update(Lease).where(Lease.study == study, Lease.holder == row.holder).values(**values)
                )
                return self._lease_in(s, study)
        raise RuntimeError(f"the lease of study {study!r} kept vanishing while it was being taken")

    def heartbeat(self, study: str, holder: str) -> bool:
        with self._session() as s:
            beat = s.execute(
                update(Lease)
                .where(Lease.study == study, Lease.holder == holder)
                .values(heartbeat_at=utcnow())
                .returning(Lease.study)
            ).first()
            return beat is not None

    def release_lease(self, study: str, holder: str) -> None:
        with self._session() as s:
            s.execute(delete(Lease).where(Lease.study == study, Lease.holder == holder))

    def lease(self, study: str) -> LeaseRecord | None:
        with self._session(write=False) as s:
            row = s.get(Lease, study) if self._has_leases(s) else None
            return None if row is None else conv.lease_record(row)

    def leases(self) -> list[LeaseRecord]:
        with self._session(write=False) as s:
            if not self._has_leases(s):
                return []
            return [conv.lease_record(r) for r in s.scalars(select(Lease).order_by(Lease.study))]

    def _has_leases(self, session: Session) -> bool:
        """A store that did not migrate may read a schema from before leases (0003): none then."""
        return self._migrated or inspect(session.connection()).has_table(Lease.__tablename__)

    def _lease_in(self, session: Session, study: str) -> LeaseRecord:
        query = select(Lease).where(Lease.study == study).execution_options(populate_existing=True)
        return conv.lease_record(session.scalars(query).one())


def _trial_query() -> Select[Trial]:
    return select(Trial).join(Trial.study).options(contains_eager(Trial.study))


def _by_study(
    query: Select[Any], *, study: str | None, model: str | None, cluster: str | None
) -> Select[Any]:
    return _matching(query, (Study.name, study), (Study.model, model), (Study.cluster, cluster))


_SQL_KINDS = {"choice": "string", "switch": "boolean", "count": "integer"}  # of autotune.knobs' kinds


def _knob_column(knob: str) -> Any:
    """A knob of the trial's stored configuration as an SQL expression (JSON, both dialects); a
    later knob that an older configuration lacks reads as its default."""
    value = Config.config[knob]
    kind = _SQL_KINDS[KNOB[knob].kind]
    if kind == "string":
        column = value.as_string()
    else:
        column = value.as_boolean() if kind == "boolean" else value.as_integer()
    return func.coalesce(column, literal(KNOB[knob].default)) if KNOB[knob].later else column


def _knob_equals(knob: str, value: Any) -> Any:
    kind = _SQL_KINDS[KNOB[knob].kind]
    if kind == "boolean" and not isinstance(value, bool):
        raise ValueError(f"knob {knob!r} takes true or false, not {value!r}")
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"knob {knob!r} takes an integer, not {value!r}")
    if kind == "string" and not isinstance(value, str):
        raise ValueError(f"knob {knob!r} takes a name, not {value!r}")
    return _knob_column(knob) == value


def _matching(query: Select[Any], *filters: tuple[Any, str | None]) -> Select[Any]:
    """`query` narrowed to rows where each column equals its value; None values do not filter."""
    for column, value in filters:
        if value is not None:
            query = query.where(column == value)
    return query
