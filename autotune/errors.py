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


def key_name(key: object) -> str:
    """A YAML key as an error's field: itself when it is a plain one-line string, else its repr
    (an empty key, a number, a key holding a line break), so the message stays one clear line."""
    if isinstance(key, str) and key.strip() and key.isprintable():
        return key
    return repr(key)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread like Ctrl-C's KeyboardInterrupt (a subclass, so
    libraries that stop cleanly on Ctrl-C, Ray's blocking calls among them, stop on it too, even
    where they re-raise a plain KeyboardInterrupt), and every `finally` block runs;
    `sigterm_received()` then tells the two apart (exit 143, not 130)."""


_SIGTERM = {"seen": False}


def sigterm_received() -> bool:
    return _SIGTERM["seen"]


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (call it again after a library,
    such as Ray, installs a handler of its own); elsewhere it does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        _SIGTERM["seen"] = True
        raise Terminated(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to stderr and goes on (for a campaign that
    seems stuck); elsewhere than the main thread it does nothing."""
    import faulthandler
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
