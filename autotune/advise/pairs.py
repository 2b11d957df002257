"""BPipe-vs-baseline pairs, derived from the trials in the store (every study, every campaign).

A configuration measured more than once (reruns, other studies on the same hardware) is one
`Side` with all its measurements. On one hardware fingerprint, for one model and global batch:

- a *layout pair* is the fastest measured BPipe configuration and the fastest measured baseline
  (any schedule but BPipe, any micro-batch size and recomputation) at the same tp x pp x dp;
- where every baseline measured at that layout ran out of memory and a BPipe configuration ran,
  the pair has no baseline: BPipe made the layout possible (evidence, with no finite speedup);
- the *headline pair* is the best BPipe configuration anywhere against the best baseline
  anywhere.

Torch-free; takes the store's frozen records, so tests build pairs from constructed ones.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from autotune.config import BASELINES

Group = tuple[str, str, int]  # (hardware fingerprint, model name, global batch size)


@dataclass(frozen=True)
class Side:
    """One configuration on one fingerprint, with every finished measurement of it."""

    config: dict[str, Any]
    config_hash: str
    fingerprint: str
    trial_ids: tuple[int, ...]  # the ok trials, oldest first
    values: tuple[float, ...]  # their tokens/s
    oom_ids: tuple[int, ...]  # trials that ran out of memory
    predicted: dict[str, Any] | None  # the estimate the trials were started with
    studies: tuple[str, ...]
    finished: float  # the latest measurement's time (POSIX seconds), to order pairs by
    runs: tuple[tuple[str, float], ...] = ()  # (study, tokens/s) of each ok trial

    @property
    def measured(self) -> bool:
        return bool(self.values)

    @property
    def tokens_per_s(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def predicted_tokens_per_s(self) -> float | None:
        value = (self.predicted or {}).get("tokens_per_s")
        return float(value) if value else None

    @property
    def trial_id(self) -> int | None:
        """The trial that stands for the side: the latest ok one."""
        return self.trial_ids[-1] if self.trial_ids else None

    @property
    def bpipe(self) -> bool:
        return self.config["schedule"] == "bpipe"

    @property
    def layout(self) -> tuple[int, int, int]:
        return int(self.config["tp"]), int(self.config["pp"]), int(self.config["dp"])

    @property
    def group(self) -> Group:
        return self.fingerprint, str(self.config["model"]), int(self.config["global_batch_size"])


@dataclass(frozen=True)
class Pair:
    """A BPipe side and its baseline (None: every baseline at the layout ran out of memory)."""

    bpipe: Side
    baseline: Side | None
    oom_baselines: tuple[Side, ...] = ()
    headline: bool = False

    @property
    def measured_speedup(self) -> float | None:
        """BPipe's tokens/s over the baseline's; None where the baseline never ran."""
        if self.baseline is None or not self.bpipe.measured or not self.baseline.measured:
            return None
        return self.bpipe.tokens_per_s / self.baseline.tokens_per_s  # type: ignore[operator]

    @property
    def predicted_speedup(self) -> float | None:
        """The estimator's (uncorrected) speedup, from the predictions the trials started with."""
        if self.baseline is None:
            return None
        b, a = self.bpipe.predicted_tokens_per_s, self.baseline.predicted_tokens_per_s
        return b / a if b and a else None

    @property
    def finished(self) -> float:
        return max(self.bpipe.finished, self.baseline.finished if self.baseline else 0.0)

    def to_dict(self) -> dict[str, Any]:
        def side(s: Side | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {"trial_ids": list(s.trial_ids), "tokens_per_s": s.tokens_per_s, "values": list(s.values),
                    "predicted_tokens_per_s": s.predicted_tokens_per_s, "config": s.config}  # fmt: skip

        studies = sorted({*self.bpipe.studies, *(self.baseline.studies if self.baseline else ())})
        return {
            "layout": "tp{} pp{} dp{}".format(*self.bpipe.layout),
            "headline": self.headline,
            "studies": studies,
            "bpipe": side(self.bpipe),
            "baseline": side(self.baseline),
            "baseline_out_of_memory": [i for s in self.oom_baselines for i in s.oom_ids],
            "measured_speedup": self.measured_speedup,
            "predicted_speedup": self.predicted_speedup,
        }


def sides(trials: Iterable[Any]) -> list[Side]:
    """Every finished configuration in `trials` (TrialRecords), one Side per (fingerprint, config):
    ok trials' throughput, out-of-memory trials counted; interrupted, failed and timed-out ones,
    which say nothing about speed, are left out."""
    grouped: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for t in trials:
        if t.status in ("ok", "oom") and t.error != "interrupted":
            grouped[(t.fingerprint, t.config_hash)].append(t)
    out = []
    for (fingerprint, chash), rows in grouped.items():
        rows.sort(key=lambda t: (t.finished_at.timestamp() if t.finished_at else 0.0, t.id))
        ok = [t for t in rows if t.status == "ok" and t.tokens_per_s]
        predicted = next((t.predicted for t in reversed(rows) if t.predicted), None)
        out.append(Side(
            config=rows[-1].config, config_hash=chash, fingerprint=fingerprint,
            trial_ids=tuple(t.id for t in ok), values=tuple(float(t.tokens_per_s) for t in ok),
            oom_ids=tuple(t.id for t in rows if t.status == "oom"), predicted=predicted,
            studies=tuple(sorted({t.study for t in rows})),
            runs=tuple((t.study, float(t.tokens_per_s)) for t in ok),
            finished=max(t.finished_at.timestamp() if t.finished_at else 0.0 for t in rows),
        ))  # fmt: skip
    return sorted(out, key=lambda s: (s.group, s.layout, s.config_hash))


def _fastest(candidates: Sequence[Side]) -> Side | None:
    ok = [s for s in candidates if s.measured]
    return max(ok, key=lambda s: (s.tokens_per_s, -s.finished), default=None)


def layout_pairs(all_sides: Iterable[Side]) -> list[Pair]:
    """The layout pairs of every (fingerprint, model, global batch), by layout; the headline
    pair of each group marked (or added, where it spans two layouts)."""
    by_group: dict[Group, list[Side]] = defaultdict(list)
    for s in all_sides:
        by_group[s.group].append(s)
    pairs: list[Pair] = []
    for group in sorted(by_group):
        members = by_group[group]
        best_b = _fastest([s for s in members if s.bpipe])
        best_a = _fastest([s for s in members if s.config["schedule"] in BASELINES])
        layouts: dict[tuple[int, int, int], list[Side]] = defaultdict(list)
        for s in members:
            layouts[s.layout].append(s)
        found = []
        for layout in sorted(layouts):
            here = layouts[layout]
            bpipe = _fastest([s for s in here if s.bpipe])
            if bpipe is None:
                continue
            bases = [s for s in here if s.config["schedule"] in BASELINES]
            baseline = _fastest(bases)
            ooms = tuple(s for s in bases if s.oom_ids and not s.measured)
            if baseline is None and not ooms:
                continue
            headline = bpipe is best_b and baseline is best_a
            found.append(Pair(bpipe, baseline, ooms if baseline is None else (), headline=headline))
        if best_b is not None and best_a is not None and not any(p.headline for p in found):
            found.append(Pair(best_b, best_a, headline=True))  # the two best sit at different layouts
        pairs += found
    return pairs
