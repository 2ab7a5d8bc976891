"""Repeats, medians, spread and confidence intervals: how every benchmark summarises timings.

- :func:`interleaved` runs each variant once per round, rotating which goes first, so slow
  drift of the machine (other jobs, thermal, page cache) hits every variant alike.
- :func:`summary` gives the median, min, max, IQR and a bootstrap confidence interval of the
  median for one variant's samples.
- :func:`paired_ratio` summarises per-round ratios (variant A's time / variant B's time in the
  same round): the ratio's median and spread, which is what a "1.8x" claim needs.
- :func:`diff_ci` is a bootstrap CI of the difference of two medians (e.g. added TTFT).

Pure Python (no numpy), deterministic (seeded bootstrap).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bootstrap_ci(values: list[float], stat: Callable[[list[float]], float] = statistics.median,
                 conf: float = 0.95, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``conf`` interval of ``stat`` over ``values`` (nan, nan if < 2 values)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    k = len(values)
    stats = sorted(stat([values[rng.randrange(k)] for _ in range(k)]) for _ in range(n))
    return percentile(stats, 100 * (1 - conf) / 2), percentile(stats, 100 * (1 + conf) / 2)


def summary(values: list[float], conf: float = 0.95) -> dict:
    """``n``, ``median``, ``min``, ``max``, ``iqr`` and ``ci`` (bootstrap interval of the median)."""
    if not values:
        return {"n": 0}
    lo, hi = bootstrap_ci(values, conf=conf)
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "iqr": [percentile(values, 25), percentile(values, 75)],
        "ci": [lo, hi],
        "ci_level": conf,
    }


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Per-round ratios ``num[i] / den[i]`` (same round = same machine state), summarised."""
    if len(num) != len(den):
        raise ValueError(f"paired_ratio needs one pair per round, got {len(num)} and {len(den)} values")
    return summary([a / b for a, b in zip(num, den) if b])


def diff_ci(a: list[float], b: list[float], conf: float = 0.95, n: int = 2000, seed: int = 0) -> dict:
    """``median(a) - median(b)`` and a bootstrap ``conf`` interval of it (independent samples)."""
    if len(a) < 2 or len(b) < 2:
        return {"diff": float("nan"), "ci": [float("nan"), float("nan")], "ci_level": conf}
    rng = random.Random(seed)
    med = statistics.median
    diffs = sorted(
        med([a[rng.randrange(len(a))] for _ in a]) - med([b[rng.randrange(len(b))] for _ in b]) for _ in range(n)
    )
    return {"diff": med(a) - med(b), "ci": [percentile(diffs, 100 * (1 - conf) / 2),
                                            percentile(diffs, 100 * (1 + conf) / 2)], "ci_level": conf}


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1,
                sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                ) -> dict[str, list[float]]:
    """Wall seconds of every variant in every round, rounds interleaved, order rotated per round.

    ``warmup`` untimed rounds come first. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    the clock starts and before it stops. Returns ``{name: [seconds per round]}`` in round order,
    so index ``i`` of two variants ran in the same round (see :func:`paired_ratio`).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if sync:
                sync()
            t0 = clock()
            variants[name]()
            if sync:
                sync()
            times[name].append(clock() - t0)
    return times


def fmt(s: dict, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """``median [min–max]`` of a :func:`summary`, scaled (e.g. 1000 for ms)."""
    if not s.get("n"):
        return "n/a"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'] * scale)}{unit} [{f.format(s['min'] * scale)}–"
            f"{f.format(s['max'] * scale)}]")
