"""How often the BPipe verdict is right: the advisor against the uncorrected estimator and the
paper's MFU-based method, leave-one-out over a table of BPipe-vs-baseline pairs measured on
this machine.

The table (`benchmarks/data/advise_pairs.json`, kept in the repository) holds, per pair, the two
configurations, every measured run of each (tokens/s) and the estimator's predictions (from a
CPU profile of the model, as `autotune tune` makes them). `--remeasure` rebuilds it here: a
fresh profile per model, then `--reps` rounds of one real trial of each side, alternating their
order round by round (this machine's speed wanders), medians over the rounds.

For each pair, with the correction fitted on all the others (leave-one-out):
- advisor: the estimator's speedup times the correction, with its 80 % interval (the pair's own
  measurement is left out: this is a prediction); its verdict by the interval (pays off /
  does not pay off / uncertain) and its direction by the point value;
- estimator: the uncorrected predicted speedup's direction;
- paper: the paper's method (MFU ratio x bubble ratio, no transfers) for the BPipe side.
A direction is right when it agrees with the measured speedup; only pairs whose measured speedup
is more than 5 % from 1 are scored (closer ones are within this machine's noise).

    python -m benchmarks.bench_advise [--table PATH] [--remeasure [--reps N] [--resume]] [--quick]

Target: the advisor right on >= 90 % of the scored pairs, its 80 % interval covering the
measured speedup on 70-90 % of the pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from autotune.advise import correction as corr
from autotune.advise.advisor import verdict_of
from autotune.advise.reasons import exposed_fraction
from autotune.config import TrialConfig

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks" / "data" / "advise_pairs.json"
MARGIN = 0.05


def _features(pair: dict[str, Any]) -> np.ndarray:
    exposed = exposed_fraction(pair["predicted"]["bpipe"])
    return corr.features(pair["bpipe"], pair["baseline"], exposed_fraction=exposed, cross_node=False)


def _speedups(pair: dict[str, Any]) -> tuple[float, float]:
    measured = statistics.median(pair["bpipe_runs"]) / statistics.median(pair["baseline_runs"])
    predicted = pair["predicted"]["bpipe"]["tokens_per_s"] / pair["predicted"]["baseline"]["tokens_per_s"]
    return measured, predicted


def evaluate(pairs: list[dict[str, Any]], *, estimator_sd: float, noise_sd: float) -> dict[str, Any]:
    """Leave-one-out verdicts and interval coverage over `pairs` (the table's rows)."""
    rows = np.array([_features(p) for p in pairs])
    ys = np.array([math.log(m / pr) for m, pr in map(_speedups, pairs)])
    loo = corr.leave_one_out(rows, ys, estimator_sd, noise_sd)
    out: list[dict[str, Any]] = []
    for pair, (shift, spread) in zip(pairs, loo, strict=True):
        measured, predicted = _speedups(pair)
        mean = math.log(predicted) + shift
        low, high = corr.interval(mean, spread)
        out.append({
            "name": pair["name"], "measured": measured, "spread": _spread(pair), "estimator": predicted,
            "advisor": math.exp(mean), "interval": (low, high), "verdict": verdict_of(low, high),
            "paper": pair["predicted"].get("paper"), "covered": low <= measured <= high,
        })  # fmt: skip
    return {"rows": out}


def _spread(pair: dict[str, Any]) -> tuple[float, float]:
    """The measured speedup's range over the rounds (each round's BPipe over its baseline)."""
    ratios = [b / a for b, a in zip(pair["bpipe_runs"], pair["baseline_runs"], strict=False)]
    return min(ratios), max(ratios)


def report(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(f"{'pair':<34} {'measured':>8} {'spread':>13} {'estim.':>7} {'paper':>7} {'advisor':>8} "
          f"{'80% interval':>15}  verdict")  # fmt: skip
    for r in rows:
        lo, hi = r["interval"]
        paper = f"{r['paper']:.3f}" if r["paper"] else "  -  "
        spread = f"{r['spread'][0]:>6.3f}-{r['spread'][1]:<6.3f}"
        print(f"{r['name']:<34} {r['measured']:>8.3f} {spread} {r['estimator']:>7.3f} {paper:>7} "
              f"{r['advisor']:>8.3f} {lo:>7.3f}-{hi:<7.3f}  {r['verdict']}")  # fmt: skip
    scored = [r for r in rows if abs(r["measured"] - 1) > MARGIN]

    def right(key: str) -> str:
        usable = [r for r in scored if r[key] is not None]
        hits = sum((r[key] > 1) == (r["measured"] > 1) for r in usable)
        return f"{hits}/{len(usable)}" + (f" ({hits / len(usable):.0%})" if usable else "")

    verdicts = {
        v: sum(r["verdict"] == v for r in scored) for v in ("pays off", "does not pay off", "uncertain")
    }
    wrong = sum(
        (r["verdict"] == "pays off") != (r["measured"] > 1) for r in scored if r["verdict"] != "uncertain"
    )
    covered = sum(r["covered"] for r in rows)
    advisor_hits = sum((r["advisor"] > 1) == (r["measured"] > 1) for r in scored)
    print(f"scored pairs (measured speedup more than {MARGIN:.0%} from 1): {len(scored)} of {len(rows)}")
    methods = f"advisor {right('advisor')}, estimator {right('estimator')}, paper's method {right('paper')}"
    print(f"direction right: {methods}")
    counts = [f"{verdicts[v]} {v}" for v in ("pays off", "does not pay off", "uncertain")]
    print(f"advisor's interval verdicts on them: {', '.join(counts)}; {wrong} wrong")
    print(
        f"80% interval covers the measured speedup: {covered}/{len(rows)} ({covered / max(1, len(rows)):.0%})"
    )
    met = scored and advisor_hits / len(scored) >= 0.9 and 0.7 <= covered / len(rows) <= 0.9
    print(f"target (advisor right on >= 90%, coverage 70-90%): {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--remeasure", action="store_true", help="measure the pairs again on this machine")
    p.add_argument("--reps", type=int, default=3, help="with --remeasure: rounds of each pair")
    p.add_argument("--resume", action="store_true",
                   help="with --remeasure: continue the stopped measurement kept in --table")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="with --remeasure: two pairs, one round (a smoke test)"
    )
    a = p.parse_args(argv)
    if a.remeasure:
        from benchmarks.advise_pairs import measure

        def save(table: dict[str, Any]) -> None:
            a.table.parent.mkdir(parents=True, exist_ok=True)
            partial = a.table.with_suffix(".partial")
            partial.write_text(json.dumps(table, indent=1) + "\n")
            partial.replace(a.table)

        resume = json.loads(a.table.read_text()) if a.resume and a.table.exists() else None
        table = measure(reps=1 if a.quick else a.reps, quick=a.quick, save=None if a.quick else save,
                        resume=resume)  # fmt: skip
    else:
        table = json.loads(a.table.read_text())
    pairs = table["pairs"]
    for pair in pairs:  # the table's configurations must still be valid ones
        TrialConfig.from_dict(pair["bpipe"]), TrialConfig.from_dict(pair["baseline"])
    print(
        f"{len(pairs)} measured pairs from {table.get('machine', {}).get('cpu', 'this machine')}, "
        f"{statistics.median(len(p['bpipe_runs']) for p in pairs):.0f} rounds each"
    )
    logs = [math.log(_speedups(p)[0] / _speedups(p)[1]) for p in pairs]
    estimator_sd = statistics.pstdev(logs) if len(logs) > 2 else corr.TYPICAL_NORM2 / 30
    noise = corr.pooled_sd([p["bpipe_runs"] for p in pairs] + [p["baseline_runs"] for p in pairs], 0.1)
    floor = corr.pair_noise(noise, [(len(p["bpipe_runs"]), len(p["baseline_runs"])) for p in pairs])
    report(evaluate(pairs, estimator_sd=max(estimator_sd, 0.05), noise_sd=floor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
