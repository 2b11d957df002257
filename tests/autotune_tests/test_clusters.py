"""Cluster presets, the YAML form, validation, placement helpers (torch-free)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from autotune.errors import ConfigError
from autotune.estimate.clusters import (
    CPU_DEFAULT_P2P_BANDWIDTH,
    CPU_DEFAULT_P2P_POST,
    ClusterSpec,
    cluster_names,
    link_between,
    load_cluster,
    node_of,
)


def test_presets_cover_a100_and_h100_in_1_to_16_nodes() -> None:
    names = cluster_names()
    for device in ("a100-80g", "h100-80g"):
        for n in range(1, 17):
            assert f"{device}-8x{n}" in names
    assert "cpu-local" in names
    for name in names:
        assert load_cluster(name).name == name


def test_a100_figures() -> None:
    c = load_cluster("a100-80g-8x8")
    assert (c.nodes, c.devices_per_node, c.world_size) == (8, 8, 64)
    assert c.device_memory == 80 * 2**30
    assert c.peak_flops == 312e12 and c.hbm_bandwidth == 2.0e12
    assert c.intra_bandwidth == 300e9 and c.inter_bandwidth == 25e9
    assert c.dtype == "bf16" and c.dtype_bytes == 2
    h = load_cluster("h100-80g-8x2")
    assert h.world_size == 16 and h.peak_flops == 989e12 and h.intra_bandwidth == 450e9
    assert h.inter_bandwidth == 50e9 and h.hbm_bandwidth == 3.35e12


def test_cpu_local_uses_measured_comm() -> None:
    default = load_cluster("cpu-local")
    assert default.devices_per_node == (os.cpu_count() or 1) and default.nodes == 1
    assert default.dtype == "fp32" and default.device_memory > 0
    assert default.intra_bandwidth == CPU_DEFAULT_P2P_BANDWIDTH
    assert default.post_overhead == CPU_DEFAULT_P2P_POST
    measured = load_cluster("cpu-local", comm={"p2p_bandwidth": 3.5e9, "p2p_latency": 2e-5, "p2p_post": 7e-5})
    assert measured.intra_bandwidth == measured.inter_bandwidth == 3.5e9
    assert measured.intra_latency == 2e-5 and measured.post_overhead == 7e-5

    class _Comm:  # a profile's comm object; p2p_post None: not measured (an older profile)
        p2p_bandwidth, p2p_latency, p2p_post = 1.5e9, 3e-5, None

    from_object = load_cluster("cpu-local", comm=_Comm())
    assert from_object.inter_latency == 3e-5 and from_object.post_overhead == CPU_DEFAULT_P2P_POST
    with pytest.raises(ConfigError, match="p2p_post"):
        load_cluster("cpu-local", comm={"p2p_post": -1.0})
    with pytest.raises(ConfigError, match="p2p_bandwith"):
        load_cluster("cpu-local", comm={"p2p_bandwith": 1.0})


def test_node_of_and_links() -> None:
    c = load_cluster("a100-80g-8x2")
    assert node_of(c, 0) == 0 and node_of(c, 7) == 0 and node_of(c, 8) == 1 and node_of(c, 15) == 1
    with pytest.raises(ValueError):
        node_of(c, 16)
    # the datasheet bandwidths at NCCL's efficiency on them
    assert link_between(c, 0, 7) == (300e9 * c.intra_efficiency, 5e-6)
    assert link_between(c, 7, 8) == (25e9 * c.inter_efficiency, 1e-5)
    assert 0.5 < c.intra_efficiency < 1 and 0.5 < c.inter_efficiency < 1
    assert load_cluster("a100-80g-8x384").world_size == 3072  # the largest published run
    assert link_between(c, 3, 3) == (math.inf, 0.0)


@pytest.mark.parametrize("name", ["a100-80g-8x0", "a100-80g-8x1025", "a100-80g-4x2", "v100-8x1", "nope"])
def test_unknown_presets(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_cluster(name)
    assert err.value.field == "--cluster" and "presets" in err.value.rule


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


FULL = """
nodes: 2
devices_per_node: 4
device: MI-something
device_memory: 64GiB
peak_flops: 312e12
hbm_bandwidth: 1.6e+12
intra_bandwidth: 1.0e+11
intra_latency: 4.0e-6
inter_bandwidth: 1.25e+10
inter_latency: 1.5e-5
"""


def test_yaml_cluster(tmp_path: Path) -> None:
    c = load_cluster(_yaml(tmp_path, FULL))
    assert c.name == "mine" and c.world_size == 8 and c.device_memory == 64 * 2**30
    assert c.peak_flops == 312e12  # '312e12' is a YAML string; accepted as a number
    assert c.dtype == "bf16" and c.post_overhead == 0.0  # optional
    assert load_cluster(_yaml(tmp_path, FULL + "post_overhead: 2.0e-5\n")).post_overhead == 2e-5


def test_yaml_cluster_from_the_device_table(tmp_path: Path) -> None:
    c = load_cluster(_yaml(tmp_path, "name: two-h100\nnodes: 1\ndevices_per_node: 2\ndevice: h100-80g\n"))
    assert c.name == "two-h100" and c.world_size == 2 and c.peak_flops == 989e12
    assert c.device == "H100-80GB-SXM"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ("colour: red\n", "colour"),
        ("nodes: 0\n", "nodes"),
        ("nodes: 1.5\n", "nodes"),
        ("inter_bandwidth: -1\n", "inter_bandwidth"),
        ("intra_latency: fast\n", "intra_latency"),
        ("device_memory: lots\n", "device_memory"),
        ("dtype: int4\n", "dtype"),
        ("post_overhead: -1e-6\n", "post_overhead"),
    ],
)
def test_yaml_errors_name_the_key(tmp_path: Path, edit: str, field: str) -> None:
    key = edit.split(":")[0]
    text = "\n".join(line for line in FULL.splitlines() if not line.startswith(key + ":")) + "\n" + edit
    with pytest.raises(ConfigError) as err:
        load_cluster(_yaml(tmp_path, text))
    assert err.value.field == field


def test_yaml_missing_key_and_bad_files(tmp_path: Path) -> None:
    text = "\n".join(line for line in FULL.splitlines() if not line.startswith("hbm_bandwidth"))
    with pytest.raises(ConfigError) as err:
        load_cluster(_yaml(tmp_path, text))
    assert err.value.field == "hbm_bandwidth"
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        load_cluster(_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster(_yaml(tmp_path, "nodes: [1\n"))
    with pytest.raises(ConfigError):  # yaml.safe_load: no python objects
        load_cluster(_yaml(tmp_path, "nodes: !!python/object/apply:os.getcwd []\n"))


def test_direct_construction_is_validated() -> None:
    base = load_cluster("a100-80g-8x1").to_dict()
    ClusterSpec(**{**base, "peak_flops": None})
    for key, value in (("devices_per_node", 0), ("peak_flops", 0.0), ("intra_latency", -1e-6), ("name", "")):
        with pytest.raises(ConfigError) as err:
            ClusterSpec(**{**base, key: value})
        assert err.value.field == key
