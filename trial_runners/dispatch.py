"""Ray dispatch: each real trial runs on a worker holding its world size in a placement group.

Locally Ray starts by itself (`address=None`); `address="ray://..."` or `"auto"` joins an existing
cluster. A trial reserves one bundle per rank (`{"CPU": 1}`, or `{"GPU": 1, "CPU": 1}` with
device cuda) packed on one node, and its launcher task runs in the first bundle, starting the
ranks as fresh processes (trial_runners.launch kills them as a process group on timeout). A
lost worker (its process or node died) gets one retry; a second loss is a `failed` result with
the reason. Several trials run at once where the cluster's resources allow.

A trial wider than any node spans several: its bundles are packed as tightly as the cluster
allows (PACK), a zero-CPU coordinator task waits for them, picks a TCP rendezvous on rank 0's
node, starts one part per node (that node's ranks, in its first bundle) and merges their
ranks' results into one trial result.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from autotune.errors import ConfigError, raise_on_sigterm
from autotune.results import Status, TrialResult

GRACE_S = 120.0  # launcher start-up allowance beyond a trial's own timeout
STOP_S = 10.0  # how long close() lets cancelled trials clean up (their ranks, their folders)


@dataclass
class Finished:
    """A trial's end: its result (what `autotune trial` gives), which attempt it was, where it ran."""

    key: Any
    result: TrialResult
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
    deadline: float  # pushed back while the placement group waits for resources
    ready: Any = None  # the group's ready() reference, until it is placed
    started: float = field(default_factory=time.monotonic)


def _start_task(config: dict[str, Any], options: dict[str, Any], attempt: int, *, first: bool) -> None:
    """A Ray task body's set-up: the caller's test-hook environment, and the `lost` fault."""
    from trial_runners.faults import injected

    os.environ.update(options.get("env", {}))
    if first and injected(config, attempt - 1, ("lost",)):
        os._exit(1)  # test hook: this worker process dies as a lost node's would


def _where() -> str:
    """This task's host and Ray node, as trials record it."""
    import socket

    import ray

    return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"


def _launch(config: dict[str, Any], options: dict[str, Any], attempt: int) -> dict[str, Any]:
    """Ray task body: run one trial on this node, return its result (as JSON) and where it ran."""
    from autotune.config import TrialConfig
    from trial_runners.trial import run_trial

    _start_task(config, options, attempt, first=True)
    cfg = TrialConfig.from_dict(config)
    result = run_trial(cfg, steps=options["steps"], seed=options["seed"], timeout=options["timeout"])
    return {"result": result.to_dict(), "worker": _where()}


_FAILURE_ORDER = ("oom", "died", "timeout", "failed")  # the root cause first among failed parts


def _rendezvous() -> str:
    """A TCP rendezvous address on this node (run in rank 0's bundle)."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def _node_part(
    config: dict[str, Any], options: dict[str, Any], attempt: int, ranks: list[int], init_method: str
) -> dict[str, Any]:
    """Ray task body: this node's ranks of a multi-node trial."""
    from autotune.config import TrialConfig
    from trial_runners.launch import run_job
    from trial_runners.trial import trial_run

    _start_task(config, options, attempt, first=0 in ranks)
    cfg = TrialConfig.from_dict(config)
    outcome = run_job(
        [trial_run(cfg, steps=options["steps"], seed=options["seed"])], world_size=cfg.world_size,
        timeout=options["timeout"], device=cfg.device, ranks=ranks, init_method=init_method,
    )  # fmt: skip
    results = outcome.results[0] if outcome.results else []
    return {"status": outcome.status, "error": outcome.error, "results": results, "worker": _where()}


