"""The trial result record: its JSON is contracts.md's "autotune trial" object, read back exactly."""

from __future__ import annotations

import json

import pytest

from autotune.results import StageResult, Status, TrialResult
from storage.records import FINISHED_STATUSES, TRIAL_STATUSES

# contracts.md, "autotune trial": the JSON fields in order (and the measured step's timeline after
# them, README "autotune trial"), and each stage object's
CONTRACT_KEYS = (
    "status", "error", "config", "step_time_s", "tokens_per_s", "achieved_tflops", "mfu", "losses", "stages",
    "timeline",
)  # fmt: skip
STAGE_KEYS = ("stage", "peak_activation_bytes", "peak_memory_bytes", "evicted_bytes")
CONFIG = {"model": "tiny-gpt", "tp": 1, "pp": 2, "dp": 1, "stage_layers": [1, 1], "world_size": 2}


def _ok() -> TrialResult:
    stages = tuple(StageResult(s, 3 * 2**30 + s, 5 * 2**30 + s, 2**20 * s) for s in range(2))
    timeline = (
        {"stage": 0, "label": "F0", "start": 0.0, "end": 0.1, "kind": "compute", "peer": None},
        {"stage": 1, "label": "wait F0", "start": 0.0, "end": 0.12, "kind": "wait", "peer": None},
    )
    return TrialResult(Status.OK, None, CONFIG, 0.5, 8192.0, 12.5, None, (10.8, 10.7), stages, timeline)


def _failed() -> TrialResult:
    return TrialResult.failure(CONFIG, status="oom", reason="stage 1 over the memory limit")


@pytest.mark.parametrize("result", [_ok(), _failed()], ids=["ok", "failed"])
def test_the_json_reads_back_as_the_same_record(result: TrialResult) -> None:
    data = json.loads(json.dumps(result.to_dict()))  # as `autotune trial --json` prints it
    assert data == result.to_dict()
    back = TrialResult.from_dict(data)
    assert back == result and back.to_dict() == data
    assert type(back.status) is Status and isinstance(back.losses, tuple) and isinstance(back.stages, tuple)


def test_the_json_is_the_contracts_object_of_plain_values() -> None:
    ok, failed = _ok().to_dict(), _failed().to_dict()
    assert list(ok) == list(failed) == list(CONTRACT_KEYS)
    assert type(ok["status"]) is str and ok["status"] == "ok"
    assert ok["losses"] == [10.8, 10.7] and type(ok["losses"]) is list
    assert type(ok["stages"]) is list and all(list(st) == list(STAGE_KEYS) for st in ok["stages"])
    assert ok["stages"][1] == {
        "stage": 1, "peak_activation_bytes": 3 * 2**30 + 1, "peak_memory_bytes": 5 * 2**30 + 1,
        "evicted_bytes": 2**20,
    }  # fmt: skip
    assert failed == {
        "status": "oom", "error": "stage 1 over the memory limit", "config": CONFIG, "step_time_s": None,
        "tokens_per_s": None, "achieved_tflops": None, "mfu": None, "losses": [], "stages": [],
        "timeline": [],
    }  # fmt: skip
    assert _ok().ok and not _failed().ok


def test_the_json_does_not_share_the_records_config() -> None:
    result = _ok()
    result.to_dict()["config"]["stage_layers"].append(9)
    assert result.config == CONFIG and TrialResult.from_dict(result.to_dict()).config is not result.config


@pytest.mark.parametrize("status", ["running", "OK", "crashed", None])
def test_an_unknown_status_is_refused_by_name(status: object) -> None:
    with pytest.raises(ValueError, match=f"status {status!r} is not one of 'ok', 'oom', 'failed', 'timeout'"):
        TrialResult.from_dict({**_ok().to_dict(), "status": status})


def test_unknown_keys_and_incomplete_stages_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown key.*'tokens_per_sec'"):
        TrialResult.from_dict({**_ok().to_dict(), "tokens_per_sec": 1.0})
    stage = {"stage": 0, "peak_activation_bytes": 1, "peak_memory_bytes": 2}
    with pytest.raises(ValueError, match="lacks evicted_bytes"):
        TrialResult.from_dict({**_ok().to_dict(), "stages": [stage]})
    with pytest.raises(ValueError, match="unknown key.*'predicted_peak_memory_bytes'"):
        StageResult.from_dict({**stage, "evicted_bytes": 0, "predicted_peak_memory_bytes": 3})


def test_missing_measurements_read_as_nothing_measured() -> None:
    nothing = TrialResult.failure({}, status="failed", reason=None)
    assert TrialResult.from_dict({"status": "failed"}) == nothing


def test_a_failure_is_never_ok() -> None:
    with pytest.raises(ValueError, match="cannot have status 'ok'"):
        TrialResult.failure(CONFIG, status=Status.OK, reason="fine")
    timeout = TrialResult.failure(CONFIG, status=Status.TIMEOUT, reason="did not finish within 15 s")
    assert (timeout.status, timeout.step_time_s, timeout.losses, timeout.stages) == ("timeout", None, (), ())


def test_statuses_are_the_stores_finished_statuses() -> None:
    assert [s.value for s in Status] == ["ok", "oom", "failed", "timeout"]
    assert tuple(Status) == FINISHED_STATUSES
    assert TRIAL_STATUSES == ("running", "ok", "oom", "failed", "timeout")


def test_a_timeline_span_of_an_unknown_kind_is_refused() -> None:
    data = _ok().to_dict()
    data["timeline"][0]["kind"] = "nap"
    with pytest.raises(ValueError, match="span kind 'nap'"):
        TrialResult.from_dict(data)
