"""The store's errors: bad user input names its flag; misuse by a caller is a plain exception."""

from __future__ import annotations

from autotune.errors import ConfigError


class StoreError(ConfigError):
    """A storage URL or a store request a user can fix: one line, naming the flag and the rule.

    The field is `--storage` for URL and connection problems, `--study` for a clashing study.
    Raising it never leaves anything written.
    """


class FinishedTrialError(RuntimeError):
    """A finished trial was asked to change; finished trials are immutable."""


class NotFoundError(LookupError):
    """A trial, study or fingerprint that the store does not hold."""
