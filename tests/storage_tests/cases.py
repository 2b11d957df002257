"""Values the store tests share: hardware, a study, trial results as `autotune trial` prints them."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from storage import Store

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "count": 8, "interconnect": "nvlink"}
A100 = {"gpu": "NVIDIA A100-SXM4-40GB", "count": 8, "interconnect": "nvlink"}
SPACE = {"pp": [1, 2, 4], "schedule": ["1f1b", "bpipe"], "micro_batches": [4, 8]}


def config(pp: int = 2, schedule: str = "1f1b", micro_batches: int = 8) -> dict[str, Any]:
    return {
        "model": "gpt-small",
        "pp": pp,
        "tp": 1,
        "dp": 1,
        "schedule": schedule,
        "micro_batches": micro_batches,
    }


def predicted(pp: int = 2, step_time_s: float = 0.5) -> dict[str, Any]:
    stages = [
        {
            "stage": s,
            "peak_activation_bytes": 100 * (s + 1),
            "peak_memory_bytes": 1000 * (s + 1),
            "evicted_bytes": 0,
        }
        for s in range(pp)
    ]
    return {"step_time_s": step_time_s, "tokens_per_s": 1 / step_time_s, "fits": True, "stages": stages}


def result(
    status: str = "ok", *, pp: int = 2, step_time_s: float = 0.5, error: str | None = None
) -> dict[str, Any]:
    """A trial result JSON; failures carry no measurements, as `autotune trial` writes them."""
    if status != "ok":
        return {
            "status": status, "error": error or f"{status} in stage 0", "config": config(pp),
            "step_time_s": None, "tokens_per_s": None, "achieved_tflops": None, "mfu": None,
            "losses": [], "stages": [],
        }  # fmt: skip
    stages = [
        {
            "stage": s,
            "peak_activation_bytes": 3 * 2**30 + s,  # beyond 32-bit integers
            "peak_memory_bytes": 5 * 2**30 + s,
            "evicted_bytes": 2**20 * s,
        }
        for s in range(pp)
    ]
    return {
        "status": "ok", "error": None, "config": config(pp), "step_time_s": step_time_s,
        "tokens_per_s": 4096 / step_time_s, "achieved_tflops": 12.5, "mfu": 0.41,
        "losses": [10.8, 10.7, 10.65], "stages": stages,
    }  # fmt: skip


def study(
    store: Store, name: str = "s1", *, model: str = "gpt-small", cluster: str = "h100x8", hw: Any = None
) -> str:
    """Create a study on `hw` (default H100); returns the hardware fingerprint."""
    fp = store.register_fingerprint(hw or H100)
    store.create_study(name, space=SPACE, model=model, cluster=cluster, fingerprint=fp)
    return fp


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def autotune_sqlite(path: Path, *, trials: int = 20) -> str:
    """A real autotune database at `path` holding a study, its predictions and finished trials;
    closed, so its WAL is checkpointed into the file. Returns its URL."""
    url = f"sqlite:///{path}"
    with Store(url) as store:
        fp = study(store)
        store.save_predictions("s1", [(config(pp=p), predicted(pp=p)) for p in (1, 2, 4)])
        for i in range(trials):
            tid = store.start_trial(
                "s1", config=config(micro_batches=i), fingerprint=fp, predicted=predicted()
            )
            store.finish_trial(tid, result("ok" if i % 3 else "oom"))
    return url


def quick_check(path: Path) -> str:
    """SQLite's own verdict on the file, read-only: "ok", or its first complaint."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA quick_check").fetchone()[0])
    except sqlite3.DatabaseError as e:
        return str(e)
    finally:
        conn.close()
