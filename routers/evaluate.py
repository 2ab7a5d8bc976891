"""Offline evaluation of a fitted router on a test set: the λ sweep and the metrics.

For each λ of :func:`coe.routers.policy.lambda_sweep` the shared policy (``tradeoff``) picks an
expert per test query from the router's predicted quality and cost; the point is the *realised*
mean cost and mean quality of those picks on the test outcomes. AIQ, APGR and CPT come from
:mod:`coe.routers.metrics` over those points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from coe.routers.base import QueryBatch, Router
from coe.routers.metrics import Anchors, aiq, apgr, cpt, nondecreasing_hull
from coe.routers.policy import SelectionPolicy, lambda_sweep


@dataclass
class Reference:
    """What every router on this test set is compared with."""

    models: list[str]
    costs: np.ndarray          # [M] realised mean cost per single model
    qualities: np.ndarray      # [M]
    c_min: float
    c_max: float
    zero_router_aiq: float
    anchors: Anchors
    oracle_quality: float
    oracle_cost: float

    @classmethod
    def from_data(cls, data) -> Reference:
        costs, q = data.mean_costs(), data.quality.mean(axis=0)
        c_all = data.costs_or_ones()
        # oracle: the best outcome per query, the cheapest such model
        best = data.quality.max(axis=1, keepdims=True)
        cheapest = np.argmin(np.where(data.quality >= best, c_all, np.inf), axis=1)
        rows = np.arange(len(data))
        lo, hi = float(costs.min()), float(costs.max())
        return cls(
            models=list(data.models),
            costs=costs,
            qualities=q,
            c_min=lo,
            c_max=hi,
            zero_router_aiq=aiq(costs, q, lo, hi),
            anchors=Anchors.from_models(costs, q),
            oracle_quality=float(data.quality[rows, cheapest].mean()),
            oracle_cost=float(c_all[rows, cheapest].mean()),
        )


@dataclass
class RouterResult:
    name: str
    lams: list[float]
    costs: list[float]
    qualities: list[float]
    shares: dict[str, float]          # share of test queries per expert at λ = 0 (max quality)
    aiq: float
    apgr: float
    cpt50: float | None
    cpt80: float | None
    max_quality: float
    decisions_per_s: float
    params: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "aiq": self.aiq,
            "apgr": self.apgr,
            "cpt50": self.cpt50,
            "cpt80": self.cpt80,
            "max_quality": self.max_quality,
            "decisions_per_s": self.decisions_per_s,
            "shares": self.shares,
            "params": self.params,
            "curve": [{"lam": l, "cost": c, "quality": q} for l, c, q in zip(self.lams, self.costs, self.qualities)],
        }


def sweep_points(router: Router, data, embeddings, lams=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(λs, realised costs, realised qualities, picks at λ=0) of ``router`` on ``data``."""
    batch = QueryBatch(list(data.queries), embeddings, outcomes=data.quality if router.needs_labels else None)
    scores = router.score(batch)
    cost_pred = scores.cost if scores.cost is not None else np.ones(len(scores.experts))
    lams = lambda_sweep(data.mean_costs()) if lams is None else np.asarray(lams)
    c_all, rows = data.costs_or_ones(), np.arange(len(data))
    costs, quals, first = [], [], None
    for lam in lams:
        pick = SelectionPolicy("tradeoff", lam=float(lam)).select(scores.quality, cost_pred)
        if first is None:
            first = pick
        costs.append(float(c_all[rows, pick].mean()))
        quals.append(float(data.quality[rows, pick].mean()))
    return lams, np.asarray(costs), np.asarray(quals), first


def evaluate_router(router: Router, data, embeddings, ref: Reference, *, params: dict | None = None) -> RouterResult:
    """Sweep λ on ``data`` (the test set, columns in ``router.experts`` order) and compute the metrics."""
    lams, costs, quals, first = sweep_points(router, data, embeddings)
    speed = decisions_per_second(router, data, embeddings)
    counts = np.bincount(first, minlength=len(router.experts)) / max(len(data), 1)
    return RouterResult(
        name=router.name,
        lams=[float(x) for x in lams],
        costs=[float(x) for x in costs],
        qualities=[float(x) for x in quals],
        shares={e: float(s) for e, s in zip(router.experts, counts)},
        aiq=aiq(costs, quals, ref.c_min, ref.c_max),
        apgr=apgr(costs, quals, ref.anchors),
        cpt50=cpt(costs, quals, ref.anchors, 0.5),
        cpt80=cpt(costs, quals, ref.anchors, 0.8),
        max_quality=float(quals.max()),
        decisions_per_s=speed,
        params=params or {},
    )


def decisions_per_second(router: Router, data, embeddings, *, min_time: float = 0.2) -> float:
    """Batched routing decisions per second of the router's own work (score + policy; embeddings given)."""
    batch = QueryBatch(list(data.queries), embeddings, outcomes=data.quality if router.needs_labels else None)
    policy = SelectionPolicy("tradeoff", lam=0.0)
    done, start = 0, time.perf_counter()
    while True:
        s = router.score(batch)
        policy.select(s.quality, s.cost)
        done += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return done / elapsed


def zero_router_hull(ref: Reference) -> np.ndarray:
    return nondecreasing_hull(ref.costs, ref.qualities)
