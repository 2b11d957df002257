"""The advice as text: the verdict first, then the two configurations, the reasons, the evidence."""

from __future__ import annotations

from typing import Any

from autotune.advise.advisor import Advice, Choice


def _describe(config: dict[str, Any]) -> str:
    from autotune.tuner.campaign import describe

    return f"{describe(config)} m={config['num_microbatches']}"


def _choice(label: str, c: Choice) -> str:
    if c.measured:
        runs = f" over {len(c.runs)} run(s), {min(c.runs):,.0f}-{max(c.runs):,.0f}" if len(c.runs) > 1 else ""
        how = f"measured {c.tokens_per_s:,.0f} tokens/s{runs} (trial {c.trial_id})"
    else:
        how = f"predicted {c.predicted_tokens_per_s or 0:,.0f} tokens/s, not measured"
    return f"  {label:<9} {_describe(c.config)}\n            {how}"


def format_advice(advice: Advice) -> str:
    a = advice
    lo, hi = a.interval
    measured = f", measured {a.measured_speedup:.3f}x" if a.measured_speedup is not None else ""
    if len(a.measured_by_study) > 1:
        each = ", ".join(f"{v:.3f}" for v in a.measured_by_study.values())
        measured += f" (per campaign: {each})"
    lines = [
        f"BPipe {a.verdict.upper()} for {a.target}: {a.predicted_speedup:.3f}x "
        f"(80% interval {lo:.3f}-{hi:.3f}; estimator {a.estimator_speedup:.3f}x{measured}), "
        f"from {a.basis}",
        _choice("BPipe", a.best_bpipe),
        _choice("baseline", a.best_baseline),
    ]
    if a.paper and a.paper.get("predicted_speedup") is not None:
        paper, b0 = a.paper, a.paper["baseline"]["micro_batch_size"]
        b1, rec = paper["bpipe"]["micro_batch_size"], paper["bpipe"]["recompute"]
        lines.append(
            f"  paper's method: {paper['predicted_speedup']:.3f}x (MFU ratio {paper['mfu_ratio']:.3f} x "
            f"bubble ratio {paper['bubble_ratio']:.3f}: BPipe at micro-batch {b1}, recompute {rec}, against "
            f"1F1B at micro-batch {b0})"
        )
    elif a.paper:
        lines.append(f"  paper's method: {a.paper.get('reason')}")
    if a.reasons:
        lines.append("reasons:")
        lines += [f"  {r['name']:<10} {r['text']}" for r in a.reasons]
    if a.error:
        e = a.error
        lines.append(
            f"correction: learned from {a.learned_from} measured pair(s); leave-one-out over {e['pairs']}: "
            f"advisor {e['advisor']:.1%}, estimator {e['estimator']:.1%} mean error, "
            f"80% interval covers {e['coverage']:.0%}"
        )
    else:
        lines.append(
            "correction: no measured pair in the store yet; the interval is the estimator's own error"
        )
    if a.evidence:
        lines.append(
            f"evidence ({a.measured_pairs} measured pair(s) for this target, {len(a.evidence)} in all):"
        )
        for p in a.evidence[:8]:
            speed = (
                f"{p['measured_speedup']:.3f}x measured"
                if p["measured_speedup"]
                else "baseline out of memory"
            )
            pred = f", {p['predicted_speedup']:.3f}x predicted" if p["predicted_speedup"] else ""
            head = " (headline)" if p["headline"] else ""
            lines.append(f"  {p['layout']}{head}: {speed}{pred}; studies {', '.join(p['studies'])}")
    if a.measure_next:
        lines.append(
            f"measure next: {'; '.join(_describe(c) for c in a.measure_next['configs'])} "
            f"({a.measure_next['why']})"
        )
    lines += [f"note: {n}" for n in a.notes]
    return "\n".join(lines)
