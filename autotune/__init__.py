"""autotune: find the fastest parallel configuration for training a transformer.

The package's core (config, schedules) imports neither torch nor ray; the trial runners and the
store are imported lazily by the CLI.
"""

from autotune.answers import BestConfig, best_config
from autotune.config import ModelSpec, TrialConfig, load_model
from autotune.errors import ConfigError

__all__ = ["BestConfig", "ConfigError", "ModelSpec", "TrialConfig", "best_config", "load_model"]
__version__ = "0.1.0"
