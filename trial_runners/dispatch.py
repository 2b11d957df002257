"""Ray dispatch: each real trial runs on a worker holding its world size in a placement group.

Locally Ray starts by itself (`address=None`); `address="ray://..."` or `"auto"` joins an existing
cluster. A trial reserves one bundle per rank (`{"CPU": 1}`, or `{"GPU": 1, "CPU": 1}` with
device cuda) packed on one node, and its launcher task runs in the first bundle, starting the
ranks as fresh processes (trial_runners.launch kills them as a process group on timeout). A
lost worker (its process or node died) gets one retry; a second loss is a `failed` result with
the reason. Several trials run at once where the cluster's resources allow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from autotune.errors import ConfigError

GRACE_S = 120.0  # launcher start-up allowance beyond a trial's own timeout


@dataclass
class Finished:
    """A trial's end: the result JSON of `autotune trial`, which attempt it was, where it ran."""

    key: Any
    result: dict[str, Any]
    attempt: int
    worker: str | None


@dataclass
class _Pending:
    key: Any
    config: dict[str, Any]
    options: dict[str, Any]
    attempt: int
    group: Any
    ref: Any
    deadline: float
    started: float = field(default_factory=time.monotonic)


def _launch(config: dict[str, Any], options: dict[str, Any], attempt: int) -> dict[str, Any]:
    """Ray task body: run one trial on this node, return its result and where it ran."""
    import socket

    import ray

    from autotune.config import TrialConfig
    from trial_runners.faults import injected
    from trial_runners.trial import run_trial

    os.environ.update(options.get("env", {}))
    if injected(config, attempt - 1, ("lost",)):
        os._exit(1)  # test hook: this worker process dies as a lost node's would
    cfg = TrialConfig.from_dict(config)
    result = run_trial(cfg, steps=options["steps"], seed=options["seed"], timeout=options["timeout"])
    node = ray.get_runtime_context().get_node_id()[:12]
    return {"result": result, "worker": f"{socket.gethostname()}/{node}"}


class RayDispatcher:
    """Submit trials, collect them as they finish; one retry on a lost worker."""

    def __init__(
        self, *, address: str | None = None, device: str = "cpu", num_cpus: int | None = None
    ) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        self._ray = ray
        self.device = device
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": "ERROR",
            "configure_logging": False,
        }
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = num_cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            if address:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError("--ray-address", f"cannot join Ray at {address}: {first}") from exc
            raise
        self._remote = ray.remote(max_retries=0)(_launch)
        self._pending: dict[Any, _Pending] = {}

    def __enter__(self) -> RayDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (CPU, GPU, ...)."""
        return dict(self._ray.cluster_resources())

    def nodes(self) -> int:
        return sum(1 for n in self._ray.nodes() if n.get("Alive"))

    def submit(
        self, key: Any, config: dict[str, Any], *, steps: int, seed: int, timeout: float, attempt: int = 1
    ) -> None:
        """Start a trial of `config` (TrialConfig.to_dict()); `key` names it in `wait`'s results."""
        options = {"steps": steps, "seed": seed, "timeout": timeout, "env": _passed_env()}
        self._start(key, config, options, attempt)

    def _start(self, key: Any, config: dict[str, Any], options: dict[str, Any], attempt: int) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"GPU": 1.0, "CPU": 1.0} if self.device == "cuda" else {"CPU": 1.0}
        group = placement_group([dict(bundle)] * int(config["world_size"]), strategy="STRICT_PACK")
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        ref = self._remote.options(num_cpus=1, scheduling_strategy=strategy).remote(config, options, attempt)
        deadline = time.monotonic() + options["timeout"] + GRACE_S
        self._pending[key] = _Pending(key, config, options, attempt, group, ref, deadline)

    @property
    def running(self) -> int:
        return len(self._pending)

    def wait(self, timeout: float) -> list[Finished]:
        """Trials that ended within `timeout` seconds (possibly none)."""
        if not self._pending:
            return []
        by_ref = {p.ref: p for p in self._pending.values()}
        ready, _ = self._ray.wait(list(by_ref), num_returns=len(by_ref), timeout=timeout)
        done = [self._collect(by_ref[ref]) for ref in ready]
        done += list(self._overdue())
        return [d for d in done if d is not None]

    def _collect(self, p: _Pending) -> Finished | None:
        from ray.exceptions import NodeDiedError, RayTaskError, WorkerCrashedError

        self._release(p)
        try:
            out = self._ray.get(p.ref)
        except (WorkerCrashedError, NodeDiedError) as exc:
            reason = f"worker lost ({type(exc).__name__})"
            if p.attempt == 1:
                self._start(p.key, p.config, p.options, attempt=2)
                return None
            failure = _failure(p.config, f"{reason} twice; gave up after one retry")
            return Finished(p.key, failure, p.attempt, None)
        except RayTaskError as exc:
            first = str(exc.cause if exc.cause else exc).strip().splitlines()
            failure = _failure(p.config, f"launcher error: {first[-1] if first else exc}")
            return Finished(p.key, failure, p.attempt, None)
        return Finished(p.key, out["result"], p.attempt, out["worker"])

    def _overdue(self) -> Iterator[Finished]:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if now > p.deadline]:
            self._ray.cancel(p.ref, force=True)
            self._release(p)
            limit = p.options["timeout"]
            reason = f"trial did not finish within {limit:g} s (+{GRACE_S:g} s start-up); cancelled"
            yield Finished(p.key, _failure(p.config, reason, status="timeout"), p.attempt, None)

    def _release(self, p: _Pending) -> None:
        from ray.util.placement_group import remove_placement_group

        self._pending.pop(p.key, None)
        remove_placement_group(p.group)

    def close(self) -> None:
        for p in list(self._pending.values()):
            self._ray.cancel(p.ref, force=True)
            self._release(p)
        if self._ray.is_initialized():
            self._ray.shutdown()


def _passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AUTOTUNE_INJECT")}


def _failure(config: dict[str, Any], reason: str, *, status: str = "failed") -> dict[str, Any]:
    return {
        "status": status, "error": reason, "config": config, "step_time_s": None, "tokens_per_s": None,
        "achieved_tflops": None, "mfu": None, "losses": [], "stages": [],
    }  # fmt: skip
