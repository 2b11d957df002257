"""The store: every trial, prediction, profile and timeline, in SQLite or PostgreSQL.

Torch-free and ray-free. Open one with `Store(url)` (`read_only=True` to only read); it hands out
frozen records only. `storage.lease.hold` keeps one campaign per study.
"""

from storage.base import BaseStore
from storage.errors import FinishedTrialError, NotFoundError, StoreError
from storage.records import (
    LeaseRecord,
    PredictionRecord,
    StudyRecord,
    TrialRecord,
    config_hash,
    fingerprint_hash,
)
from storage.store import Store

__all__ = [
    "BaseStore",
    "FinishedTrialError",
    "LeaseRecord",
    "NotFoundError",
    "PredictionRecord",
    "Store",
    "StoreError",
    "StudyRecord",
    "TrialRecord",
    "config_hash",
    "fingerprint_hash",
]
