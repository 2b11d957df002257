"""Validated value objects for a model and a parallel training configuration (torch-free).

`ModelSpec` is a transformer's shape; `TrialConfig` is one point of the search space: the model,
the parallel layout (tp x pp x dp), the micro-batching, the schedule and the memory knobs. Both
check themselves on construction and raise `ConfigError` naming the field and the rule, with the
arithmetic shown, so the CLI, the search-space loader and the tuner share one set of rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from autotune import knobs
from autotune.errors import ConfigError
from autotune.files import load_yaml, read_yaml
from autotune.knobs import DTYPE_BYTES as DTYPE_BYTES  # re-exported: the dtype facts live there
from autotune.knobs import RECOMPUTE as RECOMPUTE
from autotune.knobs import SCHEDULES as SCHEDULES
from autotune.knobs import flag as flag  # re-exported: the one rule for a field's flag
from autotune.limits import BOUNDS, MAX_BYTES, check_bound, check_cells
from autotune.schedules.generators import default_cap
from autotune.schedules.registry import BASELINES as BASELINES  # what BPipe is judged against
from autotune.schedules.registry import SCHEDULE

FAMILIES = ("gpt", "llama")

DEVICES = ("cpu", "cuda")
TRIAL_DTYPES = ("fp32", "bf16")  # what trials train in (fp16 would need loss scaling)
# What a search space searches over: a TrialConfig field each (a campaign's knob key, in order;
# the registry in autotune.knobs says which)
KNOBS = knobs.SEARCHABLE

# The shape fields of a model (YAML keys; the CLI flags are the same with dashes).
MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "seq_len",
    "vocab_size",
    "ffn_hidden_size",
)


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape.

    `family` picks the block: "gpt" (learned positions, LayerNorm, GeLU MLP, multi-head
    attention) or "llama" (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention with
    `num_kv_heads` key/value heads).
    """

    name: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    seq_len: int
    vocab_size: int
    ffn_hidden_size: int
    num_kv_heads: int = 0  # 0 means "same as num_heads"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError("family", f"must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in MODEL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(flag(name), f"must be a positive integer, got {value!r}")
            check_bound(name, value, flag(name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                "--num-heads",
                f"must divide --hidden-size ({self.hidden_size} % {self.num_heads} = "
                f"{self.hidden_size % self.num_heads})",
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "--num-kv-heads",
                f"must divide --num-heads ({self.num_heads} % {self.num_kv_heads} = "
                f"{self.num_heads % self.num_kv_heads})",
            )
        if self.family == "gpt" and self.num_kv_heads != self.num_heads:
            raise ConfigError(
                "--num-kv-heads", "the gpt family uses multi-head attention: must equal --num-heads"
            )
        if self.family == "llama" and self.head_dim % 2:
            raise ConfigError("--hidden-size", f"RoPE needs an even head size, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count (untied embedding and head; biases for gpt, none for llama)."""
        h, f, v, s = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.seq_len
        kv = self.num_kv_heads * self.head_dim
        if self.family == "gpt":
            attn = h * (h + 2 * kv) + (h + 2 * kv) + h * h + h
            mlp = 2 * h * f + f + h
            norms = 4 * h
            per_layer = attn + mlp + norms
            return v * h + s * h + self.num_layers * per_layer + 2 * h + h * v
        attn = h * (h + 2 * kv) + h * h
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        return v * h + self.num_layers * per_layer + h + h * v

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    folder = resources.files("search_spaces").joinpath("models")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _mapping(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError("--model", f"{where} must be a YAML mapping of model fields")
    return data


def load_model(name_or_path: str, **overrides: int | None) -> ModelSpec:
    """A model from a preset name or a YAML file, with shape overrides (None = keep)."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        data = _mapping(read_yaml(path, "--model", what="model YAML"), repr(name_or_path))
        name = data.pop("name", path.stem)
    else:
        if name_or_path not in preset_names():
            raise ConfigError(
                "--model", f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}"
            )
        text = resources.files("search_spaces").joinpath("models", f"{name_or_path}.yaml").read_text()
        data = _mapping(load_yaml(text, "--model", source=name_or_path), name_or_path)
        name = name_or_path
    allowed = {"family", *MODEL_FIELDS}
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(
            "--model", f"unknown key {unknown[0]!r} in model YAML; allowed: {', '.join(sorted(allowed))}"
        )
    if "family" not in data:
        raise ConfigError("--model", "model YAML must name its family (gpt or llama)")
    multi_head = data.get("num_kv_heads", data.get("num_heads")) == data.get("num_heads")
    for key, value in overrides.items():
        if key not in MODEL_FIELDS:
            raise ConfigError(flag(key), "is not a model shape field")
        if value is not None:
            data[key] = value
    if overrides.get("num_heads") is not None and overrides.get("num_kv_heads") is None and multi_head:
        data["num_kv_heads"] = 0  # a multi-head model stays multi-head with the new head count
    missing = [k for k in MODEL_FIELDS if k not in data and k != "num_kv_heads"]
    if missing:
        raise ConfigError("--model", f"model YAML lacks {missing[0]!r}")
    return ModelSpec(name=str(name), **data)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_bytes(text: str | int, field_name: str = "--memory-limit") -> int:
    """Parse `2GiB`, `512MiB`, `1.5GB` or a plain byte count."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise ConfigError(field_name, f"expected a size such as 2GiB or 500000000, got {text!r}")
        unit = (match.group(2) or "").lower().rstrip("b")
        number = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(number) or number > MAX_BYTES:
            raise ConfigError(field_name, f"at most {MAX_BYTES:,} bytes (1 PiB), got {text!r}")
        value = int(number)
    if value <= 0:
        raise ConfigError(field_name, f"must be positive, got {text!r}")
    if value > MAX_BYTES:
        raise ConfigError(field_name, f"at most {MAX_BYTES:,} bytes (1 PiB), got {text!r}")
    return value


def check_bpipe_cap(cap: int, pp: int) -> None:
    """BPipe's cap (0 = default) must let a stage pair hold the pp+1 micro-batches 1F1B keeps."""
    least = default_cap(pp)  # the balance point is also the least a pair can live with
    if cap and cap < least:
        raise ConfigError(
            "--bpipe-cap",
            f"must be at least ceil((pp+1)/2) = {least} for --pp {pp}: stages x and pp-1-x hold "
            f"pp+1 = {pp + 1} micro-batches together under 1F1B, got {cap}",
        )


def check_schedule(
    schedule: str, pp: int, num_microbatches: int, bpipe_cap: int = 0, virtual_stages: int = 1
) -> None:
    """The rules of a schedule for pp stages and m micro-batches (cap 0: the default; V model
    chunks per rank), for every command and the search spaces alike, from its row of the
    schedule registry: a known name, enough micro-batches (in multiples of pp where it says), V
    chunks only for a schedule that runs several (at least 2 there), more than one stage for
    those, a grid small enough to simulate, a capped schedule (BPipe) only where its cap makes it
    evict (pp >= 3) and a cap only for one.
    """
    spec = SCHEDULE.get(schedule)
    if spec is None:
        raise ConfigError("--schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    bad = spec.bad_virtual_stages(virtual_stages)
    if bad:
        raise ConfigError("--virtual-stages", f"{bad}, got {virtual_stages}")
    if spec.virtual and pp < 2:
        raise ConfigError("--pp", f"{schedule} interleaves chunks over at least 2 stages, got {pp}")
    few = spec.too_few(pp, num_microbatches)
    if few:
        least = spec.min_microbatches(pp)
        bound = f"--pp {pp}" if least == pp else f"{least} for --pp {pp}"
        if num_microbatches >= least:
            raise ConfigError("--num-microbatches", f"{few} (--pp {pp}), got {num_microbatches}")
        raise ConfigError("--num-microbatches", f"{few} ({num_microbatches} < {bound})")
    check_cells(pp * virtual_stages, num_microbatches)
    if not spec.capped:
        if bpipe_cap:
            capped = ", ".join(name for name, s in SCHEDULE.items() if s.capped)
            raise ConfigError("--bpipe-cap", f"only applies to --schedule {capped}, not {schedule}")
        return
    check_bpipe_cap(bpipe_cap, pp)
    cap = bpipe_cap or spec.default_cap(pp)
    if cap >= pp:
        why = f"its cap of {cap} micro-batches per stage is what 1F1B's stage 0 holds anyway ({pp})"
        raise ConfigError(
            "--schedule",
            f"{schedule} at --pp {pp} never evicts: {why}; use 1f1b ({schedule} needs --pp >= 3)",
        )


_LAYOUT_KNOBS = ("tp", "pp", "dp", "micro_batch_size")
# Knobs that are no-ops where a degree is 1, and so the same run as without them: sequence
# parallelism at tp 1 (nothing to split over); the overlapped all-reduce and the distributed
# optimizer at dp 1 (no all-reduce to overlap; one shard is the whole state).
_NO_OPS = {"sequence_parallel": "tp", "overlap_grad_reduce": "dp", "distributed_optimizer": "dp"}


def without_no_ops(knobs: dict[str, Any]) -> dict[str, Any]:
    """`knobs` with the no-op knobs of their layout at their defaults (False): what
    `TrialConfig` normalises a configuration to, and a campaign its sampler's proposals to."""
    out = dict(knobs)
    for name, degree in _NO_OPS.items():
        if out.get(degree, 1) == 1 and name in out:
            out[name] = False
    return out


@dataclass(frozen=True)
class TrialConfig:
    """One parallel training configuration, validated and normalised.

    Give `num_microbatches` or `global_batch_size` (global = micro * num * dp); with neither,
    num = pp. `bpipe_cap` is BPipe's per-stage limit in micro-batches (default ceil((pp+1)/2)).
    """

    model: ModelSpec
    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 0
    global_batch_size: int = 0
    schedule: str = "1f1b"
    recompute: str = "none"
    flash_attention: bool = True
    device: str = "cpu"
    memory_limit: int | None = None
    bpipe_cap: int = 0
    virtual_stages: int = 1  # model chunks per rank (the interleaved schedule's V)
    stage_layers: tuple[int, ...] = ()  # () = the default split (split_layers)
    distributed_optimizer: bool = False  # optimizer state sharded over dp (ZeRO-1)
    overlap_grad_reduce: bool = False  # the dp all-reduce in buckets during the last backward
    sequence_parallel: bool = False  # hidden states between the tp regions split along the sequence
    dtype: str = ""  # "" = the device's: fp32 on a CPU, bf16 on a GPU (estimates: the cluster's)
    grad_accumulation_fusion: bool = False  # estimates: the wgrad GEMMs accumulate in place
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in _LAYOUT_KNOBS:  # first: the checks of the others use them
            knobs.KNOB[name].check(getattr(self, name))
        for name in ("num_microbatches", "global_batch_size", "bpipe_cap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(flag(name), f"must be a positive integer, got {value!r}")
            if name in BOUNDS:
                check_bound(name, value, flag(name))
        world = self.tp * self.pp * self.dp
        check_bound("world_size", world, "--dp" if self.dp > 1 else "--tp" if self.tp > 1 else "--pp")
        if isinstance(self.stage_layers, list):
            object.__setattr__(self, "stage_layers", tuple(self.stage_layers))
        for knob in knobs.REGISTRY:
            if knob.name not in _LAYOUT_KNOBS:
                knob.check(getattr(self, knob.name))
        self._check_choice("device", DEVICES)
        self._normalise_batch()
        self._check_layout()

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(flag(name), f"must be one of {', '.join(choices)}, got {value!r}")

    def _normalise_batch(self) -> None:
        per_micro = self.micro_batch_size * self.dp
        num, glob = self.num_microbatches, self.global_batch_size
        if num and glob and num * per_micro != glob:
            raise ConfigError(
                "--global-batch-size",
                f"must equal --micro-batch-size x --num-microbatches x --dp "
                f"({self.micro_batch_size} x {num} x {self.dp} = {num * per_micro}), got {glob}",
            )
        if glob and not num:
            if glob % per_micro:
                raise ConfigError(
                    "--global-batch-size",
                    f"must be a multiple of --micro-batch-size x --dp ({self.micro_batch_size} x "
                    f"{self.dp} = {per_micro}), got {glob}",
                )
            num = glob // per_micro
        num = num or self.pp
        check_bound("num_microbatches", num, "--global-batch-size" if glob else "--num-microbatches")
        check_bound("global_batch_size", num * per_micro, "--global-batch-size")
        object.__setattr__(self, "num_microbatches", num)
        object.__setattr__(self, "global_batch_size", num * per_micro)

    def _check_layout(self) -> None:
        m, p = self.model, self.pp
        object.__setattr__(self, "stage_layers", tuple(self.stage_layers))
        split_layers(m, p, self.stage_layers)  # raises on a bad explicit split or pp > layers
        if self.stage_layers == split_layers(m, p):
            object.__setattr__(self, "stage_layers", ())  # the default, however it was given
        if m.num_heads % self.tp or m.num_kv_heads % self.tp:
            heads = m.num_heads if m.num_heads % self.tp else m.num_kv_heads
            what = "--num-heads" if m.num_heads % self.tp else "--num-kv-heads"
            raise ConfigError(
                "--tp",
                f"must divide {what}: {heads} heads cannot be split over {self.tp} ranks "
                f"({heads} % {self.tp} = {heads % self.tp})",
            )
        if m.ffn_hidden_size % self.tp:
            raise ConfigError(
                "--tp",
                f"must divide --ffn-hidden-size ({m.ffn_hidden_size} % {self.tp} = "
                f"{m.ffn_hidden_size % self.tp})",
            )
        if m.vocab_size % self.tp:
            raise ConfigError(
                "--tp",
                f"must divide --vocab-size: the embedding and the LM head are split over the "
                f"vocabulary ({m.vocab_size} % {self.tp} = {m.vocab_size % self.tp}); pad it to a "
                f"multiple of 128 x tp as Megatron does",
            )
        for name, value in without_no_ops({k: getattr(self, k) for k in ("tp", "dp", *_NO_OPS)}).items():
            object.__setattr__(self, name, value)
        if self.sequence_parallel and m.seq_len % self.tp:
            raise ConfigError(
                "--sequence-parallel",
                f"splits the sequence over the tp ranks: --tp must divide --seq-len "
                f"({m.seq_len} % {self.tp} = {m.seq_len % self.tp})",
            )
        check_schedule(self.schedule, p, self.num_microbatches, self.bpipe_cap, self.virtual_stages)
        if SCHEDULE[self.schedule].splits_backward and self.recompute != "none":
            raise ConfigError(
                "--recompute",
                f"{self.schedule} computes input and weight gradients apart, which recomputed "
                f"(checkpointed) layers cannot; use --recompute none, got {self.recompute}",
            )
        if self.virtual_stages > 1:
            stages = p * self.virtual_stages
            if self.stage_layers:
                raise ConfigError(
                    "--stage-layers", f"cannot be given with --virtual-stages {self.virtual_stages}"
                )
            if m.num_layers % stages:
                raise ConfigError(
                    "--virtual-stages",
                    f"cuts the model into pp x V = {p} x {self.virtual_stages} = {stages} equal chunks: "
                    f"they must divide --num-layers ({m.num_layers} % {stages} = {m.num_layers % stages})",
                )
        limit = self.memory_limit
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
            raise ConfigError("--memory-limit", f"must be a positive number of bytes, got {limit!r}")
        if limit is not None and limit > MAX_BYTES:
            raise ConfigError("--memory-limit", f"at most {MAX_BYTES:,} bytes (1 PiB), got {limit:,}")
        if SCHEDULE[self.schedule].capped:
            object.__setattr__(self, "bpipe_cap", self.bpipe_cap or SCHEDULE[self.schedule].default_cap(p))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def trial_dtype(self) -> str:
        """The dtype a trial trains in: `dtype`, else fp32 on a CPU and bf16 on a GPU."""
        return self.dtype or ("bf16" if self.device == "cuda" else "fp32")

    @property
    def activation_shape(self) -> tuple[int, int, int]:
        """What one stage sends the next per micro-batch (and gets back as its gradient):
        (micro-batch, sequence, hidden), the sequence split over tp with sequence parallelism."""
        t = self.tp if self.sequence_parallel else 1
        return self.micro_batch_size, self.model.seq_len // t, self.model.hidden_size

    @property
    def split(self) -> tuple[int, ...]:
        """Layers per pipeline stage: `stage_layers`, else the default `split_layers`; with V model
        chunks per rank, per virtual stage (p x V equal ones: rank s's chunk c is stage c p + s)."""
        if self.virtual_stages > 1:
            stages = self.pp * self.virtual_stages
            return (self.model.num_layers // stages,) * stages
        return self.stage_layers or split_layers(self.model, self.pp)

    @property
    def num_model_stages(self) -> int:
        """How many pieces the model is cut into: pp x V."""
        return self.pp * self.virtual_stages

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.model.seq_len

    def to_dict(self) -> dict[str, Any]:
        """The normalised config as contracts.md's `config` JSON field."""
        out: dict[str, Any] = {"model": self.model.name, "family": self.model.family}
        out.update({k: getattr(self.model, k) for k in MODEL_FIELDS})
        for f in dataclasses.fields(self):
            if f.name not in ("model", "extra"):
                out[f.name] = getattr(self, f.name)
        out["stage_layers"] = list(self.stage_layers)
        out["world_size"] = self.world_size
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        """Inverse of `to_dict` (a model given by its fields, not looked up again)."""
        data = dict(data)
        model = ModelSpec(
            name=data.pop("model"),
            family=data.pop("family"),
            **{k: data.pop(k) for k in MODEL_FIELDS},
        )
        data.pop("world_size", None)
        data["stage_layers"] = tuple(data.get("stage_layers") or ())
        return cls(model=model, **data)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration dict (`TrialConfig.to_dict`) without the later knobs at their defaults
    (what a configuration's hash covers: `knobs.identity`)."""
    return knobs.identity(config)


def describe_later_knobs(config: dict[str, Any]) -> str:
    """The later knobs of a configuration dict that differ from their defaults, space-separated
    ("" when none do), for the one-line descriptions (`knobs.describe_later`)."""
    return knobs.describe_later(config)


def _head_layers(spec: ModelSpec) -> float:
    """The last stage's final norm, head and loss in layers' worth of FLOPs (for the split)."""
    h, f, kv, s = spec.hidden_size, spec.ffn_hidden_size, spec.num_kv_heads * spec.head_dim, spec.seq_len
    layer = 2 * (2 * h * h + 2 * h * kv) + 2 * h * f * (2 if spec.family == "gpt" else 3) + 4 * s * h
    return 2 * h * spec.vocab_size / layer


def split_layers(spec: ModelSpec, pp: int, explicit: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Layers per pipeline stage: `explicit` (checked: pp positive counts summing to the layers),
    else the split that minimises the heaviest stage, counting the last stage's head in layers'
    worth of FLOPs (`_head_layers`; the embedding is a lookup): an even split where pp divides the
    layers and the head weighs less than a layer; otherwise the head's stage gets fewer layers,
    as Megatron's first/last-stage layer options allow. Ties go to the even split's shape.
    """
    L = spec.num_layers
    if explicit:
        if len(explicit) != pp:
            raise ConfigError(
                "--stage-layers", f"must give one layer count per stage: {len(explicit)} counts for --pp {pp}"
            )
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in explicit):
            raise ConfigError("--stage-layers", f"every stage needs at least one layer, got {list(explicit)}")
        if sum(explicit) != L:
            raise ConfigError(
                "--stage-layers",
                f"must add up to --num-layers {L}: {'+'.join(map(str, explicit))} = {sum(explicit)}",
            )
        return tuple(explicit)
    if pp > L:
        raise ConfigError("--pp", f"at most --num-layers ({L}) stages, got {pp}: every stage needs a layer")
    return _balanced(L, pp, _head_layers(spec))


@functools.lru_cache(maxsize=4096)
def _balanced(layers: int, pp: int, head: float) -> tuple[int, ...]:
    if pp == 1:
        return (layers,)
    base, extra = divmod(layers, pp)
    even = [base + (1 if i < extra else 0) for i in range(pp)]  # the remainder on the first stages
    best, best_load = tuple(even), max(even[:-1] + [even[-1] + head])
    for last in range(1, layers - pp + 2):  # the head's stage takes `last` layers, the rest share
        rest_base, rest_extra = divmod(layers - last, pp - 1)
        rest = [rest_base + (1 if i < rest_extra else 0) for i in range(pp - 1)]
        load = max(max(rest), last + head)
        if load < best_load - 1e-9:
            best, best_load = (*rest, last), load
    return best


def model_flops_per_token(spec: ModelSpec, *, recompute: str) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style.

    6*N + 12*L*h*s, where N = non-embedding parameters plus the LM head (token and position
    embeddings are lookups, not matmuls) and 12*L*h*s is attention's QK^T and AV (4*h*s per
    layer and token forward, x3 for training; causal masking is not discounted). Recompute adds
    the FLOPs actually re-run (hardware FLOPs, not MFU's model FLOPs): "full" runs the forward
    twice, so x 8/6; "selective" re-runs the attention core: + 4*L*h*s.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    h, s, L = spec.hidden_size, spec.seq_len, spec.num_layers
    embeddings = spec.vocab_size * h + (s * h if spec.family == "gpt" else 0)
    n = spec.num_params() - embeddings
    flops = 6.0 * n + 12.0 * L * h * s
    if recompute == "full":
        return flops * 8.0 / 6.0
    if recompute == "selective":
        return flops + 4.0 * L * h * s
    return flops
