"""The dashboard's kept chart points (`StudyPoints`): after every kind of change a campaign makes,
reading only what changed gives exactly what reading the whole study gives."""

from __future__ import annotations

import random
from pathlib import Path

from autotune.dashboard.data import StudyPoints
from benchmarks.bench_dashboard import FINGERPRINT, KNOB_VALUES, STUDY, _config, write_trial
from storage import Store


def test_kept_points_equal_a_full_read_after_each_change(tmp_path: Path) -> None:
    rng = random.Random(3)
    url = f"sqlite:///{tmp_path / 'points.db'}"
    space = {"objective": "tokens_per_s", "knobs": {k: list(v) for k, v in KNOB_VALUES.items()}}
    with Store(url) as writer:
        fp = writer.register_fingerprint(FINGERPRINT)
        writer.create_study(STUDY, space=space, model="gpt3-175b", cluster="h100-8x", fingerprint=fp)
        writer.create_study("other", space=space, model="gpt3-175b", cluster="h100-8x", fingerprint=fp)
        for i in range(20):
            write_trial(writer, fp, rng, i)
        reader = Store(url, read_only=True)
        kept = StudyPoints(reader)

        def same() -> list[dict[str, object]]:
            rows = kept(STUDY)
            assert rows == reader.trial_points(STUDY, answering=True)
            return rows

        assert len(same()) == 20
        assert kept(STUDY) is kept(STUDY)  # nothing changed: nothing read again
        # a trial starts (running), then another finishes; then the running one finishes
        cfg = _config({"tp": 2, "pp": 2, "dp": 1, "micro_batch_size": 1, "schedule": "bpipe",
                       "recompute": "none", "flash_attention": True})  # fmt: skip
        running = writer.start_trial(STUDY, config=cfg, fingerprint=fp, predicted={"tokens_per_s": 1e4})
        assert [p["status"] for p in same() if p["id"] == running] == ["running"]
        write_trial(writer, fp, rng, 21)
        assert len(same()) == 22
        _, _, result = write_trial(writer, fp, rng, 22)
        writer.finish_trial(running, result)
        assert [p["status"] for p in same() if p["id"] == running] != ["running"]
        # another study measures a configuration this one predicted: it answers it once predicted
        other = writer.start_trial("other", config=cfg, fingerprint=fp, predicted={"tokens_per_s": 1e4})
        writer.finish_trial(other, result)
        assert other not in [p["id"] for p in same()]
        writer.save_predictions(STUDY, [(cfg, {"tokens_per_s": 1e4, "step_time_s": 1.0})])
        rows = same()
        assert [p["own"] for p in rows if p["id"] == other] == [False]
        reader.close()
