"""Job folders: removed when their job ends, however it ends; those of a launcher killed
outright (SIGKILL: no `finally` runs) are removed by the next job, once their owner is gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trial_runners.launch import job_folder

ROOT = Path(__file__).resolve().parents[2]


def test_a_folder_lives_as_long_as_its_block(tmp_path: Path) -> None:
    with job_folder("autotune-trial-", str(tmp_path)) as folder:
        owner = json.loads((folder / "owner.json").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert not folder.exists()
    with pytest.raises(KeyboardInterrupt), job_folder("autotune-trial-", str(tmp_path)) as folder:
        raise KeyboardInterrupt
    assert not folder.exists()


def test_the_folder_of_a_killed_launcher_is_removed_by_the_next_job(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from trial_runners.launch import job_folder\n"
        "with job_folder('autotune-trial-', sys.argv[1]) as f:\n"
        "    print(f, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout is not None
    left = Path(proc.stdout.readline().strip())
    with job_folder("autotune-trial-", str(tmp_path)):
        assert left.exists(), "a live launcher's folder is kept"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    assert left.exists()  # SIGKILL: nothing cleaned up
    foreign = tmp_path / "autotune-trial-other-host"
    foreign.mkdir()
    (foreign / "owner.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "0"}))
    unowned = tmp_path / "autotune-trial-unowned"
    unowned.mkdir()
    with job_folder("autotune-trial-", str(tmp_path)) as mine:
        assert not left.exists(), "the dead launcher's folder is removed"
        assert foreign.exists() and unowned.exists()  # another host's, or not a job folder of ours
        assert mine.exists()
