"""Rows to records, inside the session that loaded them; and values to what JSON stores."""

from __future__ import annotations

import copy
import json
from typing import Any

from autotune.results import TrialResult
from storage.engine import dump_json
from storage.models import Lease, Prediction, Study, Trial
from storage.records import LeaseRecord, PredictionRecord, StudyRecord, TrialRecord

STAGE_FIELDS = ("peak_activation_bytes", "peak_memory_bytes", "evicted_bytes", "predicted_peak_memory_bytes")


def as_stored(value: Any) -> Any:
    """`value` as it reads back from a JSON column (tuples as lists, NaN as None)."""
    return json.loads(dump_json(value))


def study_record(row: Study) -> StudyRecord:
    return StudyRecord(
        name=row.name,
        space=copy.deepcopy(row.space),
        model=row.model,
        cluster=row.cluster,
        fingerprint=row.fingerprint_hash,
        created=row.created,
    )


def lease_record(row: Lease) -> LeaseRecord:
    return LeaseRecord(
        study=row.study,
        holder=row.holder,
        host=row.host,
        pid=row.pid,
        acquired_at=row.acquired_at,
        heartbeat_at=row.heartbeat_at,
    )


def prediction_record(row: Prediction) -> PredictionRecord:
    return PredictionRecord(
        study=row.study.name,
        config=copy.deepcopy(row.config.config),
        config_hash=row.config_hash,
        predicted=copy.deepcopy(row.predicted),
        rank=row.rank,
    )


def trial_record(row: Trial) -> TrialRecord:
    stages = [{"stage": st.stage, **{k: getattr(st, k) for k in STAGE_FIELDS}} for st in row.stages]
    return TrialRecord(
        id=row.id,
        study=row.study.name,
        config=copy.deepcopy(row.config.config),
        config_hash=row.config_hash,
        fingerprint=row.fingerprint_hash,
        status=row.status,
        error=row.error,
        step_time_s=row.step_time_s,
        tokens_per_s=row.tokens_per_s,
        mfu=row.mfu,
        achieved_tflops=row.achieved_tflops,
        losses=list(row.losses or []),
        stages=stages,
        predicted=copy.deepcopy(row.predicted),
        optuna_number=row.optuna_number,
        attempt=row.attempt,
        worker=row.worker,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def predicted_peaks(predicted: dict[str, Any] | None) -> dict[int, int]:
    """Predicted peak memory by stage, from a prediction's `stages` list where it has one."""
    stages = (predicted or {}).get("stages") or []
    peaks = {}
    for i, st in enumerate(stages):
        if isinstance(st, dict) and st.get("peak_memory_bytes") is not None:
            peaks[int(st.get("stage", i))] = int(st["peak_memory_bytes"])
    return peaks


def finish_values(result: TrialResult) -> dict[str, Any]:
    """The trial columns a finished trial's result sets."""
    return {
        "status": result.status.value,
        "error": result.error,
        "step_time_s": result.step_time_s,
        "tokens_per_s": result.tokens_per_s,
        "mfu": result.mfu,
        "achieved_tflops": result.achieved_tflops,
        "losses": as_stored(list(result.losses)),
    }


def stage_values(result: TrialResult, predicted: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per measured stage, with the predicted peak memory beside the measured one."""
    peaks = predicted_peaks(predicted)
    return [{**st.to_dict(), "predicted_peak_memory_bytes": peaks.get(st.stage)} for st in result.stages]
