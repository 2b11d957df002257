"""The on-disk cache of compiled schedules: same answers, files under a code-hash folder, a bad
file ignored and rewritten, and a switch to turn it off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autotune.config import TrialConfig, load_model
from autotune.estimate import fastpath, schedule_cache
from autotune.estimate.clusters import load_cluster
from autotune.estimate.estimator import estimate, estimate_many


def _configs() -> list[TrialConfig]:
    model = load_model("gpt3-65b", num_layers=16)
    return [
        TrialConfig(model=model, tp=tp, pp=pp, dp=16 // (tp * pp), micro_batch_size=1, global_batch_size=64,
                    schedule=schedule, recompute="none", flash_attention=True)
        for tp, pp in ((8, 1), (8, 2), (4, 4)) for schedule in ("1f1b", "gpipe", "bpipe")
        if not (schedule == "bpipe" and pp < 3)
    ]  # fmt: skip


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fastpath, "_COMPILED", {})
    return tmp_path


def test_a_fresh_process_reads_what_the_first_one_wrote(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = load_cluster("a100-80g-8x2")
    first = estimate_many(_configs(), cluster)
    files = sorted(cache.glob("schedules-*/*.npz"))
    assert [f.parent.name for f in files] == [f"schedules-{schedule_cache.code_hash()}"] * len(files)
    assert {f.name for f in files} >= {"1f1b-p2-m64-capdefault.npz", "bpipe-p4-m64-cap3.npz"}
    monkeypatch.setattr(fastpath, "_COMPILED", {})  # as a new process would start
    monkeypatch.setattr(fastpath, "generate", _no_generation)
    assert estimate_many(_configs(), cluster) == first
    for cfg, result in zip(_configs(), first, strict=True):  # and the event simulator agrees
        slow = estimate(cfg, cluster, record=True)
        assert result["step_time_s"] == pytest.approx(slow["step_time_s"], rel=1e-12)
        assert result["stages"] == slow["stages"]


def _no_generation(*args: object, **kwargs: object) -> None:
    raise AssertionError("generated a schedule the cache holds")


def test_a_bad_file_is_ignored_and_rewritten(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = load_cluster("a100-80g-8x2")
    first = estimate_many(_configs(), cluster)
    target = next(cache.glob("schedules-*/1f1b-p2-m64-capdefault.npz"))
    target.write_bytes(b"not a zip file")
    other = next(cache.glob("schedules-*/gpipe-p2-m64-capdefault.npz"))
    np.savez(other, stage=np.zeros(3))  # readable, but not what a compiled schedule holds
    monkeypatch.setattr(fastpath, "_COMPILED", {})
    assert estimate_many(_configs(), cluster) == first
    assert schedule_cache.load("1f1b", 2, 64, None, fastpath._STORED) is not None  # rewritten
    assert schedule_cache.load("gpipe", 2, 64, None, fastpath._STORED) is not None


def test_the_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", "off")
    monkeypatch.setattr(fastpath, "_COMPILED", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert schedule_cache.folder() is None
    estimate_many(_configs(), load_cluster("a100-80g-8x2"))
    assert not list(tmp_path.rglob("*.npz"))


def test_folders_of_other_code_versions_are_removed(cache: Path) -> None:
    stale = cache / "schedules-0123456789abcdef"
    stale.mkdir()
    (stale / "1f1b-p2-m64-capdefault.npz").write_bytes(b"old")
    estimate_many(_configs(), load_cluster("a100-80g-8x2"))
    assert not stale.exists()
    assert list(cache.glob(f"schedules-{schedule_cache.code_hash()}/*.npz"))
