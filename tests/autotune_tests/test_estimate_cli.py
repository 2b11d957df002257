"""`autotune estimate` end to end: the contract's JSON, the paper's method, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ESTIMATE = [sys.executable, "-m", "autotune.cli", "estimate"]
PAPER_CASE = ["--cluster", "a100-80g-8x8", "--tp", "8", "--pp", "8", "--global-batch-size", "1024"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ESTIMATE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_json_contract_and_no_torch() -> None:
    proc = run("--model", "llama-65b", *PAPER_CASE, "--micro-batch-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in (
        "config",
        "step_time_s",
        "tokens_per_s",
        "mfu",
        "bubble_fraction",
        "fits",
        "stages",
        "method",
    ):
        assert key in out
    assert out["method"] == "roofline" and out["config"]["world_size"] == 64
    assert 0 < out["mfu"] < 1 and 0 < out["bubble_fraction"] < 1
    assert [s["stage"] for s in out["stages"]] == list(range(8))
    first, last = out["stages"][0], out["stages"][-1]
    assert (
        first["peak_activation_bytes"] > 4 * last["peak_activation_bytes"]
    )  # 1F1B: stage 0 holds p micro-batches
    # The estimator is torch-free: it must run where torch is not importable.
    code = (
        "import sys; sys.modules['torch'] = None; from autotune.cli import main; "
        "main(['estimate', '--model', 'tiny-gpt', '--device', 'cpu'])"
    )
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_bpipe_frees_stage0_memory_and_paper_method_prints_beside_ours() -> None:
    base = json.loads(run("--model", "gpt3-65b", *PAPER_CASE, "--micro-batch-size", "4", "--json").stdout)
    args = ["--micro-batch-size", "4", "--schedule", "bpipe", "--method", "paper", "--json"]
    bpipe = json.loads(run("--model", "gpt3-65b", *PAPER_CASE, *args).stdout)
    assert bpipe["stages"][0]["peak_activation_bytes"] < base["stages"][0]["peak_activation_bytes"]
    assert bpipe["stages"][0]["evicted_bytes"] > 0
    paper = bpipe["paper"]
    assert paper["baseline"]["schedule"] == "1f1b" and paper["baseline"]["micro_batch_size"] <= 4
    assert paper["paper"]["predicted_speedup"] == pytest.approx(
        paper["paper"]["mfu_ratio"] * paper["paper"]["bubble_ratio"]
    )
    assert paper["ours"]["predicted_speedup"] > 0


def _profile(tmp_path: Path, **changes: object) -> Path:
    data = {
        "format": "autotune-profile", "version": 1, "created": "2026-11-27T00:00:00Z",
        "device": {"type": "cpu", "name": "test", "count": 2}, "dtype": "float32", "torch": "2.13.0",
        "model": {"name": "tiny-gpt", "family": "gpt", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
                  "num_kv_heads": 4, "seq_len": 32, "vocab_size": 256, "ffn_hidden_size": 256},
        "tp": 1, "comm": {"p2p_bandwidth": 2e9, "p2p_latency": 5e-5},
        "entries": [{"part": part, "micro_batch_size": 1, "flash_attention": True, "recompute": "none",
                     "threads": 1, "fwd_s": 0.001, "bwd_s": 0.002, "activation_bytes": 1000}
                    for part in ("layer", "embed", "head")],
    }  # fmt: skip
    data.update(changes)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def test_estimate_with_a_profile(tmp_path: Path) -> None:
    proc = run("--model", "tiny-gpt", "--pp", "2", "--profile", str(_profile(tmp_path)), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "profile"


@pytest.mark.parametrize(
    ("args", "flag", "words"),
    [
        (["--model", "tiny-gpt", "--cluster", "tpu-v9"], "--cluster", "tpu-v9"),
        (["--model", "gpt3-175b", "--cluster", "a100-80g-8x1", "--tp", "8", "--pp", "8"], "--cluster", "64"),
        (["--model", "tiny-gpt", "--method", "oracle"], "--method", "oracle"),
        (["--model", "tiny-gpt", "--method", "paper"], "--method", "bpipe"),
        (["--model", "tiny-gpt", "--profile", "PROFILE_OTHER_MODEL"], "--profile", "hidden_size"),
        (["--model", "tiny-gpt", "--profile", "PROFILE_CORRUPT"], "--profile", "JSON"),
        (["--model", "tiny-gpt", "--profile", "PROFILE_CUDA"], "--profile", "device"),
        (["--model", "tiny-gpt", "--profile", "nosuch.json"], "--profile", "nosuch.json"),
        (["--model", "tiny-gpt", "--pp", "5"], "--pp", "at most --num-layers (4) stages"),
        (["--model", "tiny-gpt", "--pp", "2", "--stage-layers", "1,2"], "--stage-layers", "1+2 = 3"),
        (["--model", "tiny-gpt", "--pp", "2", "--stage-layers", "2,x"], "--stage-layers", "comma-separated"),
        (["--model", "tiny-gpt", "--dtype", "int4"], "--dtype", "must be one of bf16, fp16, fp32"),
        (
            ["--model", "tiny-gpt", "--tp", "2", "--seq-len", "33", "--sequence-parallel"],
            "--sequence-parallel",
            "--tp must divide --seq-len (33 % 2 = 1)",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, args: list[str], flag: str, words: str) -> None:
    other = _profile(tmp_path)
    data = json.loads(other.read_text())
    data["model"]["hidden_size"] = 128
    (tmp_path / "other.json").write_text(json.dumps(data))
    (tmp_path / "corrupt.json").write_text('{"format": "autotune-profile", "version": 1, "entr')
    data["model"]["hidden_size"] = 64
    data["device"]["type"] = "cuda"
    (tmp_path / "cuda.json").write_text(json.dumps(data))
    subst = {
        "PROFILE_OTHER_MODEL": "other.json",
        "PROFILE_CORRUPT": "corrupt.json",
        "PROFILE_CUDA": "cuda.json",
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run(*[subst.get(a, a) for a in args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autotune: error: {flag}") and words in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before
