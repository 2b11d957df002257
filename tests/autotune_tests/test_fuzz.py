"""Property-based fuzzing of everything a user types: search spaces, model and cluster YAML, flags.

Every input either loads (or passes the command's checks) or raises the project's one-line
`ConfigError` (argparse's own refusal, exit 2, for malformed flags); never another exception.
The cases run in-process through the loaders and `autotune.cli.validate` (the checks `main` runs
before any work), so hundreds run in seconds; a sample of refusals runs as real subprocesses:
exit 2, one stderr line, no traceback, nothing written.

The examples are drawn deterministically (the suite's results do not change from run to run);
`HYPOTHESIS_PROFILE=explore` draws new ones each run, with more examples.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune.cli import validate
from autotune.config import load_model
from autotune.errors import ConfigError
from autotune.estimate.clusters import load_cluster
from autotune.files import load_yaml
from autotune.tuner.space import KNOBS, TOP_KEYS, space_from_dict

ROOT = Path(__file__).resolve().parents[2]

settings.register_profile(
    "suite", max_examples=150, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
settings.register_profile("explore", max_examples=2000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# -- values: the edges of every type a field can meet ------------------------------------------

INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([0, 1, 2, 3, 4, 8, 64, 1000, 1024, 65536, 262145, 10**9, 10**12, 2**63, -(2**63)]),
)
SCALARS = st.one_of(
    INTS,
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1f1b", "gpipe", "bpipe", "auto", "none", "full", "selective", "cpu", "cuda",
                     "tiny-gpt", "tiny-llama", "llama-65b", "cpu-local", "a100-80g-8x8", "2GiB", "1e400",
                     "5m", "8x", "-1", "NaN", "tokens_per_s", "mfu", "gpt", "llama"]),
)  # fmt: skip
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def choice(name: str) -> st.SearchStrategy[Any]:
    good = {
        "tp": st.sampled_from([1, 2, 4]), "pp": st.sampled_from([1, 2, 3, 4]), "dp": st.sampled_from([1, 2]),
        "micro_batch_size": st.sampled_from([1, 2, 4]),
        "schedule": st.sampled_from(["1f1b", "gpipe", "bpipe", "interleaved", "zb-h1"]),
        "virtual_stages": st.sampled_from([1, 2, 3]),
        "recompute": st.sampled_from(["none", "selective", "full"]), "flash_attention": st.booleans(),
        "distributed_optimizer": st.booleans(), "overlap_grad_reduce": st.booleans(),
        "sequence_parallel": st.booleans(),
    }[name]  # fmt: skip
    return st.one_of(good, good, good, SCALARS)


def knob(name: str) -> st.SearchStrategy[Any]:
    return st.one_of(choice(name), st.lists(choice(name), max_size=4), st.just("auto"), JUNK)


MODEL = st.one_of(
    st.sampled_from(["tiny-gpt", "tiny-llama", "gpt3-65b", "no-such-model", "x.yaml"]),
    st.fixed_dictionaries(
        {"preset": st.sampled_from(["tiny-gpt", "tiny-llama"])},
        optional={"seq_len": INTS, "num_layers": INTS, "hidden_size": INTS, "name": SCALARS, "junk": JUNK},
    ),
    st.fixed_dictionaries(
        {"family": st.sampled_from(["gpt", "llama", "bert"]), "num_layers": INTS, "hidden_size": INTS,
         "num_heads": INTS, "seq_len": INTS, "vocab_size": INTS, "ffn_hidden_size": INTS},
        optional={"num_kv_heads": INTS, "name": SCALARS},
    ),
    JUNK,
)  # fmt: skip

SPACE = st.fixed_dictionaries(
    {"model": MODEL, "global_batch_size": st.one_of(st.sampled_from([4, 8, 16]), INTS)},
    optional={
        "name": SCALARS, "cluster": st.sampled_from(["cpu-local", "a100-80g-8x1", "nowhere", "c.yaml"]),
        "device": st.sampled_from(["cpu", "cuda", "tpu"]), "max_world_size": INTS,
        "knobs": st.fixed_dictionaries({}, optional={k: knob(k) for k in KNOBS}) | JUNK,
        "objective": st.sampled_from(["tokens_per_s", "mfu", "speed"]),
        "memory_limit": st.one_of(st.sampled_from(["5MB", "2GiB", "1e400", "0", "-3"]), INTS, JUNK),
        "trial": st.fixed_dictionaries({}, optional={"steps": INTS, "timeout": SCALARS}) | JUNK,
        "search": st.fixed_dictionaries(
            {}, optional={k: SCALARS for k in ("trials", "patience", "timeout", "seed_top", "concurrency")}
        ) | JUNK,
        "unknown_key": JUNK,
    },
)  # fmt: skip


def _loads_or_refuses(action: Any) -> Any:
    """Run `action`: a value, or None where it raised ConfigError with a one-line message."""
    try:
        return action()
    except ConfigError as exc:
        assert "\n" not in str(exc) and exc.field and exc.rule
        return None


@given(SPACE)
def test_search_spaces_load_or_refuse_in_one_line(data: dict[str, Any]) -> None:
    space = _loads_or_refuses(lambda: space_from_dict(data, "fuzz.yaml"))
    assert space is None or set(space.source) <= set(TOP_KEYS) | {"model"}
    if space is not None:
        found = _loads_or_refuses(space.configs)
        if found is not None:
            valid, rejected = found
            assert all("\n" not in r.reason for r in rejected)


@given(JUNK)
def test_any_yaml_document_as_a_space_model_or_cluster(data: Any) -> None:
    text = yaml.safe_dump(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.yaml"
        path.write_text(text)
        for load in (load_model, load_cluster):
            _loads_or_refuses(lambda load=load: load(str(path)))  # type: ignore[misc]
    _loads_or_refuses(lambda: space_from_dict(load_yaml(text, "doc.yaml"), "doc.yaml"))


@given(st.text(max_size=200))
def test_any_text_as_yaml(text: str) -> None:
    _loads_or_refuses(lambda: space_from_dict(load_yaml(text, "doc.yaml"), "doc.yaml"))


# -- command lines ------------------------------------------------------------------------------

FLAG_VALUES = st.one_of(
    INTS.map(str),
    st.sampled_from(["", "x", "1.5", "-0", "1e9", "nan", "inf", "2GiB", "1,2,4", "0,1", "1,,2"]),
)
CONFIG_FLAGS = {
    "--num-layers": FLAG_VALUES, "--hidden-size": FLAG_VALUES, "--num-heads": FLAG_VALUES,
    "--seq-len": FLAG_VALUES, "--vocab-size": FLAG_VALUES, "--tp": FLAG_VALUES, "--pp": FLAG_VALUES,
    "--dp": FLAG_VALUES, "--micro-batch-size": FLAG_VALUES, "--num-microbatches": FLAG_VALUES,
    "--global-batch-size": FLAG_VALUES, "--bpipe-cap": FLAG_VALUES, "--memory-limit": FLAG_VALUES,
    "--schedule": st.sampled_from(["1f1b", "gpipe", "bpipe", "zb", ""]),
    "--recompute": st.sampled_from(["none", "full", "selective", "some"]),
    "--device": st.sampled_from(["cpu", "tpu", ""]),
}  # fmt: skip
COMMANDS = {
    "estimate": {**CONFIG_FLAGS,
                 "--cluster": st.sampled_from(["cpu-local", "a100-80g-8x2", "mars", "c.yaml"]),
                 "--method": st.sampled_from(["ours", "paper", "magic"])},
    "trial": {**CONFIG_FLAGS, "--steps": FLAG_VALUES, "--timeout": FLAG_VALUES, "--seed": FLAG_VALUES},
    "schedule": {"--schedule": CONFIG_FLAGS["--schedule"], "--pp": FLAG_VALUES,
                 "--num-microbatches": FLAG_VALUES, "--bpipe-cap": FLAG_VALUES},
    "profile": {"--micro-batch-sizes": FLAG_VALUES, "--num-layers": FLAG_VALUES, "--seq-len": FLAG_VALUES,
                "--device": st.sampled_from(["cpu", "tpu", ""]),
                "--out": st.sampled_from(["p.json", ".", "/"])},
    "tune": {"--storage": st.sampled_from(["sqlite://", "sqlite:///a.db", "mysql://x/y", "postgresql://u:pw@h:x/d",
                                           "not a url", "sqlite:///no/such/dir/a.db"]),
             "--trials": FLAG_VALUES, "--timeout": st.sampled_from(["5m", "8x", "0", "1e400", "-1", "90"]),
             "--patience": FLAG_VALUES},
    "best": {"--storage": st.sampled_from(["sqlite:///a.db", "mysql://x/y", "sqlite://"]),
             "--study": st.sampled_from(["s", ""]), "--model": st.sampled_from(["m", ""]),
             "--cluster": st.sampled_from(["c", ""])},
}  # fmt: skip
FIRST = {"estimate": ["--model", "tiny-gpt"], "trial": ["--model", "tiny-gpt"],
         "profile": ["--model", "tiny-gpt"], "tune": ["demo-cpu"], "schedule": [], "best": []}  # fmt: skip


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    flags = COMMANDS[command]
    chosen = draw(st.lists(st.sampled_from(sorted(flags)), max_size=6, unique=True))
    out = [command, *FIRST[command]]
    if command == "profile" and "--out" not in chosen:
        chosen.append("--out")
    for name in chosen:
        out += [name, draw(flags[name])]
    return out


@given(argv())
def test_command_lines_pass_their_checks_or_refuse_in_one_line(args: list[str]) -> None:
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            work = _loads_or_refuses(lambda: validate(args))
        except SystemExit as exc:  # argparse: a malformed flag value, exit 2 with its one line
            assert exc.code == 2
            work = None
        finally:
            os.chdir(cwd)
        assert work is None or callable(work)
        assert os.listdir(tmp) == []  # checks write nothing


# -- a sample of refusals, as a user meets them --------------------------------------------------

REFUSALS = [
    ["estimate", "--model", "tiny-gpt", "--pp", "5"],
    ["estimate", "--model", "tiny-gpt", "--pp", "2", "--stage-layers", "1,2"],
    ["estimate", "--model", "tiny-gpt", "--schedule", "bpipe", "--pp", "2"],
    ["estimate", "--model", "tiny-gpt", "--memory-limit", "1e400"],
    ["estimate", "--model", "tiny-gpt", "--num-microbatches", "65537"],
    ["trial", "--model", "tiny-gpt", "--bpipe-cap", "0", "--schedule", "bpipe", "--pp", "4"],
    ["trial", "--model", "tiny-gpt", "--steps", "0"],
    ["schedule", "--schedule", "gpipe", "--bpipe-cap", "3"],
    ["profile", "--model", "tiny-gpt", "--device", "tpu", "--out", "p.json"],
    ["profile", "--model", "tiny-gpt", "--micro-batch-sizes", "0,1", "--out", "p.json"],
    ["tune", "demo-cpu", "--storage", "sqlite://"],
    ["tune", "no-such-space"],
    ["best", "--storage", "sqlite:///missing.db", "--study", "s"],
    ["db", "upgrade", "--storage", "mysql://u:pw@h/d"],
]


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


NO_GPU = [["profile", "--model", "tiny-gpt", "--device", "cuda", "--out", "p.json"]]  # refused without one


@pytest.mark.parametrize("args", REFUSALS + (NO_GPU if _no_gpu() else []), ids=lambda a: " ".join(a)[:60])
def test_refusals_as_subprocesses(args: list[str], tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    run = subprocess.run([sys.executable, "-m", "autotune.cli", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=env)  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotune: error: "), run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert list(tmp_path.iterdir()) == []
