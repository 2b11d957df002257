"""Search spaces and model / cluster presets, shipped as YAML data (never code)."""
