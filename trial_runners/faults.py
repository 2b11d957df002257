"""Test hook: injected faults, so tests can make a real trial crash, hang or lose its worker.

`AUTOTUNE_INJECT_FAULT` holds one or more faults separated by `;`, each `KIND@RANK` optionally
followed by `:key=value,...` to aim it at the trials whose config matches every pair:

    crash@1                 rank 1 is killed (SIGKILL) at step 0 of every trial
    hang@0:schedule=gpipe   rank 0 sleeps forever at step 0 of gpipe trials
    error@0:pp=2,dp=1       rank 0 raises at step 0 of trials with pp 2 and dp 1
    oom@0:micro_batch_size=4  rank 0 ends as out of memory at step 0 (the real oom path)
    lost@0:pp=4             the Ray worker launching a pp-4 trial dies on its first attempt
                            (for `lost`, the number is the attempt: 0 first, 1 the retry)
"""

from __future__ import annotations

import os
from typing import Any

KINDS = ("crash", "hang", "error", "oom", "lost")


def _matches(where: str, config: dict[str, Any]) -> bool:
    for pair in filter(None, where.split(",")):
        key, _, want = pair.partition("=")
        if str(config.get(key.strip())).lower() != want.strip().lower():
            return False
    return True


def injected(config: dict[str, Any], rank: int, kinds: tuple[str, ...] = KINDS) -> str | None:
    """The kind of fault aimed at `rank` of a trial of `config`, or None."""
    for fault in filter(None, os.environ.get("AUTOTUNE_INJECT_FAULT", "").split(";")):
        head, _, where = fault.partition(":")
        kind, _, who = head.strip().partition("@")
        if kind in kinds and int(who or 0) == rank and _matches(where, config):
            return kind
    return None
