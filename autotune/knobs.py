"""The knobs: one registry of the configuration fields a user turns (torch-free; the schedule
knob's choices are the schedule registry's).

Everything that lists knobs reads this table: the command line's flags (`add_flags`,
`from_args`), `TrialConfig`'s checks of their values (`Knob.check`), the search-space schema
(`SEARCHABLE`: the keys a space's `knobs:` may hold, each choice checked by `Knob.check`; a knob
a space leaves out takes its default), the Optuna distributions (one categorical per knob a
space lists), a configuration's identity (the `later` knobs drop out of its hash while at their
default, so measurements stored before a knob existed still match: `identity`), the one-line
descriptions (`describe_later`) and what trials can run (`check_trialable`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from autotune.errors import ConfigError
from autotune.limits import BOUNDS, check_bound
from autotune.schedules.registry import SCHEDULES

RECOMPUTE = ("none", "selective", "full")
# Training dtypes and their bytes per element (16-bit ones: mixed precision, fp32 master weights)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def flag(name: str) -> str:
    """The CLI flag for a config field name (`micro_batch_size` -> `--micro-batch-size`)."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Knob:
    """One knob: a `TrialConfig` field of `kind` "count" (a positive integer), "choice" (one of
    `choices`, or the default ""), "switch" (true or false) or "layers" (layer counts per stage).

    `searchable`: a search space may list choices for it. `later`: added after stores were first
    written; its default means "as before". `label`: how a description shows a later knob off its
    default ("{}" is the value). `trials`: whether a trial can run it off its default (else
    `trials_note` says why, and it is for estimates only)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    searchable: bool = False
    later: bool = False
    label: str = ""
    trials: bool = True
    trials_note: str = ""

    @property
    def flag(self) -> str:
        return flag(self.name)

    def check(self, value: Any, field: str | None = None) -> Any:
        """`value` if it is one this knob takes, else ConfigError naming `field` (its flag)."""
        where = field or self.flag
        if self.kind == "count":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(where, f"must be a positive integer, got {value!r}")
            if self.name in BOUNDS:
                check_bound(self.name, value, where)
        elif self.kind == "switch":
            if not isinstance(value, bool):
                raise ConfigError(where, f"must be true or false, got {value!r}")
        elif self.kind == "choice":
            if value not in self.choices and value != self.default:
                raise ConfigError(where, f"must be one of {', '.join(self.choices)}, got {value!r}")
        elif not isinstance(value, tuple) or not all(type(n) is int for n in value):
            raise ConfigError(where, f"must be a list of layer counts, got {value!r}")
        return value

    def is_default(self, value: Any) -> bool:
        if self.kind == "layers":
            return isinstance(value, (list, tuple)) and not value
        return bool(value == self.default)

    def add_flag(self, parser: argparse.ArgumentParser) -> None:
        if self.kind == "count":
            parser.add_argument(self.flag, type=int, default=self.default, help=self.help)
        elif self.kind == "switch" and self.default:
            parser.add_argument(
                self.flag, action=argparse.BooleanOptionalAction, default=True, help=self.help
            )
        elif self.kind == "switch":
            parser.add_argument(self.flag, action="store_true", help=self.help)
        elif self.kind == "choice":  # checked by TrialConfig, so a bad value gets its one line
            parser.add_argument(self.flag, default=self.default, help=self.help)
        else:
            parser.add_argument(self.flag, default=None, metavar="L0,L1,...", help=self.help)

    def from_args(self, args: argparse.Namespace) -> Any:
        value = getattr(args, self.name, None)
        if self.kind != "layers":
            return self.default if value is None else value
        if value is None:
            return ()
        try:
            return tuple(int(part) for part in str(value).split(","))
        except ValueError:
            raise ConfigError(
                self.flag, f"expected comma-separated layer counts such as 6,6,5, got {value!r}"
            ) from None

    def describe(self, value: Any) -> str:
        if self.kind == "layers":
            return self.label.format("+".join(map(str, value)))
        return self.label.format(value)


REGISTRY: tuple[Knob, ...] = (
    Knob("tp", "count", 1, "tensor-parallel degree (default 1)", searchable=True),
    Knob("pp", "count", 1, "pipeline-parallel degree: stages (default 1)", searchable=True),
    Knob("dp", "count", 1, "data-parallel degree (default 1)", searchable=True),
    Knob("micro_batch_size", "count", 1, "sequences per micro-batch (default 1)", searchable=True),
    Knob("schedule", "choice", "1f1b", f"one of {', '.join(SCHEDULES)}", SCHEDULES, searchable=True),
    Knob("recompute", "choice", "none", "none, selective or full", RECOMPUTE, searchable=True),
    Knob("flash_attention", "switch", True, "fused attention without the s^2 scores", searchable=True),
    Knob(
        "stage_layers", "layers", (),
        "layers per pipeline stage, possibly uneven (default: the split that balances the stages)",
        later=True, label="layers={}",
    ),
    Knob(
        "distributed_optimizer", "switch", False,
        "shard the optimizer state over the dp ranks (ZeRO-1, Megatron's distributed optimizer)",
        searchable=True, later=True, label="distributed-optimizer",
    ),
    Knob(
        "overlap_grad_reduce", "switch", False,
        "all-reduce the gradients over dp in buckets while the last backward runs (Megatron, torch DDP)",
        searchable=True, later=True, label="overlap-grad-reduce",
    ),
    Knob(
        "sequence_parallel", "switch", False,
        "split the hidden states between the tensor-parallel regions along the sequence (Megatron)",
        searchable=True, later=True, label="sequence-parallel",
    ),
    Knob(
        "virtual_stages", "count", 1,
        "model chunks per pipeline rank for --schedule interleaved (Megatron's virtual pipeline "
        "stages, V >= 2); default 1",
        searchable=True, later=True, label="v={}",
    ),
    Knob(
        "dtype", "choice", "",
        "bf16, fp16 or fp32 (16-bit: mixed precision, fp32 master weights); default: the device's "
        "(trials: fp32 on a CPU, bf16 on a GPU; estimates: the cluster's)",
        tuple(DTYPE_BYTES), later=True, label="{}",
    ),
    Knob(
        "grad_accumulation_fusion", "switch", False,
        "estimates: the weight-gradient GEMMs add into the fp32 main gradients themselves "
        "(Megatron's --gradient-accumulation-fusion), so accumulating a micro-batch costs nothing more",
        later=True, label="grad-accumulation-fusion", trials=False,
        trials_note="trials add each micro-batch's gradients with a separate pass (they have no fused "
        "weight-gradient kernel); the knob is for estimates of runs that fuse it",
    ),
)  # fmt: skip

KNOB = {k.name: k for k in REGISTRY}
# What a search space searches over, in order (a campaign's knob key).
SEARCHABLE = tuple(k.name for k in REGISTRY if k.searchable)
# The searchable knobs every space lists (the later ones only where a space gives them).
BASE = tuple(k.name for k in REGISTRY if k.searchable and not k.later)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every knob's flag on `parser`."""
    for knob in REGISTRY:
        knob.add_flag(parser)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The knobs' values from parsed flags (absent ones: their defaults), as TrialConfig fields."""
    return {k.name: k.from_args(args) for k in REGISTRY}


def value_of(config: dict[str, Any], name: str) -> Any:
    """A knob's value in a configuration dict (its default where an older one lacks it)."""
    value = config.get(name, KNOB[name].default)
    return list(value) if KNOB[name].kind == "layers" else value


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration dict (`TrialConfig.to_dict`) without the later knobs at their defaults."""
    return {k: v for k, v in config.items() if not (k in KNOB and KNOB[k].later and KNOB[k].is_default(v))}


def describe_later(config: dict[str, Any]) -> str:
    """The later knobs of a configuration dict off their defaults, space-separated ("" if none)."""
    return " ".join(
        k.describe(config[k.name])
        for k in REGISTRY
        if k.later and k.name in config and not k.is_default(config[k.name])
    )


def check_trialable(values: Iterable[tuple[str, Any]]) -> None:
    """ConfigError for the first knob set off its default that trials cannot run."""
    for name, value in values:
        knob = KNOB[name]
        if not knob.trials and not knob.is_default(value):
            raise ConfigError(knob.flag, knob.trials_note)