def _coordinate(config: dict[str, Any], options: dict[str, Any], attempt: int, group: Any) -> dict[str, Any]:
    """Ray task body (no CPU): run a trial whose ranks span nodes; one result as _launch gives."""
    import ray
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from autotune.config import TrialConfig
    from trial_runners.trial import trial_result

    ray.get(group.ready())
    nodes = placement_group_table(group)["bundles_to_node_id"]
    by_node: dict[str, list[int]] = {}
    for rank in range(int(config["world_size"])):  # rank r runs in bundle r
        by_node.setdefault(nodes[rank], []).append(rank)

    def in_bundle(index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)

    init = ray.get(ray.remote(_rendezvous).options(num_cpus=0, scheduling_strategy=in_bundle(0)).remote())
    part = ray.remote(max_retries=0)(_node_part)
    refs = [
        part.options(num_cpus=1, scheduling_strategy=in_bundle(ranks[0])).remote(
            config, options, attempt, ranks, init
        )
        for ranks in by_node.values()
    ]
    parts = []
    while refs:
        ready, refs = ray.wait(refs, num_returns=1)
        parts.append(ray.get(ready[0]))
        if parts[-1]["status"] != "ok":
            for ref in refs:  # the other nodes' ranks would only wait for the dead ones
                ray.cancel(ref, force=True)
            break
    failed = [p for p in parts if p["status"] != "ok"]
    status, error = ("ok", None) if not failed else _root_cause(failed)
    ranks_out = [r for p in parts for r in p["results"]]
    result = trial_result(TrialConfig.from_dict(config), status, error, ranks_out if not failed else [])
    return {"result": result.to_dict(), "worker": ",".join(sorted({p["worker"] for p in parts}))}


def _root_cause(parts: list[dict[str, Any]]) -> tuple[str, str]:
    def order(p: dict[str, Any]) -> int:
        key = p["status"] if p["status"] != "failed" or "died" not in (p["error"] or "") else "died"
        return _FAILURE_ORDER.index(key) if key in _FAILURE_ORDER else len(_FAILURE_ORDER)

    first = min(parts, key=order)
    return first["status"], first["error"]


