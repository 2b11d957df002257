"""Search spaces: a YAML file -> a validated `SearchSpace` -> every `TrialConfig` of its knobs.

Torch-free. Every error is a `ConfigError` whose field is the YAML key path (`knobs.tp[2]`,
`search.timeout`); a knob combination that is not a valid configuration is kept as a
`Rejected` with the rule that refused it (`TrialConfig`'s own rules name the CLI flag, `--pp`;
the space's rules name its key, `max_world_size`). The schema is documented in
`docs/search-spaces.md`.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from autotune import config
from autotune.config import KNOBS, MODEL_FIELDS, ModelSpec, TrialConfig, load_model, parse_bytes
from autotune.errors import ConfigError, key_name
from autotune.estimate.clusters import CPU_LOCAL, ClusterSpec, load_cluster
from autotune.files import MAX_YAML_BYTES, load_yaml, read_text
from autotune.knobs import BASE as BASE_KNOBS
from autotune.knobs import KNOB
from autotune.limits import MAX_COUNT, MAX_SECONDS, MAX_SPACE_COMBINATIONS, check_bound, check_space_cells

# A knob a space leaves out takes its default (autotune.knobs); the later knobs (sequence
# parallelism, ...) are in a space's knobs, its normalised form and its Optuna study only where
# the space lists them, so a space written before they existed keeps its study.
DEFAULT_KNOBS: dict[str, tuple[Any, ...]] = {k: (KNOB[k].default,) for k in KNOBS}
AUTO = "auto"
OBJECTIVES = ("tokens_per_s", "mfu")
TOP_KEYS = (
    "name", "model", "cluster", "device", "global_batch_size", "max_world_size", "knobs",
    "objective", "memory_limit", "trial", "search",
)  # fmt: skip
TRIAL_DEFAULTS: dict[str, Any] = {"steps": 3, "timeout": 120.0}
SEARCH_DEFAULTS: dict[str, Any] = {
    "trials": None, "patience": None, "timeout": None, "seed_top": 3, "concurrency": None,
}  # fmt: skip
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Rejected:
    """A knob combination that is not a valid configuration, and the rule that refused it."""

    knobs: dict[str, Any]
    field: str
    reason: str


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space; `source` is its normalised form as plain JSON-able data."""

    name: str
    model: ModelSpec
    cluster: str
    device: str
    global_batch_size: int
    max_world_size: int | None
    knobs: dict[str, tuple[Any, ...]]
    objective: str
    memory_limit: int | None
    steps: int
    trial_timeout: float
    trials: int | None
    patience: int | None
    timeout: float | None
    seed_top: int
    concurrency: int | None
    source: dict[str, Any]

    def configs(self) -> tuple[list[TrialConfig], list[Rejected]]:
        """Every combination of the knobs' choices (KNOBS order): valid configs, rejected ones."""
        valid: list[TrialConfig] = []
        rejected: list[Rejected] = []
        names, seen = tuple(self.knobs), set[tuple[Any, ...]]()
        for values in itertools.product(*(self.knobs[k] for k in names)):
            knobs = dict(zip(names, values, strict=True))
            try:
                cfg = self._build(knobs)
            except ConfigError as exc:
                if exc.field != "knobs.dp":
                    knobs["dp"] = self._dp(knobs)
                rejected.append(Rejected(knobs, exc.field, exc.rule))
                continue
            key = tuple(getattr(cfg, k) for k in KNOBS)  # a knob that is a no-op here (sequence
            if key not in seen:  # parallelism at tp 1) normalises to a configuration listed once
                seen.add(key)
                valid.append(cfg)
        check_space_cells({(c.schedule, c.pp, c.num_microbatches) for c in valid})
        return valid, rejected

    def config_for(self, knobs: dict[str, Any]) -> TrialConfig:
        """The configuration for one choice per knob (a knob with one choice may be left out)."""
        for name in knobs:
            if name not in KNOBS:
                raise ConfigError(f"knobs.{name}", f"is not a knob; knobs: {', '.join(KNOBS)}")
        for name, choices in self.knobs.items():
            if name not in knobs and len(choices) > 1:
                raise ConfigError(f"knobs.{name}", f"needs a value, one of {list(choices)}")
            if knobs.get(name, choices[0]) not in choices and choices != (AUTO,):
                raise ConfigError(f"knobs.{name}", f"must be one of {list(choices)}, got {knobs[name]!r}")
        return self._build({k: knobs.get(k, v[0]) for k, v in self.knobs.items()})

    def _dp(self, knobs: dict[str, Any]) -> int:
        """The data-parallel degree; "auto" fills max_world_size with tp x pp x dp."""
        tp, pp, dp = knobs["tp"], knobs["pp"], knobs["dp"]
        if self.knobs["dp"] != (AUTO,):
            return int(dp)
        world, group = self.max_world_size or 1, tp * pp
        if world % group:
            why = f"({tp} x {pp} = {group}; {world} % {group} = {world % group})"
            raise ConfigError("knobs.dp", f"auto needs tp x pp to divide max_world_size {why}")
        auto = world // group
        if dp not in (AUTO, auto):
            raise ConfigError("knobs.dp", f"auto gives {world} // ({tp} x {pp}) = {auto}, got {dp!r}")
        return auto

    def _build(self, knobs: dict[str, Any]) -> TrialConfig:
        tp, pp, dp = knobs["tp"], knobs["pp"], self._dp(knobs)
        world = tp * pp * dp
        if self.max_world_size is not None and world > self.max_world_size:
            over = f"tp x pp x dp = {tp} x {pp} x {dp} = {world} devices, over max_world_size"
            raise ConfigError("max_world_size", f"{over} {self.max_world_size}")
        chosen = {k: v for k, v in knobs.items() if k not in ("tp", "pp", "dp")}
        return TrialConfig(
            model=self.model, tp=tp, pp=pp, dp=dp, global_batch_size=self.global_batch_size,
            device=self.device, memory_limit=self.memory_limit, **chosen,
        )  # fmt: skip


