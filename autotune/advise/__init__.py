"""The BPipe advisor: `bpipe_payoff()` and `autotune advise` (torch-free, read-only)."""

from autotune.advise.advisor import Advice, Choice, bpipe_payoff

__all__ = ["Advice", "Choice", "bpipe_payoff"]
