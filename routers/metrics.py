"""Cost–quality metrics of RouterBench and RouteLLM.

- :func:`nondecreasing_hull`: the upper convex hull of (cost, quality) points, keeping only
  points that improve quality as cost grows (any point on it is reachable by mixing two
  router settings at random).
- :func:`aiq`: RouterBench's Average Improvement in Quality: the area under that hull between
  ``c_min`` and ``c_max`` divided by ``c_max − c_min``. Beyond the hull's last point the
  quality stays flat; left of its first point it is also held flat (every cost-aware router
  reaches the cheapest expert at large λ, so this only matters for single-point baselines).
  The *zero router* is the same hull over the single models' points; the range is the single
  models' cost range for every router, so their AIQs compare.
- :func:`apgr` / :func:`cpt`: RouteLLM's metrics, generalised from two models to many: the
  *weak* model is the cheapest, the *strong* one the best single model; the x axis is
  ``(cost − c_weak) / (c_strong − c_weak)`` (for two models with fixed costs: the share of
  calls to the strong model) and PGR = ``(q − q_weak) / (q_strong − q_weak)``. APGR is the area
  under PGR over x in [0, 1]; CPT(p) is the smallest x at which PGR reaches p (``None`` if never).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def nondecreasing_hull(cost, quality) -> np.ndarray:
    """Vertices ``[K, 2]`` of the non-decreasing upper convex hull, sorted by cost."""
    c, q = np.asarray(cost, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    if c.size == 0:
        raise ValueError("no points")
    order = np.lexsort((-q, c))
    frontier: list[tuple[float, float]] = []
    for ci, qi in zip(c[order], q[order]):
        if not frontier or qi > frontier[-1][1] + 1e-15:
            if frontier and ci == frontier[-1][0]:
                frontier[-1] = (ci, qi)
            else:
                frontier.append((ci, qi))
    hull: list[tuple[float, float]] = []
    for p in frontier:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the chord from hull[-2] to p
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return np.asarray(hull)


def hull_value(hull: np.ndarray, x) -> np.ndarray:
    """Quality of the hull at cost(s) ``x`` (held flat outside its range)."""
    return np.interp(np.asarray(x, dtype=np.float64), hull[:, 0], hull[:, 1])


def _area(hull: np.ndarray, lo: float, hi: float) -> float:
    """Exact integral of the piecewise-linear hull over [lo, hi]."""
    xs = np.unique(np.concatenate([[lo, hi], hull[:, 0][(hull[:, 0] > lo) & (hull[:, 0] < hi)]]))
    ys = hull_value(hull, xs)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def aiq(cost, quality, c_min: float, c_max: float) -> float:
    """Area under the non-decreasing hull of the points over [c_min, c_max], divided by the range."""
    hull = nondecreasing_hull(cost, quality)
    if c_max <= c_min:
        return float(hull_value(hull, c_min))
    return _area(hull, c_min, c_max) / (c_max - c_min)


@dataclass(frozen=True)
class Anchors:
    """Weak (cheapest) and strong (best single) model points that normalise APGR/CPT."""

    c_weak: float
    q_weak: float
    c_strong: float
    q_strong: float

    @classmethod
    def from_models(cls, costs, qualities) -> Anchors:
        c, q = np.asarray(costs, dtype=np.float64), np.asarray(qualities, dtype=np.float64)
        weak = int(np.lexsort((-q, c))[0])            # cheapest, best among equally cheap
        strong = int(np.lexsort((c, -q))[0])          # best, cheapest among equally good
        return cls(float(c[weak]), float(q[weak]), float(c[strong]), float(q[strong]))

    def x(self, cost) -> np.ndarray:
        span = self.c_strong - self.c_weak
        return (np.asarray(cost, dtype=np.float64) - self.c_weak) / (span if span > 0 else 1.0)

    def pgr(self, quality) -> np.ndarray:
        gap = self.q_strong - self.q_weak
        return (np.asarray(quality, dtype=np.float64) - self.q_weak) / (gap if gap > 0 else 1.0)


def apgr(cost, quality, anchors: Anchors) -> float:
    """Area under PGR(x) of the non-decreasing hull for x in [0, 1]."""
    hull = nondecreasing_hull(anchors.x(cost), anchors.pgr(quality))
    return _area(hull, 0.0, 1.0)


def cpt(cost, quality, anchors: Anchors, target: float) -> float | None:
    """Smallest normalised cost x at which the hull's PGR reaches ``target`` (None if never)."""
    hull = nondecreasing_hull(anchors.x(cost), anchors.pgr(quality))
    xs, ys = hull[:, 0], hull[:, 1]
    if ys[0] >= target:
        return float(max(xs[0], 0.0)) if xs[0] > 0 else 0.0
    for i in range(1, len(xs)):
        if ys[i] >= target:
            # linear interpolation within the segment that crosses the target
            t = (target - ys[i - 1]) / (ys[i] - ys[i - 1])
            return float(xs[i - 1] + t * (xs[i] - xs[i - 1]))
    return None
