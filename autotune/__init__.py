"""autotune: find the fastest parallel configuration for training a transformer.

The package's core (config, schedules) imports neither torch nor ray; the trial runners and the
store are imported lazily by the CLI, and the advisor (numpy) when it is first asked for.
"""

from typing import Any

from autotune.answers import BestConfig, best_config
from autotune.config import ModelSpec, TrialConfig, load_model
from autotune.errors import ConfigError

__all__ = [
    "Advice", "BestConfig", "ConfigError", "ModelSpec", "TrialConfig", "best_config", "bpipe_payoff",
    "load_model",
]  # fmt: skip
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:  # `from autotune import bpipe_payoff`, imported on first use
    if name in ("Advice", "bpipe_payoff"):
        from autotune import advise

        return getattr(advise, name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
