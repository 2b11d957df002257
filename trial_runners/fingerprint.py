"""The hardware fingerprint: what a measurement depends on, so one is never repeated on it."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def hardware_fingerprint(device: str) -> dict[str, Any]:
    """This machine as trials see it: device kind, model and count, CPU, memory (no torch)."""
    info: dict[str, Any] = {
        "device": device,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count() or 1,
        "memory_gib": round(_memory_bytes() / 2**30),
    }
    if device == "cuda":
        info["gpus"] = _gpus()
    return info
