"""autotune: find the fastest parallel configuration for training a transformer.

The package's core (config, schedules) imports neither torch nor ray; the trial runners and the
store are imported lazily by the CLI.
"""

from autotune.config import ModelSpec, TrialConfig, load_model
from autotune.errors import ConfigError

__all__ = ["ConfigError", "ModelSpec", "TrialConfig", "load_model"]
__version__ = "0.1.0"
