"""Bootstrap confidence intervals for means and for paired differences of per-item scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """``mean`` of the sample with its ``(lo, hi)`` percentile-bootstrap interval at ``level``."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def as_dict(self, digits: int = 4) -> dict:
        return {"mean": round(self.mean, digits), "lo": round(self.lo, digits), "hi": round(self.hi, digits),
                "n": self.n, "level": self.level}


def bootstrap_mean(values: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean (ValueError on an empty sample)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(1)
    a = (1 - level) / 2
    return Interval(float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), int(x.size), level)


def paired_difference(a: Sequence[float], b: Sequence[float], **kw) -> Interval:
    """Bootstrap interval of ``mean(a - b)`` resampling items (pairs stay together)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return bootstrap_mean([x - y for x, y in zip(a, b, strict=True)], **kw)
