"""Clusters the estimator can predict for: devices, memory, FLOP/s, links (torch-free).

A `ClusterSpec` is `nodes` x `devices_per_node` identical devices; devices in one node talk over
an NVLink-class link (`intra_*`), devices in different nodes over an InfiniBand-class link
(`inter_*`). Bandwidths are bytes/s per direction per device; latencies seconds per message;
`post_overhead` the seconds a rank's thread spends posting one point-to-point send or receive
(optional, default 0: GPU presets leave it out; cpu-local measures it).

Presets:
- `a100-80g-8xN`, `h100-80g-8xN` for N = 1..1024 nodes of 8 GPUs (`a100-80g-8x8` is 64 GPUs),
  from the device table `search_spaces/clusters/devices.yaml` (datasheet figures, cited there);
- `cpu-local`: this machine, one "device" per CPU core, its RAM as device memory, fp32; the
  link figures come from a profile's measured gloo figures when given
  (`load_cluster("cpu-local", comm={"p2p_bandwidth": ..., "p2p_latency": ..., "p2p_post": ...})`),
  else the documented defaults `CPU_DEFAULT_P2P_BANDWIDTH` / `_LATENCY` / `_POST`.

A YAML file gives the same fields (`load_cluster("my.yaml")`); `device` may name a row of the
device table (`a100-80g`), whose figures then fill the keys the file leaves out.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from autotune.config import DTYPE_BYTES, parse_bytes
from autotune.errors import ConfigError, key_name
from autotune.files import load_yaml, read_yaml

DTYPES = DTYPE_BYTES  # the training dtypes, bytes per element (autotune.config)
NODE_COUNTS = range(1, 17)  # the presets cluster_names() lists
MAX_NODES = 1024  # `<device>-8xN` is accepted for N up to this (8,192 devices: published runs reach 3,072)
DEVICES_PER_NODE = 8
CPU_LOCAL = "cpu-local"

# cpu-local defaults when no profile's measured comm figures are given: gloo over loopback
# between two processes on one machine moves a few GB/s at ~tens of microseconds per message.
CPU_DEFAULT_P2P_BANDWIDTH = 2.0e9  # bytes/s
CPU_DEFAULT_P2P_LATENCY = 50e-6  # s
CPU_DEFAULT_P2P_POST = 200e-6  # s of the posting thread per send or receive action (executor, here)
COMM_FIGURES = ("p2p_bandwidth", "p2p_latency", "p2p_post")
CPU_DEFAULT_MEMORY_BANDWIDTH = 20e9  # bytes/s, a nominal DRAM figure per socket
CPU_FALLBACK_MEMORY = 16 * 2**30  # used only where the OS does not report its RAM

_FIELDS = (
    "name",
    "nodes",
    "devices_per_node",
    "device",
    "device_memory",
    "peak_flops",
    "hbm_bandwidth",
    "intra_bandwidth",
    "intra_latency",
    "inter_bandwidth",
    "inter_latency",
    "dtype",
    "post_overhead",
    "gemm_efficiency",
    "intra_efficiency",
    "inter_efficiency",
)
_OPTIONAL = (
    "peak_flops",
    "dtype",
    "post_overhead",
    "gemm_efficiency",
    "intra_efficiency",
    "inter_efficiency",
)
_FRACTIONS = ("gemm_efficiency", "intra_efficiency", "inter_efficiency")
_PRESET = re.compile(r"^(?P<device>[a-z0-9-]+)-(?P<per>\d+)x(?P<nodes>\d+)$")


@dataclass(frozen=True)
class ClusterSpec:
    """`nodes` x `devices_per_node` devices and the links between them.

    `peak_flops` is the dense FLOP/s of one device in the training dtype (bf16 on GPUs), or
    None where unknown (cpu-local: time comes from a profile, or a nominal figure in the cost
    model). `dtype` is the training dtype: "bf16" on GPUs, "fp32" on cpu-local.
    `gemm_efficiency` is the fraction of `peak_flops` the device's best GEMMs reach (the kernel
    model, `autotune.estimate.kernels`, scales it down for thin shapes); `intra_efficiency` and
    `inter_efficiency` the fractions of the links' bandwidths NCCL's collectives and sends reach
    (the bandwidths are the datasheet's; `link_between` gives the effective figure).
    """

    name: str
    nodes: int
    devices_per_node: int
    device: str
    device_memory: int
    peak_flops: float | None
    hbm_bandwidth: float
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    dtype: str = "bf16"
    post_overhead: float = 0.0
    gemm_efficiency: float = 0.8
    intra_efficiency: float = 1.0
    inter_efficiency: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("name", f"must be a non-empty string, got {self.name!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError("device", f"must be a non-empty string, got {self.device!r}")
        for key in ("nodes", "devices_per_node", "device_memory"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(key, f"must be a positive integer, got {value!r}")
        if self.peak_flops is not None:
            _check_number("peak_flops", self.peak_flops, positive=True)
        for key in ("hbm_bandwidth", "intra_bandwidth", "inter_bandwidth"):
            _check_number(key, getattr(self, key), positive=True)
        for key in ("intra_latency", "inter_latency", "post_overhead"):
            _check_number(key, getattr(self, key), positive=False)
        for key in _FRACTIONS:
            value = getattr(self, key)
            _check_number(key, value, positive=True)
            if value > 1:
                raise ConfigError(key, f"must be a fraction in (0, 1], got {value!r}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of activations and parameters in the training dtype."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_number(key: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        what = "a positive number" if positive else "a non-negative number"
        raise ConfigError(key, f"must be {what}, got {value!r}")


def node_of(cluster: ClusterSpec, device_index: int) -> int:
    """The node that holds device `device_index` (devices are numbered node by node)."""
    if not 0 <= device_index < cluster.world_size:
        raise ValueError(f"device index {device_index} is outside the cluster's {cluster.world_size} devices")
    return device_index // cluster.devices_per_node


def link_between(cluster: ClusterSpec, a: int, b: int) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of the link between devices `a` and `b`.

    The same device: no transfer (infinite bandwidth, no latency); the same node: the intra-node
    link; otherwise the inter-node link.
    """
    if a == b:
        node_of(cluster, a)
        return math.inf, 0.0
    return intra_link(cluster) if node_of(cluster, a) == node_of(cluster, b) else inter_link(cluster)


def intra_link(cluster: ClusterSpec) -> tuple[float, float]:
    """(effective bandwidth, latency) inside a node: the datasheet bandwidth x intra_efficiency."""
    return cluster.intra_bandwidth * cluster.intra_efficiency, cluster.intra_latency


def inter_link(cluster: ClusterSpec) -> tuple[float, float]:
    """(effective bandwidth, latency) between nodes: the datasheet bandwidth x inter_efficiency."""
    return cluster.inter_bandwidth * cluster.inter_efficiency, cluster.inter_latency


# -- presets and YAML ---------------------------------------------------------------------------


def _mapping(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError("--cluster", f"{where} must be a YAML mapping of cluster fields")
    return data


def device_table() -> dict[str, dict[str, Any]]:
    """The device rows of `search_spaces/clusters/devices.yaml`, by key (`a100-80g`, ...)."""
    text = resources.files("search_spaces").joinpath("clusters", "devices.yaml").read_text()
    table = _mapping(load_yaml(text, "--cluster", source="devices.yaml"), "devices.yaml")
    return {str(k): dict(v) for k, v in table.items()}


def cluster_names() -> list[str]:
    """The listed preset names: `<device>-8xN` for each device row and N in 1..16 (any N up to
    MAX_NODES is accepted), and cpu-local."""
    names = [f"{key}-{DEVICES_PER_NODE}x{n}" for key in sorted(device_table()) for n in NODE_COUNTS]
    return [*names, CPU_LOCAL]


def _number(key: str, value: Any) -> float:
    """A YAML number; strings such as '312e12' (YAML 1.1 reads them as strings) are accepted."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(key, f"must be a number, got {value!r}") from None
    _check_number(key, value, positive=False)
    return float(value)


def _from_fields(data: dict[str, Any], where: str) -> ClusterSpec:
    unknown = [k for k in data if k not in _FIELDS]
    if unknown:
        raise ConfigError(key_name(unknown[0]), f"unknown key in {where}; allowed: {', '.join(_FIELDS)}")
    missing = [k for k in _FIELDS if k not in data and k not in _OPTIONAL]
    if missing:
        raise ConfigError(missing[0], f"missing from {where}")
    values = dict(data)
    for key in ("nodes", "devices_per_node"):
        if not isinstance(values[key], int) or isinstance(values[key], bool):
            raise ConfigError(key, f"must be a positive integer, got {values[key]!r}")
    memory = values["device_memory"]
    values["device_memory"] = parse_bytes(memory if isinstance(memory, (int, str)) else -1, "device_memory")
    for key in ("hbm_bandwidth", "intra_bandwidth", "intra_latency", "inter_bandwidth", "inter_latency"):
        values[key] = _number(key, values[key])
    if values.get("peak_flops") is not None:
        values["peak_flops"] = _number("peak_flops", values["peak_flops"])
    values.setdefault("peak_flops", None)
    values.setdefault("dtype", "bf16")
    values["post_overhead"] = _number("post_overhead", values.get("post_overhead", 0.0))
    for key in _FRACTIONS:
        if key in values:
            values[key] = _number(key, values[key])
    values["name"] = str(values["name"])
    values["device"] = str(values["device"])
    return ClusterSpec(**values)


def _preset(name: str) -> ClusterSpec | None:
    match = _PRESET.match(name)
    if not match:
        return None
    table = device_table()
    per, nodes = int(match["per"]), int(match["nodes"])
    if match["device"] not in table or per != DEVICES_PER_NODE or not 1 <= nodes <= MAX_NODES:
        return None
    row = table[match["device"]]
    return _from_fields({"name": name, "nodes": nodes, "devices_per_node": per, **row}, "devices.yaml")


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return CPU_FALLBACK_MEMORY


def _comm_figures(comm: Any) -> dict[str, Any]:
    """A mapping, or an object with `COMM_FIGURES` attributes (a profile's comm)."""
    if comm is None:
        return {}
    if isinstance(comm, dict):
        return dict(comm)
    return {k: getattr(comm, k) for k in COMM_FIGURES if getattr(comm, k, None) is not None}


def cpu_local(comm: Any = None) -> ClusterSpec:
    """This machine: one device per CPU core, its RAM, fp32; links from `comm` or the defaults.

    `comm`: {"p2p_bandwidth": bytes/s, "p2p_latency": s, "p2p_post": s} (any may be left out),
    or an object with those attributes.
    """
    comm = _comm_figures(comm)
    unknown = sorted(set(comm) - set(COMM_FIGURES))
    if unknown:
        raise ConfigError(
            "--profile", f"unknown comm figure {unknown[0]!r}; expected {', '.join(COMM_FIGURES)}"
        )
    bandwidth = _number("p2p_bandwidth", comm.get("p2p_bandwidth", CPU_DEFAULT_P2P_BANDWIDTH))
    latency = _number("p2p_latency", comm.get("p2p_latency", CPU_DEFAULT_P2P_LATENCY))
    post = _number("p2p_post", comm.get("p2p_post", CPU_DEFAULT_P2P_POST))
    return ClusterSpec(
        name=CPU_LOCAL,
        nodes=1,
        devices_per_node=os.cpu_count() or 1,
        device="cpu",
        device_memory=_physical_memory(),
        peak_flops=None,
        hbm_bandwidth=CPU_DEFAULT_MEMORY_BANDWIDTH,
        intra_bandwidth=bandwidth,
        intra_latency=latency,
        inter_bandwidth=bandwidth,
        inter_latency=latency,
        dtype="fp32",
        post_overhead=post,
    )


def load_cluster(name_or_path: str, *, comm: Any = None) -> ClusterSpec:
    """A cluster from a preset name or a YAML file.

    `comm` (a profile's measured `p2p_bandwidth` bytes/s, `p2p_latency` s and `p2p_post` s)
    sets cpu-local's links; the GPU presets and YAML files carry their own link figures and ignore it.
    """
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.exists():
        data = _mapping(read_yaml(path, "--cluster", what="cluster YAML"), repr(name_or_path))
        data.setdefault("name", path.stem)
        device = data.get("device")
        table = device_table()
        if isinstance(device, str) and device in table:
            data = {**table[device], **data, "device": table[device]["device"]}
        return _from_fields(data, name_or_path)
    if name_or_path == CPU_LOCAL:
        return cpu_local(comm)
    preset = _preset(name_or_path)
    if preset is None:
        examples = ", ".join(n for n in cluster_names() if n.endswith(("-8x1", "-8x8")))
        raise ConfigError(
            "--cluster",
            f"unknown cluster {name_or_path!r}; presets are <device>-8xN for N in 1..{MAX_NODES} "
            f"({examples}, ...) and {CPU_LOCAL}, or a YAML file",
        )
    return preset
