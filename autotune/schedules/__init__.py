"""Schedules as data: the IR, generators, the validator and renderers (torch-free)."""

from autotune.schedules.generators import default_cap, generate
from autotune.schedules.ir import Action, Kind, Schedule
from autotune.schedules.render import from_text, grid, to_csv, to_text
from autotune.schedules.validate import ScheduleError, validate

__all__ = [
    "Action",
    "Kind",
    "Schedule",
    "ScheduleError",
    "default_cap",
    "from_text",
    "generate",
    "grid",
    "to_csv",
    "to_text",
    "validate",
]
