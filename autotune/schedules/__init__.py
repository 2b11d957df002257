"""Schedules as data: the IR, generators, the validator and renderers (torch-free)."""

from autotune.schedules.generators import default_cap
from autotune.schedules.ir import Action, Kind, Schedule
from autotune.schedules.registry import BASELINES, SCHEDULE, SCHEDULES, ScheduleSpec, generate
from autotune.schedules.render import from_text, grid, to_csv, to_text
from autotune.schedules.validate import ScheduleError, validate

__all__ = [
    "BASELINES",
    "SCHEDULE",
    "SCHEDULES",
    "Action",
    "Kind",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "default_cap",
    "from_text",
    "generate",
    "grid",
    "to_csv",
    "to_text",
    "validate",
]
