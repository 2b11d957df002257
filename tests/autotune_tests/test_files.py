"""Files users name: every bad one is one line naming the flag or key; nothing is measured in vain.

Before this, a binary file as --model, --cluster or the space, `trial --data` a directory and
`profile --out` a directory ended in tracebacks, and YAML with a duplicate key kept the last one
silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.cli import validate
from autotune.config import load_model
from autotune.errors import ConfigError
from autotune.estimate.clusters import load_cluster
from autotune.estimate.profiles import load_profile
from autotune.files import MAX_YAML_BYTES, check_output, load_yaml, read_text
from autotune.tuner.space import load_space

ROOT = Path(__file__).resolve().parents[2]


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, what the refusal says)"""
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    empty = tmp_path / "empty.yaml"
    empty.write_text("  \n")
    big = tmp_path / "big.yaml"
    big.write_text("# x\n" * (MAX_YAML_BYTES // 4 + 1))
    return {
        "missing": (tmp_path / "nowhere.yaml", "no such file"),
        "directory": (folder, "is a directory"),
        "binary": (binary, "is a binary file"),
        "not-utf8": (latin, r"is not UTF-8 text \(byte 0xe9 at offset 9\)"),
        "empty": (empty, "is empty"),
        "too-big": (big, "over the 1.0 MiB bound"),
        "device": (Path("/dev/zero"), "is not a regular file"),
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "not-utf8", "empty", "too-big", "device"])
def test_a_bad_file_is_one_line_for_every_reader(tmp_path: Path, kind: str) -> None:
    path, match = bad_files(tmp_path)[kind]
    readers = [
        ("--model", lambda: load_model(str(path))),
        ("--cluster", lambda: load_cluster(str(path))),
        ("space", lambda: load_space(str(path))),
        ("--profile", lambda: load_profile(path)),
    ]
    for field, read in readers:
        if kind == "too-big" and field == "--profile":
            continue  # a profile's bound is 16 MiB: JSON, checked below
        with pytest.raises(ConfigError, match=match) as err:
            read()
        assert err.value.field == field and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("what", "text", "key"),
    [
        ("model", "family: gpt\nnum_layers: 2\nhidden_size: 32\nnum_layers: 4\n", "num_layers"),
        ("cluster", "nodes: 1\ndevices_per_node: 8\ndevice: a100-80g\nnodes: 2\n", "nodes"),
        ("space", "model: tiny-gpt\nglobal_batch_size: 8\nmax_world_size: 2\nmax_world_size: 1\n",
         "max_world_size"),
        ("space", "model: tiny-gpt\nglobal_batch_size: 8\nknobs:\n  pp: [1]\n  dp: [1]\n  pp: [2]\n", "pp"),
    ],
)  # fmt: skip
def test_a_duplicate_key_is_an_error_naming_it(tmp_path: Path, what: str, text: str, key: str) -> None:
    path = tmp_path / f"{what}.yaml"
    path.write_text(text)
    read = {"model": load_model, "cluster": load_cluster, "space": load_space}[what]
    with pytest.raises(ConfigError, match=f"duplicate key '{key}' at line") as err:
        read(str(path))
    assert "\n" not in str(err.value)


def test_yaml_is_data_never_code_and_never_huge() -> None:
    with pytest.raises(ConfigError, match="is not valid YAML.*constructor"):
        load_yaml("x: !!python/object/apply:os.system ['true']\n", "f")
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True)
    )
    with pytest.raises(ConfigError, match="more than 100,000 YAML nodes"):
        load_yaml(bomb, "f")  # aliases: 10^7 nodes from a few hundred bytes
    with pytest.raises(ConfigError, match="more than 100,000 YAML nodes"):
        load_yaml("a: &a [1, *a]\n", "f")  # contains itself
    assert load_yaml("a: 1\nb: [1, 2]\n", "f") == {"a": 1, "b": [1, 2]}


def test_output_paths_are_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory") as err:
        check_output(tmp_path, "--out")
    assert err.value.field == "--out"
    with pytest.raises(ConfigError, match="does not exist"):
        check_output(tmp_path / "no" / "p.json", "--out")
    assert check_output(tmp_path / "p.json", "--out") == tmp_path / "p.json"
    for argv in (["--out", str(tmp_path)], ["--out", str(tmp_path / "missing" / "p.json")]):
        with pytest.raises(ConfigError) as err:
            validate(["profile", "--model", "tiny-gpt", *argv])
        assert err.value.field == "--out"


def test_read_only_folder_is_refused_for_output(tmp_path: Path) -> None:
    """A read-only mount (which stops root too), else a folder without write permission."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0  # fmt: skip
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot mount here, and root may write into any folder")
        folder.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot be written"):
            check_output(folder / "p.json", "--out")
        with pytest.raises(ConfigError, match="cannot be written") as err:
            validate(["profile", "--model", "tiny-gpt", "--out", str(folder / "p.json")])
        assert err.value.field == "--out"
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_text_gives_the_text() -> None:
    path = ROOT / "search_spaces" / "demo-cpu.yaml"
    assert read_text(path, "space", what="space", max_bytes=MAX_YAML_BYTES) == path.read_text()


def test_trial_data_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory, not a token file") as err:
        validate(["trial", "--model", "tiny-gpt", "--device", "cpu", "--data", str(tmp_path)])
    assert err.value.field == "--data"


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "autotune.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def test_the_commands_refuse_a_binary_file_in_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(os.urandom(4096) + b"\0")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["estimate", "--model", str(binary)], "--model"),
        (["estimate", "--model", "tiny-gpt", "--cluster", str(binary)], "--cluster"),
        (["estimate", "--model", "tiny-gpt", "--profile", str(binary)], "--profile"),
        (["trial", "--model", str(binary)], "--model"),
        (["profile", "--model", str(binary), "--out", "p.json"], "--model"),
        (["profile", "--model", "tiny-gpt", "--out", str(tmp_path)], "--out"),
        (["tune", str(binary), "--storage", f"sqlite:///{tmp_path / 'a.db'}"], "space"),
    ]
    for args, field in cases:
        run = _cli(args, tmp_path)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"autotune: error: {field}:"), (args, run.stderr)
        assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
