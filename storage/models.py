"""SQLAlchemy models of the store's tables; they live beside Optuna's, all prefixed `autotune_`.

Nothing outside `storage/` sees these classes: the store turns rows into frozen records
(`storage.records`) before it returns. The schema itself is created by the Alembic migrations
in `storage/migrations`; a test checks that these models and the migrated schema agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

HASH = String(64)
NAME = String(255)
VERSION_TABLE = "autotune_alembic_version"  # Alembic's, apart from Optuna's `alembic_version`


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every backend; read back as an aware UTC datetime."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Fingerprint(Base):
    __tablename__ = "autotune_fingerprints"

    hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    info: Mapped[dict[str, Any]]
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Study(Base):
    __tablename__ = "autotune_studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    space: Mapped[dict[str, Any]]
    model: Mapped[str] = mapped_column(NAME)
    cluster: Mapped[str] = mapped_column(NAME)
    fingerprint_hash: Mapped[str] = mapped_column(HASH, ForeignKey("autotune_fingerprints.hash"))
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Config(Base):
    __tablename__ = "autotune_configs"

    hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    config: Mapped[dict[str, Any]]


class Prediction(Base):
    __tablename__ = "autotune_predictions"
    __table_args__ = (UniqueConstraint("study_id", "rank", name="uq_autotune_predictions_study_rank"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("autotune_studies.id"))
    config_hash: Mapped[str] = mapped_column(HASH, ForeignKey("autotune_configs.hash"))
    predicted: Mapped[dict[str, Any]]
    rank: Mapped[int]

    study: Mapped[Study] = relationship(lazy="joined", innerjoin=True)
    config: Mapped[Config] = relationship(lazy="joined", innerjoin=True)


class Trial(Base):
    __tablename__ = "autotune_trials"
    __table_args__ = (
        Index("ix_autotune_trials_study_status", "study_id", "status"),
        Index("ix_autotune_trials_config_fingerprint", "config_hash", "fingerprint_hash"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("autotune_studies.id"))
    config_hash: Mapped[str] = mapped_column(HASH, ForeignKey("autotune_configs.hash"))
    fingerprint_hash: Mapped[str] = mapped_column(HASH, ForeignKey("autotune_fingerprints.hash"))
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    step_time_s: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    mfu: Mapped[float | None] = mapped_column(Float)
    achieved_tflops: Mapped[float | None] = mapped_column(Float)
    losses: Mapped[list[Any] | None]
    predicted: Mapped[dict[str, Any] | None]
    optuna_number: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(default=1)
    worker: Mapped[str | None] = mapped_column(NAME)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(lazy="joined", innerjoin=True)
    config: Mapped[Config] = relationship(lazy="joined", innerjoin=True)
    stages: Mapped[list[TrialStage]] = relationship(
        lazy="selectin", order_by="TrialStage.stage", cascade="all, delete-orphan"
    )


class TrialStage(Base):
    __tablename__ = "autotune_trial_stages"

    trial_id: Mapped[int] = mapped_column(ForeignKey("autotune_trials.id"), primary_key=True)
    stage: Mapped[int] = mapped_column(primary_key=True)
    peak_activation_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    evicted_bytes: Mapped[int | None] = mapped_column(BigInteger)
    predicted_peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)


class Profile(Base):
    __tablename__ = "autotune_profiles"
    __table_args__ = (Index("ix_autotune_profiles_fingerprint_model", "fingerprint_hash", "model"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint_hash: Mapped[str] = mapped_column(HASH, ForeignKey("autotune_fingerprints.hash"))
    model: Mapped[str] = mapped_column(NAME)
    profile: Mapped[dict[str, Any]]
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Timeline(Base):
    __tablename__ = "autotune_timelines"

    trial_id: Mapped[int] = mapped_column(ForeignKey("autotune_trials.id"), primary_key=True)
    timeline: Mapped[Any] = mapped_column(JSON)


class Lease(Base):
    """Which campaign runs a study now; keyed by the study's name, which may not be a row yet."""

    __tablename__ = "autotune_leases"

    study: Mapped[str] = mapped_column(NAME, primary_key=True)
    holder: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(NAME)
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
