"""Small statistics the benchmarks share."""

from __future__ import annotations


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (1.0 for fewer than two items)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    n = len(a)
    if n < 2:
        return 1.0
    ra, rb = ranks(a), ranks(b)
    return 1.0 - 6.0 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))
