"""The SQL store: SQLite or PostgreSQL through SQLAlchemy, one transaction per call.

`_session` is the one place that opens a session, commits and rolls back. Every method reads
or writes inside it and turns rows into frozen records before the session closes, so no ORM
object leaves this package. See `storage.base` for the contract every store keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, contains_eager, sessionmaker

from storage import _convert as conv
from storage.base import BaseStore
from storage.engine import FIELD, READ_ONLY, is_memory, open_engine, parse_url, safe_url
from storage.errors import FinishedTrialError, NotFoundError, StoreError
from storage.migrate import current_engine, ensure_current
from storage.models import (
    Base,
    Config,
    Fingerprint,
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
    PredictionRecord,
    StudyRecord,
    TrialRecord,
    config_hash,
    fingerprint_hash,
)

__all__ = ["Store", "StoreError", "FinishedTrialError", "NotFoundError", "config_hash", "fingerprint_hash"]


def _require_file(url: str) -> None:
    """A store opened only to read must not create an empty SQLite file."""
    parsed = parse_url(url)
    if parsed.drivername == "sqlite" and not is_memory(parsed) and not Path(parsed.database or "").exists():
        raise StoreError(FIELD, f"no database at {parsed.database!r}")


class Store(BaseStore):
    """A store at a database URL (`sqlite:///PATH`, `postgresql://USER@HOST/DB`).

    Opening validates the URL and connects (`StoreError` on failure, nothing written), then
    migrates the schema to the newest revision unless `migrate=False`. `url` is the URL with its
    driver pinned (`postgresql://` becomes `postgresql+psycopg://`), ready for Optuna's storage.
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        if not migrate:
            _require_file(url)
        self._engine = open_engine(url)
        self.url = self._engine.url.render_as_string(hide_password=False)
        try:
            if migrate:
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
        self, trial_id: int, result: dict[str, Any], *, attempt: int | None = None, worker: str | None = None
    ) -> TrialRecord:
        """Record a running trial's result; `FinishedTrialError` if it is already finished."""
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


def _trial_query() -> Select[Trial]:
    return select(Trial).join(Trial.study).options(contains_eager(Trial.study))


def _by_study(
    query: Select[Any], *, study: str | None, model: str | None, cluster: str | None
) -> Select[Any]:
    return _matching(query, (Study.name, study), (Study.model, model), (Study.cluster, cluster))


def _matching(query: Select[Any], *filters: tuple[Any, str | None]) -> Select[Any]:
    """`query` narrowed to rows where each column equals its value; None values do not filter."""
    for column, value in filters:
        if value is not None:
            query = query.where(column == value)
    return query
