"""Percentiles and the summary every scenario's samples are reported as (p50, p95, n, mean, the samples)."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float], unit: str = "s") -> dict[str, object]:
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "n": len(values), "unit": unit,
            "mean": statistics.fmean(values), "samples": [round(v, 4) for v in values]}
