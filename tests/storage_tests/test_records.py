"""Hashes identify configs and hardware by content; records are frozen values."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from datetime import UTC, datetime

import numpy as np
import pytest

from storage import TrialRecord, config_hash, fingerprint_hash


def test_config_hash_is_sha256_of_canonical_json() -> None:
    cfg = {"pp": 2, "schedule": "bpipe", "sizes": (1, 2)}
    assert config_hash(cfg) == hashlib.sha256(b'{"pp":2,"schedule":"bpipe","sizes":[1,2]}').hexdigest()
    assert config_hash(cfg) == config_hash({"sizes": [1, 2], "schedule": "bpipe", "pp": 2})
    assert config_hash(cfg) != config_hash({**cfg, "pp": 4})
    assert config_hash({"pp": np.int64(2), "schedule": "bpipe", "sizes": [1, 2]}) == config_hash(cfg)


def test_fingerprint_hash_ignores_key_order() -> None:
    assert fingerprint_hash({"gpu": "H100", "count": 8}) == fingerprint_hash({"count": 8, "gpu": "H100"})


def test_non_finite_numbers_have_no_hash() -> None:
    with pytest.raises(ValueError):
        config_hash({"lr": float("nan")})


def test_trial_records_are_frozen_picklable_values() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = TrialRecord(
        id=1, study="s", config={"pp": 2}, config_hash="h", fingerprint="f", status="running", error=None,
        step_time_s=None, tokens_per_s=None, mfu=None, achieved_tflops=None, losses=[], stages=[],
        predicted=None, optuna_number=None, attempt=1, worker=None, started_at=now, finished_at=None,
    )  # fmt: skip
    assert not record.finished and dataclasses.replace(record, status="oom").finished
    assert pickle.loads(pickle.dumps(record)) == record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "ok"  # type: ignore[misc]