# -- parsers ----------------------------------------------------------------------------------


def parse_duration(text: Any, field: str) -> float:
    """Seconds from 90, 90.5, "90s", "5m", "8h" or "1d"; positive."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(text) if isinstance(text, str) else None
        if not match:
            raise ConfigError(field, f"expected a duration such as 90, 90s, 5m or 8h, got {text!r}")
        seconds = float(match.group(1)) * _SECONDS[match.group(2) or ""]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(field, f"must be a positive duration, got {text!r}")
    if seconds > MAX_SECONDS:
        raise ConfigError(field, f"at most {MAX_SECONDS // 86400} days, got {text!r}")
    return seconds


def _int(value: Any, field: str, *, least: int = 1, bound: str | None = None) -> int:
    """An integer >= `least`, at most the limits table's `bound` (else MAX_COUNT)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(field, f"must be {what}, got {value!r}")
    if bound is not None:
        check_bound(bound, value, field)
    elif value > MAX_COUNT:
        raise ConfigError(field, f"at most {MAX_COUNT:,} (autotune's bound), got {value:,}")
    return value


def _mapping(value: Any, field: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(field, f"must be a mapping with keys {', '.join(allowed)}, got {value!r}")
    for key in value:
        if key not in allowed:
            name = key_name(key)
            raise ConfigError(
                f"{field}.{name}" if field else name, f"unknown key; allowed: {', '.join(allowed)}"
            )
    return value


def _choice(name: str, value: Any, field: str) -> Any:
    """One knob choice, type-checked against the knob's allowed values."""
    if name == "dp" and not isinstance(value, int):
        raise ConfigError(field, f"must be a positive integer, a list of them, or auto, got {value!r}")
    return KNOB[name].check(value, field)


def _choices(name: str, value: Any) -> tuple[Any, ...]:
    """A knob's choices: a scalar (one choice) or a non-empty list without duplicates."""
    if name == "dp" and value in (AUTO, [AUTO]):
        return (AUTO,)
    if not isinstance(value, list):
        return (_choice(name, value, f"knobs.{name}"),)
    if not value:
        raise ConfigError(f"knobs.{name}", "must list at least one choice, got []")
    out: list[Any] = []
    for i, item in enumerate(value):
        choice = _choice(name, item, f"knobs.{name}[{i}]")
        if choice in out:
            j = out.index(choice)
            raise ConfigError(f"knobs.{name}[{i}]", f"duplicates knobs.{name}[{j}] ({choice!r})")
        out.append(choice)
    return tuple(out)


# -- model and cluster ------------------------------------------------------------------------


def _resolve(value: str, base: Path | None) -> str:
    """A relative file path is taken from the space file's folder when it exists there."""
    if base is not None and value.endswith((".yaml", ".yml")) and not Path(value).is_absolute():
        candidate = base / value
        if candidate.is_file():
            return str(candidate.resolve())
    return value


def _model(value: Any, base: Path | None) -> ModelSpec:
    """A preset name or YAML path; {preset: NAME, <field>: value...}; or every field with family."""
    preset = isinstance(value, dict) and "preset" in value
    whole = "model.preset" if preset else "model"
    try:
        if isinstance(value, str):
            return load_model(_resolve(value, base))
        if not isinstance(value, dict):
            raise ConfigError("model", f"must be a preset name, a YAML path or a mapping, got {value!r}")
        data = _mapping(value, "model", ("preset" if preset else "family", "name", *MODEL_FIELDS))
        if not isinstance(data.get("name", ""), str) or not isinstance(data.get("preset", ""), str):
            raise ConfigError("model", f"name and preset must be strings, got {value!r}")
        if preset:
            overrides = {k: _int(data[k], f"model.{k}", bound=k) for k in MODEL_FIELDS if k in data}
            spec = load_model(_resolve(data["preset"], base), **overrides)
            return ModelSpec(**{**spec.to_dict(), "name": data.get("name", spec.name)})
        missing = [k for k in ("family", *MODEL_FIELDS) if k not in data and k != "num_kv_heads"]
        if missing:
            raise ConfigError(f"model.{missing[0]}", "missing: give preset, or every field with family")
        return ModelSpec(**{"name": "custom", **data})
    except ConfigError as exc:  # a model rule's flag (--num-heads) becomes its key (model.num_heads)
        key = exc.field.lstrip("-").replace("-", "_")
        if key in (*MODEL_FIELDS, "family"):
            raise ConfigError(f"model.{key}", exc.rule) from None
        raise exc if exc.field.startswith("model") else ConfigError(whole, exc.rule) from None


def _cluster(value: Any, base: Path | None) -> tuple[str, ClusterSpec]:
    if not isinstance(value, str):
        raise ConfigError("cluster", f"must be a cluster preset or YAML path, got {value!r}")
    name = _resolve(value, base)
    try:
        return name, load_cluster(name)
    except ConfigError as exc:
        rule = exc.rule if exc.field == "--cluster" else f"{exc.field}: {exc.rule}"
        raise ConfigError("cluster", rule) from None


# -- the space --------------------------------------------------------------------------------


def _section(data: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """`trial` or `search`: known keys only, each parsed; absent keys take their defaults."""
    section = _mapping({} if data.get(key) is None else data[key], key, tuple(defaults))
    out = dict(defaults)
    for name, value in section.items():
        field = f"{key}.{name}"
        if value is None and defaults[name] is None:
            continue
        least = 0 if name == "seed_top" else 1
        bound = "steps" if name == "steps" else None
        if name == "timeout":
            out[name] = parse_duration(value, field)
        else:
            out[name] = _int(value, field, least=least, bound=bound)
    return out


def _settings(data: dict[str, Any], cluster: ClusterSpec) -> dict[str, Any]:
    """The scalar keys that depend on the cluster: device, world size, objective, memory cap."""
    on_cpu = cluster.device.lower() == "cpu"
    device = data.get("device", "cpu" if on_cpu else "cuda")
    if device not in config.DEVICES:
        raise ConfigError("device", f"must be one of {', '.join(config.DEVICES)}, got {device!r}")
    if (device == "cpu") != on_cpu:
        raise ConfigError("device", f"is {device} but cluster {cluster.name!r} has {cluster.device} devices")
    objective = data.get("objective", "tokens_per_s")
    if objective not in OBJECTIVES:
        raise ConfigError("objective", f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "mfu" and cluster.peak_flops is None:
        raise ConfigError("objective", f"mfu needs the device's peak FLOP/s; {cluster.name!r} has none")
    limit = data.get("memory_limit")
    if limit is not None and (not isinstance(limit, (int, str)) or isinstance(limit, bool)):
        raise ConfigError("memory_limit", f"expected a size such as 2GiB, 1.5MB or 500000000, got {limit!r}")
    limit = None if limit is None else parse_bytes(limit, "memory_limit")
    if limit is not None and limit > cluster.device_memory:
        memory = f"{limit / 2**30:.2f} GiB > {cluster.device_memory / 2**30:.2f} GiB"
        raise ConfigError("memory_limit", f"is over a {cluster.name} device's memory ({memory})")
    world = data.get("max_world_size")
    world = cluster.world_size if world is None else _int(world, "max_world_size", bound="world_size")
    return dict(device=device, objective=objective, memory_limit=limit, max_world_size=world)


def space_from_dict(data: Any, where: str) -> SearchSpace:
    """Validate a parsed space; `where` (its file) names it and anchors relative paths."""
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a YAML mapping of search-space keys, got {type(data).__name__}")
    _mapping(data, "", TOP_KEYS)
    path = Path(where)
    base = path.parent if path.is_file() else None
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError("name", f"must be a non-empty string, got {name!r}")
    if "model" not in data:
        raise ConfigError("model", "is required: a preset name, a model YAML path or a mapping")
    model = _model(data["model"], base)
    cluster_name, cluster = _cluster(data.get("cluster", CPU_LOCAL), base)
    if "global_batch_size" not in data:
        raise ConfigError("global_batch_size", "is required: sequences per optimizer step")
    knob_data = _mapping({} if data.get("knobs") is None else data["knobs"], "knobs", KNOBS)
    knobs = {
        k: _choices(k, knob_data[k]) if k in knob_data else DEFAULT_KNOBS[k]
        for k in KNOBS
        if k in knob_data or k in BASE_KNOBS
    }
    combinations = math.prod(len(v) for v in knobs.values())
    if combinations > MAX_SPACE_COMBINATIONS:
        sizes = " x ".join(str(len(v)) for v in knobs.values())
        raise ConfigError(
            "knobs",
            f"{combinations:,} combinations of the knobs' choices ({sizes}), above autotune's bound of "
            f"{MAX_SPACE_COMBINATIONS:,}; split the space",
        )
    trial, search = _section(data, "trial", TRIAL_DEFAULTS), _section(data, "search", SEARCH_DEFAULTS)
    fields: dict[str, Any] = dict(
        name=name, cluster=cluster_name, **_settings(data, cluster),
        global_batch_size=_int(data["global_batch_size"], "global_batch_size", bound="global_batch_size"),
    )  # fmt: skip
    source = {
        **fields, "model": model.to_dict(), "knobs": {k: list(v) for k, v in knobs.items()},
        "trial": trial, "search": search,
    }  # fmt: skip
    return SearchSpace(
        **fields, model=model, knobs=knobs, steps=trial["steps"], trial_timeout=trial["timeout"],
        **search, source=source,
    )  # fmt: skip


def space_names() -> list[str]:
    """The shipped spaces: the YAML files at the top level of `search_spaces/`."""
    folder = resources.files("search_spaces")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_space(path: str) -> SearchSpace:
    """A space from a YAML file, or the name of a shipped space (`demo-cpu`)."""
    file = Path(path)
    if path.endswith((".yaml", ".yml")) or file.exists():
        text = read_text(file, "space", what="search-space YAML", max_bytes=MAX_YAML_BYTES)
        where = path
    elif path in space_names():
        resource = resources.files("search_spaces").joinpath(f"{path}.yaml")
        text, where = resource.read_text(), str(resource)
    else:
        shipped = ", ".join(space_names())
        raise ConfigError("space", f"unknown search space {path!r}; shipped: {shipped}; or a YAML file")
    return space_from_dict(load_yaml(text, where), where)
