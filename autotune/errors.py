"""Errors that carry the offending field, so every front end can print one clear line."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: names the field (a CLI flag or a YAML key) and the rule it breaks.

    The CLI turns it into one line on stderr and exit code 2; nothing is written.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule
