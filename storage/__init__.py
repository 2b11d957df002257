"""The store: every trial, prediction, profile and timeline, in SQLite or PostgreSQL.

Torch-free and ray-free. Open one with `Store(url)`; it hands out frozen records only.
"""

from storage.base import BaseStore
from storage.errors import FinishedTrialError, NotFoundError, StoreError
from storage.records import (
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
    "NotFoundError",
    "PredictionRecord",
    "Store",
    "StoreError",
    "StudyRecord",
    "TrialRecord",
    "config_hash",
    "fingerprint_hash",
]
