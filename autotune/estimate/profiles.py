"""Device profiles: what `autotune profile` measured, as a JSON file the estimator reads (torch-free).

A profile file is one JSON object (written with `json`, never pickle):

```
{"format": "autotune-profile", "version": 1,
 "created": "2025-01-01T12:00:00+00:00",           # ISO 8601
 "device": {"type": "cpu" | "cuda", "name": "AMD EPYC ...", "count": 2},  # cores or GPUs
 "dtype": "float32", "torch": "2.5.1",
 "model": ModelSpec.to_dict(),                      # the model it was measured on
 "tp": 1,
 "comm": {"p2p_bandwidth": bytes/s, "p2p_latency": s,            # gloo between 2 local processes
          "p2p_post": s} | null,                                 # p2p_post optional
 "entries": [{"part": "layer" | "embed" | "head", "micro_batch_size": b,
              "flash_attention": bool, "recompute": "none" | "selective" | "full",
              "threads": n, "fwd_s": mean s, "bwd_s": mean s,
              "activation_bytes": exact saved bytes of one micro-batch}, ...],
 "optimizer": [{"threads": n, "fixed_s": s, "per_param_s": s}, ...]}   # optional
```

"comm": `p2p_latency` is the one-way time of an activation-sized message to a waiting rank
while the sender computes (a pipeline handoff), `p2p_post` the thread time of one of the
executor's send or receive actions while both ranks compute; files without `p2p_post` are read
too (cpu-local's default).

"optimizer" is the AdamW step as `fixed_s + per_param_s x parameters`, fitted to steps over one
and over four layers' parameters; files without it are read too (the cost model then uses its
memory-traffic estimate of the step).

"layer" is one transformer block, "embed" the first stage's embeddings, "head" the last stage's
final norm, LM head and loss. A stage's saved bytes per micro-batch are exactly
`embed (first stage) + layers x layer + head (last stage)`. `Profile.lookup` finds the entry for
a configuration, interpolating linearly in the micro-batch size where that size was not
measured. `load_profile` checks a file against the model and device it is used for and raises
`ConfigError("--profile", reason)` with a one-line reason for anything wrong.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autotune.config import DEVICES, RECOMPUTE, ModelSpec
from autotune.errors import ConfigError
from autotune.files import MAX_PROFILE_BYTES, read_text

FORMAT = "autotune-profile"
VERSION = 1
PARTS = ("layer", "embed", "head")
# The shape fields a profile must agree on with the model it is used for. num_layers is not one:
# every entry is per layer (or the embeddings / head), whatever the depth.
SHAPE_FIELDS = (
    "family",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "seq_len",
    "vocab_size",
    "ffn_hidden_size",
)

_FLAG = "--profile"


@dataclass(frozen=True)
class ProfileEntry:
    """One measured (or interpolated) part at one micro-batch size, attention kind, recompute
    mode and thread count: mean forward and backward seconds and exact saved bytes."""

    part: str
    micro_batch_size: int
    flash_attention: bool
    recompute: str
    threads: int
    fwd_s: float
    bwd_s: float
    activation_bytes: int
    interpolated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "micro_batch_size": self.micro_batch_size,
            "flash_attention": self.flash_attention,
            "recompute": self.recompute,
            "threads": self.threads,
            "fwd_s": self.fwd_s,
            "bwd_s": self.bwd_s,
            "activation_bytes": self.activation_bytes,
        }


@dataclass(frozen=True)
class OptimizerEntry:
    """The optimizer step at one thread count: fixed_s + per_param_s x parameters."""

    threads: int
    fixed_s: float
    per_param_s: float

    def step_s(self, params: int) -> float:
        return self.fixed_s + self.per_param_s * params

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "fixed_s": self.fixed_s, "per_param_s": self.per_param_s}


@dataclass(frozen=True)
class CommProfile:
    """Point-to-point transfer between two local processes: time = bytes / bandwidth + latency,
    and `p2p_post` of the posting thread per send or receive (None: not measured)."""

    p2p_bandwidth: float  # bytes/s
    p2p_latency: float  # s
    p2p_post: float | None = None  # s

    def transfer_s(self, nbytes: int) -> float:
        return self.p2p_latency + nbytes / self.p2p_bandwidth


@dataclass(frozen=True)
class Profile:
    created: str
    device_type: str
    device_name: str
    device_count: int
    dtype: str
    torch_version: str
    model: ModelSpec
    tp: int
    comm: CommProfile | None
    entries: tuple[ProfileEntry, ...]
    optimizer: tuple[OptimizerEntry, ...] = ()
    _index: dict[tuple[str, bool, str], dict[int, dict[int, ProfileEntry]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for e in self.entries:  # (part, flash, recompute) -> threads -> micro-batch size -> entry
            self._index.setdefault((e.part, e.flash_attention, e.recompute), {}).setdefault(e.threads, {})[
                e.micro_batch_size
            ] = e

    @property
    def thread_counts(self) -> list[int]:
        return sorted({e.threads for e in self.entries})

    @property
    def micro_batch_sizes(self) -> list[int]:
        return sorted({e.micro_batch_size for e in self.entries})

    def lookup(
        self,
        part: str,
        micro_batch_size: int,
        flash_attention: bool,
        recompute: str,
        threads: int | None = None,
    ) -> ProfileEntry:
        """The entry for a part and configuration.

        `threads`: the largest profiled thread count at or below it, else the smallest profiled;
        None means the largest profiled. A micro-batch size that was not profiled is interpolated
        linearly between the profiled sizes on either side of it, or extrapolated from the two
        smallest (or largest) profiled sizes, times and activation bytes alike (bytes are exactly
        affine in b, so this is exact for them), and the result has `interpolated=True`; with a
        single profiled size, everything scales in proportion to b. Extrapolated times are kept
        at or above the nearest measurement's proportional share (below the profiled sizes) and
        at or above the largest measurement (above them). Raises ConfigError("--profile")
        when the profile has no entry for the part, attention kind and recompute mode.
        """
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        by_threads = self._index.get((part, bool(flash_attention), recompute))
        if not by_threads:
            attention = "flash attention" if flash_attention else "no flash attention"
            raise ConfigError(
                _FLAG, f"has no {part!r} measurement with {attention} and recompute {recompute!r}"
            )
        counts = sorted(by_threads)
        if threads is None:
            chosen = counts[-1]
        else:
            below = [t for t in counts if t <= threads]
            chosen = below[-1] if below else counts[0]
        return _at_size(by_threads[chosen], micro_batch_size)

    def optimizer_step_s(self, params: int, threads: int | None = None) -> float | None:
        """The measured optimizer step over `params` parameters at `threads` (chosen as in
        `lookup`), or None where the profile has no optimizer measurement."""
        if not self.optimizer:
            return None
        counts = sorted(self.optimizer, key=lambda e: e.threads)
        below = [e for e in counts if threads is None or e.threads <= threads]
        return (below[-1] if below else counts[0]).step_s(params)

    def stage_activation_bytes(
        self,
        *,
        layers: int,
        first: bool,
        last: bool,
        micro_batch_size: int,
        flash_attention: bool,
        recompute: str,
    ) -> int:
        """Saved bytes of one micro-batch on a stage of `layers` blocks (+ embed / head)."""

        def part(name: str) -> int:
            return self.lookup(name, micro_batch_size, flash_attention, recompute).activation_bytes

        return (part("embed") if first else 0) + layers * part("layer") + (part("head") if last else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "device": {"type": self.device_type, "name": self.device_name, "count": self.device_count},
            "dtype": self.dtype,
            "torch": self.torch_version,
            "model": self.model.to_dict(),
            "tp": self.tp,
            "comm": None
            if self.comm is None
            else {
                "p2p_bandwidth": self.comm.p2p_bandwidth,
                "p2p_latency": self.comm.p2p_latency,
                **({} if self.comm.p2p_post is None else {"p2p_post": self.comm.p2p_post}),
            },
            "entries": [e.to_dict() for e in self.entries],
            **({"optimizer": [e.to_dict() for e in self.optimizer]} if self.optimizer else {}),
        }


# -- parsing and checking -------------------------------------------------------------------------


def _at_size(by_size: dict[int, ProfileEntry], b: int) -> ProfileEntry:
    """The entry at micro-batch size `b`: measured, or interpolated as `Profile.lookup` says."""
    if b in by_size:
        return by_size[b]
    sizes = sorted(by_size)
    if len(sizes) == 1:
        e = by_size[sizes[0]]
        scale = b / e.micro_batch_size
        return replace(
            e,
            micro_batch_size=b,
            fwd_s=e.fwd_s * scale,
            bwd_s=e.bwd_s * scale,
            activation_bytes=round(e.activation_bytes * scale),
            interpolated=True,
        )
    below = [s for s in sizes if s < b]
    above = [s for s in sizes if s > b]
    inside = bool(below and above)
    if inside:  # interpolate between the neighbours on either side
        near, other = by_size[below[-1]], by_size[above[0]]
    elif above:  # extrapolate down from the two smallest
        near, other = by_size[above[0]], by_size[above[1]]
    else:  # extrapolate up from the two largest
        near, other = by_size[below[-1]], by_size[below[-2]]

    def line(y0: float, y1: float) -> float:
        return y0 + (y1 - y0) * (b - near.micro_batch_size) / (other.micro_batch_size - near.micro_batch_size)

    def time(y0: float, y1: float) -> float:
        if inside:
            return max(line(y0, y1), 0.0)
        # Never below the nearest measurement's proportional share (going down) or below the
        # nearest measurement itself (going up), whatever noise did to the slope.
        floor = y0 * b / near.micro_batch_size if b < near.micro_batch_size else y0
        return max(line(y0, y1), floor)

    return replace(
        near,
        micro_batch_size=b,
        fwd_s=time(near.fwd_s, other.fwd_s),
        bwd_s=time(near.bwd_s, other.bwd_s),
        activation_bytes=max(0, round(line(near.activation_bytes, other.activation_bytes))),
        interpolated=True,
    )


def _bad(reason: str) -> ConfigError:
    return ConfigError(_FLAG, reason)


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise _bad(f"{where} lacks the field {key!r}")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise _bad(f"{where} field {key!r} must be {names}, got {type(value).__name__} {value!r}")
    return value


def _positive(value: float, key: str, where: str, *, zero_ok: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise _bad(
            f"{where} field {key!r} must be {'non-negative' if zero_ok else 'positive'}, got {value!r}"
        )


def _entry(raw: Any, i: int) -> ProfileEntry:
    where = f"entry {i}"
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be a JSON object, got {type(raw).__name__}")
    part = _get(raw, "part", str, where)
    if part not in PARTS:
        raise _bad(f"{where} field 'part' must be one of {', '.join(PARTS)}, got {part!r}")
    recompute = _get(raw, "recompute", str, where)
    if recompute not in RECOMPUTE:
        raise _bad(f"{where} field 'recompute' must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    b = _get(raw, "micro_batch_size", int, where)
    threads = _get(raw, "threads", int, where)
    for key, value in (("micro_batch_size", b), ("threads", threads)):
        _positive(value, key, where)
    fwd = float(_get(raw, "fwd_s", (int, float), where))
    bwd = float(_get(raw, "bwd_s", (int, float), where))
    _positive(fwd, "fwd_s", where, zero_ok=True)
    _positive(bwd, "bwd_s", where, zero_ok=True)
    nbytes = _get(raw, "activation_bytes", int, where)
    _positive(nbytes, "activation_bytes", where, zero_ok=True)
    flash = _get(raw, "flash_attention", bool, where)
    return ProfileEntry(part, b, flash, recompute, threads, fwd, bwd, nbytes)


def parse_profile(data: Any) -> Profile:
    """A Profile from the decoded JSON, or ConfigError("--profile", reason)."""
    if not isinstance(data, dict):
        raise _bad(f"is not a profile: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise _bad(f"is not a profile: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if version != VERSION:
        raise _bad(f"has format version {version!r}; this autotune reads version {VERSION}")
    where = "profile"
    created = _get(data, "created", str, where)
    device = _get(data, "device", dict, where)
    device_type = _get(device, "type", str, "profile device")
    if device_type not in DEVICES:
        raise _bad(f"profile device field 'type' must be one of {', '.join(DEVICES)}, got {device_type!r}")
    device_name = _get(device, "name", str, "profile device")
    device_count = _get(device, "count", int, "profile device")
    dtype = _get(data, "dtype", str, where)
    torch_version = _get(data, "torch", str, where)
    raw_model = _get(data, "model", dict, where)
    try:
        model = ModelSpec(**raw_model)
    except TypeError as exc:
        raise _bad(f"profile field 'model' is not a model: {exc}") from None
    except ConfigError as exc:
        raise _bad(f"profile field 'model' is not a valid model: {exc}") from None
    tp = _get(data, "tp", int, where)
    _positive(tp, "tp", where)
    raw_comm = _get(data, "comm", (dict, type(None)), where)
    comm = None
    if raw_comm is not None:
        bw = float(_get(raw_comm, "p2p_bandwidth", (int, float), "profile comm"))
        lat = float(_get(raw_comm, "p2p_latency", (int, float), "profile comm"))
        _positive(bw, "p2p_bandwidth", "profile comm")
        _positive(lat, "p2p_latency", "profile comm", zero_ok=True)
        post = None
        if "p2p_post" in raw_comm:
            post = float(_get(raw_comm, "p2p_post", (int, float), "profile comm"))
            _positive(post, "p2p_post", "profile comm", zero_ok=True)
        comm = CommProfile(bw, lat, post)
    raw_entries = _get(data, "entries", list, where)
    if not raw_entries:
        raise _bad("has no entries")
    entries = tuple(_entry(raw, i) for i, raw in enumerate(raw_entries))
    seen: dict[tuple[str, int, bool, str, int], int] = {}
    for i, e in enumerate(entries):
        key = (e.part, e.micro_batch_size, e.flash_attention, e.recompute, e.threads)
        if key in seen:
            raise _bad(
                f"entry {i} repeats entry {seen[key]}: part {e.part!r}, micro-batch size "
                f"{e.micro_batch_size}, flash_attention {e.flash_attention}, recompute {e.recompute!r}, "
                f"threads {e.threads}"
            )
        seen[key] = i
    optimizer = _optimizer_entries(data.get("optimizer", []))
    return Profile(
        created, device_type, device_name, device_count, dtype, torch_version, model, tp, comm, entries,
        optimizer,
    )  # fmt: skip


def _optimizer_entries(raw: Any) -> tuple[OptimizerEntry, ...]:
    if not isinstance(raw, list):
        raise _bad(f"profile field 'optimizer' must be a list, got {type(raw).__name__}")
    out: list[OptimizerEntry] = []
    for i, item in enumerate(raw):
        where = f"optimizer entry {i}"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be a JSON object, got {type(item).__name__}")
        threads = _get(item, "threads", int, where)
        _positive(threads, "threads", where)
        fixed = float(_get(item, "fixed_s", (int, float), where))
        per_param = float(_get(item, "per_param_s", (int, float), where))
        _positive(fixed, "fixed_s", where, zero_ok=True)
        _positive(per_param, "per_param_s", where, zero_ok=True)
        if any(e.threads == threads for e in out):
            raise _bad(f"{where} repeats threads {threads}")
        out.append(OptimizerEntry(threads, fixed, per_param))
    return tuple(out)


def check_compatible(profile: Profile, *, model: ModelSpec | None = None, device: str | None = None) -> None:
    """ConfigError("--profile") unless the profile was measured on this model's shape and device type."""
    if model is not None:
        for name in SHAPE_FIELDS:
            mine, theirs = getattr(profile.model, name), getattr(model, name)
            if mine != theirs:
                raise _bad(f"profile was measured on {name} {mine}, the model has {theirs}")
    if device is not None and device != profile.device_type:
        raise _bad(
            f"profile was measured on device {profile.device_type} ({profile.device_name}), "
            f"the configuration runs on {device}"
        )


def load_profile(
    path: str | os.PathLike[str], *, model: ModelSpec | None = None, device: str | None = None
) -> Profile:
    """Read and check a profile file; with `model` / `device`, also check it matches them."""
    text = read_text(path, _FLAG, what="profile JSON", max_bytes=MAX_PROFILE_BYTES)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(f"{str(path)!r} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise _bad(f"{str(path)!r} is nested too deeply to be a profile") from None
    profile = parse_profile(data)
    check_compatible(profile, model=model, device=device)
    return profile


def save_profile(profile: dict[str, Any] | Profile, path: str | os.PathLike[str]) -> Path:
    """Check the profile and write it as JSON atomically (temp file in the same folder + os.replace)."""
    data = profile.to_dict() if isinstance(profile, Profile) else profile
    parse_profile(data)  # never write a file that load_profile would refuse
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