class RayDispatcher:
    """Submit trials, collect them as they finish; one retry on a lost worker."""

    def __init__(
        self,
        *,
        address: str | None = None,
        device: str = "cpu",
        num_cpus: int | None = None,
        grace: float = GRACE_S,
    ) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        self._ray = ray
        self.device, self.grace = device, grace
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
        finally:
            raise_on_sigterm()  # Ray's core worker installs a crash handler (a stack dump, exit 134)
        self._remote = ray.remote(max_retries=0)(_launch)
        self._coordinator = ray.remote(max_retries=0)(_coordinate)
        self._pending: dict[Any, _Pending] = {}

    def _node_ranks(self) -> list[int]:
        """How many ranks each alive node can hold: a bundle per rank is {"CPU": 1}, or
        {"GPU": 1, "CPU": 1} with device cuda."""
        out = []
        for node in self._ray.nodes():
            if not node.get("Alive"):
                continue
            res = node["Resources"]
            cpus = int(res.get("CPU", 0.0))
            out.append(min(cpus, int(res.get("GPU", 0.0))) if self.device == "cuda" else cpus)
        return out

    def _widest_node(self) -> float:
        """The most ranks one alive node can hold (its CPUs, or GPUs with device cuda)."""
        return float(max(self._node_ranks(), default=0))

    def most_ranks(self) -> int:
        """The widest trial the cluster can ever hold (trials may span nodes)."""
        return sum(self._node_ranks())

    def describe(self) -> str:
        """What the cluster has, for messages: nodes, CPUs and GPUs."""
        cpu, gpu = (self.resources().get(k, 0.0) for k in ("CPU", "GPU"))
        return f"{self.nodes()} node(s) with {cpu:g} CPUs and {gpu:g} GPUs in all"

    def __enter__(self) -> RayDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fingerprint(self) -> dict[str, Any]:
        """The hardware fingerprint of a worker node, where trials run (not of this driver)."""
        from trial_runners.fingerprint import hardware_fingerprint

        need = {"num_gpus": 1} if self.device == "cuda" else {"num_cpus": 1}
        task = self._ray.remote(hardware_fingerprint).options(**need)
        info: dict[str, Any] = self._ray.get(task.remote(self.device))
        return info

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (CPU, GPU, ...)."""
        return dict(self._ray.cluster_resources())

    def capacity(self, world_size: int) -> int:
        """How many trials of `world_size` ranks the cluster holds at once (at least 1)."""
        kind = "GPU" if self.device == "cuda" else "CPU"
        return max(1, int(self.resources().get(kind, 0.0) // max(1, world_size)))

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
        world = int(config["world_size"])
        if world <= self._widest_node():
            group = placement_group([dict(bundle)] * world, strategy="STRICT_PACK")
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            ref = self._remote.options(num_cpus=1, scheduling_strategy=strategy).remote(
                config, options, attempt
            )
        else:  # wider than any node: ranks on several nodes, a coordinator outside the group
            group = placement_group([dict(bundle)] * world, strategy="PACK")
            ref = self._coordinator.options(num_cpus=0).remote(config, options, attempt, group)
        deadline = time.monotonic() + options["timeout"] + self.grace
        self._pending[key] = _Pending(key, config, options, attempt, group, ref, deadline, group.ready())

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
        except (WorkerCrashedError, NodeDiedError, RayTaskError) as exc:
            cause = exc.cause if isinstance(exc, RayTaskError) else exc
            if not isinstance(cause, WorkerCrashedError | NodeDiedError):
                first = str(cause or exc).strip().splitlines()
                reason = f"launcher error: {first[-1] if first else exc}"
                failure = TrialResult.failure(p.config, status=Status.FAILED, reason=reason)
                return Finished(p.key, failure, p.attempt, None)
            reason = f"worker lost ({type(cause).__name__})"
            if p.attempt == 1:
                self._start(p.key, p.config, p.options, attempt=2)
                return None
            reason = f"{reason} twice; gave up after one retry"
            failure = TrialResult.failure(p.config, status=Status.FAILED, reason=reason)
            return Finished(p.key, failure, p.attempt, None)
        return Finished(p.key, TrialResult.from_dict(out["result"]), p.attempt, out["worker"])

    def _overdue(self) -> Iterator[Finished]:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.ready is not None]:
            if self._ray.wait([p.ready], timeout=0)[0]:
                p.ready = None
            else:  # still queued for resources: its clock has not started
                p.deadline = now + p.options["timeout"] + self.grace
        for p in [p for p in self._pending.values() if now > p.deadline]:
            self._ray.cancel(p.ref, force=True)
            self._release(p)
            limit = p.options["timeout"]
            reason = f"trial did not finish within {limit:g} s (+{self.grace:g} s start-up); cancelled"
            failure = TrialResult.failure(p.config, status=Status.TIMEOUT, reason=reason)
            yield Finished(p.key, failure, p.attempt, None)

    def _release(self, p: _Pending) -> None:
        from ray.util.placement_group import remove_placement_group

        self._pending.pop(p.key, None)
        remove_placement_group(p.group)

    def close(self, *, wait: float = STOP_S) -> None:
        """Stop every running trial and Ray (when this dispatcher started it, its processes go).

        A running trial is first asked to stop (its launcher gets KeyboardInterrupt, kills its
        ranks and removes its folder), and only killed outright after `wait` seconds."""
        pending = list(self._pending.values())
        for p in pending:
            with contextlib.suppress(Exception):
                self._ray.cancel(p.ref, force=False)
        if pending:
            with contextlib.suppress(Exception):
                self._ray.wait([p.ref for p in pending], num_returns=len(pending), timeout=wait)
        for p in pending:
            with contextlib.suppress(Exception):
                self._ray.cancel(p.ref, force=True)
            self._release(p)
        if self._ray.is_initialized():
            self._ray.shutdown()


def _passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AUTOTUNE_INJECT")}
