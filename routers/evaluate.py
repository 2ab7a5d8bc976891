"""Offline evaluation of a fitted router on a test set: the λ sweep and the metrics.

For each λ of :func:`coe.routers.policy.lambda_sweep` the shared policy (``tradeoff``) picks an
expert per test query from the router's predicted quality and cost; the point is the *realised*
mean cost and mean quality of those picks on the test outcomes. AIQ, APGR and CPT come from
:mod:`coe.routers.metrics` over those points.

:func:`paired_bootstrap` resamples the test queries (the same resample for every router and the
zero router) to give 95% confidence intervals on AIQ *differences*, so no router is declared
better than a baseline on noise. :func:`calibration` gives the Brier score and reliability curve
of a router's predicted qualities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from coe.routers.base import QueryBatch, Router
from coe.routers.metrics import Anchors, aiq, apgr, cpt, nondecreasing_hull
from coe.routers.policy import SelectionPolicy, calibrate_fallback, lambda_sweep


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
    picks: np.ndarray | None = None     # [L, N] column picked per λ and test query (for the bootstrap)
    calibration: dict | None = None

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
            "calibration": self.calibration,
            "curve": [{"lam": l, "cost": c, "quality": q} for l, c, q in zip(self.lams, self.costs, self.qualities)],
        }


@dataclass
class Fallback:
    """Uncertainty fallback in the sweep: at each λ, ``share`` of the calibration queries (scored
    in ``calib``, the training queries) fall back to ``expert``; the threshold found there applies."""

    expert: str
    share: float
    calib: object       # Scores of the router on the calibration queries


def sweep_picks(router: Router, data, embeddings, lams=None, *, fallback: Fallback | None = None):
    """(λs ``[L]``, picks ``[L, N]``): the expert column the shared policy picks per λ and query."""
    batch = QueryBatch(list(data.queries), embeddings, outcomes=data.quality if router.needs_labels else None)
    scores = router.score(batch)
    cost_pred = scores.cost if scores.cost is not None else np.ones(len(scores.experts))
    lams = lambda_sweep(data.mean_costs()) if lams is None else np.asarray(lams)
    picks = []
    for lam in lams:
        policy = SelectionPolicy("tradeoff", lam=float(lam))
        if fallback is not None:
            cal = fallback.calib
            policy = calibrate_fallback(policy, cal.quality, cost_pred, cal.uncertainty, scores.experts,
                                        fallback_expert=fallback.expert, target_share=fallback.share)
        picks.append(policy.select(scores.quality, cost_pred, uncertainty=scores.uncertainty, experts=scores.experts))
    return lams, np.asarray(picks)


def sweep_points(router: Router, data, embeddings, lams=None, *, fallback: Fallback | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(λs, realised costs, realised qualities, picks at λ=0) of ``router`` on ``data``."""
    lams, picks = sweep_picks(router, data, embeddings, lams, fallback=fallback)
    c_all, rows = data.costs_or_ones(), np.arange(len(data))
    costs = c_all[rows[None, :], picks].mean(axis=1)
    quals = data.quality[rows[None, :], picks].mean(axis=1)
    return lams, costs, quals, picks[0]


def evaluate_router(router: Router, data, embeddings, ref: Reference, *, params: dict | None = None,
                    fallback: Fallback | None = None, name: str | None = None) -> RouterResult:
    """Sweep λ on ``data`` (the test set, columns in ``router.experts`` order) and compute the metrics."""
    lams, picks = sweep_picks(router, data, embeddings, fallback=fallback)
    c_all, rows = data.costs_or_ones(), np.arange(len(data))
    costs = c_all[rows[None, :], picks].mean(axis=1)
    quals = data.quality[rows[None, :], picks].mean(axis=1)
    first = picks[0]
    speed = decisions_per_second(router, data, embeddings)
    counts = np.bincount(first, minlength=len(router.experts)) / max(len(data), 1)
    return RouterResult(
        name=name or router.name,
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
        picks=picks,
        calibration=calibration(router.score(QueryBatch(list(data.queries), embeddings,
                                outcomes=data.quality if router.needs_labels else None)).quality, data.quality),
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


def calibration(pred: np.ndarray, outcomes: np.ndarray, bins: int = 10) -> dict:
    """Brier score and reliability curve of predicted qualities against outcomes, over all
    (query, expert) cells, on the 0..1 scale (outcomes outside 0..1, e.g. 1–10 scores, are
    rescaled by their range, and the score is then a mean squared error, ``binary`` false)."""
    y = np.asarray(outcomes, dtype=np.float64).ravel()
    p = np.asarray(pred, dtype=np.float64).ravel()
    lo, hi = float(y.min()), float(y.max())
    binary = bool(np.isin(y, (0.0, 1.0)).all())
    if lo < 0 or hi > 1:
        span = hi - lo if hi > lo else 1.0
        y, p = (y - lo) / span, (p - lo) / span
    p = np.clip(np.where(np.isfinite(p), p, 0.0), 0, 1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    curve = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            curve.append({"bin": [float(edges[b]), float(edges[b + 1])], "predicted": float(p[sel].mean()),
                          "observed": float(y[sel].mean()), "count": int(sel.sum())})
    return {"brier": float(np.mean((p - y) ** 2)), "binary": binary, "reliability": curve}


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot + 1, n]`` resampling weights of ``n`` test queries (row 0: the observed set, all
    ones), each row divided by ``n``: ``counts @ values`` is a replicate's mean."""
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])   # [B, N]
    return np.vstack([np.ones(n, dtype=np.int64), counts]) / n      # row 0: the observed test set


def bootstrap_aiqs(picks: dict[str, np.ndarray], data, *, n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """AIQ ``[n_boot + 1]`` per router on each paired bootstrap replicate of ``data`` (row 0: observed).

    ``picks``: router name → ``[L, N]`` columns (of ``data``) picked over the λ sweep, or a
    ``(cost, quality)`` pair of ``[L, N]`` realised values (a recruit policy's several experts). Every
    replicate resamples the N test queries once for all routers; the cost range is that of the
    replicate's single models (all columns of ``data``), the same for every router. ``"zero"``
    holds the zero router's AIQ (the single models' hull).
    """
    c_all, q_all = data.costs_or_ones(), np.asarray(data.quality, dtype=np.float64)
    n = len(data)
    counts = bootstrap_counts(n, n_boot, seed)
    single_c, single_q = counts @ c_all, counts @ q_all                # [B+1, M]
    rows = np.arange(n)[None, :]
    # identical λ rows give identical points (the hull ignores repeats): keep each once
    picks = {name: p if isinstance(p, tuple) else np.unique(np.asarray(p), axis=0) for name, p in picks.items()}
    # a policy that uses several experts per query (coe.routers.recruit) gives its realised
    # (cost, quality) per λ and query, each [L, N], instead of picks
    realised = {name: p if isinstance(p, tuple) else (c_all[rows, p], q_all[rows, p]) for name, p in picks.items()}
    curves = {name: (counts @ c.T, counts @ q.T) for name, (c, q) in realised.items()}  # [B+1, L]
    aiqs: dict[str, np.ndarray] = {"zero": np.empty(n_boot + 1)}
    for name in picks:
        aiqs[name] = np.empty(n_boot + 1)
    for b in range(n_boot + 1):
        lo, hi = float(single_c[b].min()), float(single_c[b].max())
        aiqs["zero"][b] = aiq(single_c[b], single_q[b], lo, hi)
        for name, (cc, qq) in curves.items():
            aiqs[name][b] = aiq(cc[b], qq[b], lo, hi)
    return aiqs


def paired_bootstrap(picks: dict[str, np.ndarray], data, baselines: list[str], *, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, dict]:
    """95% paired-bootstrap CIs of AIQ differences on ``data`` (the test set).

    ``picks``: router name → ``[L, N]`` columns picked over the λ sweep. Each replicate resamples
    the N test queries with replacement, once for all routers; AIQ is recomputed on it for every
    router and for the zero router (the single models' hull, with the replicate's cost range)
    (:func:`bootstrap_aiqs`).
    Returns, per router, ``{"vs_zero": {...}, "vs_<baseline>": {...}}`` for each name in
    ``baselines`` (router names in ``picks``), each ``{"diff", "lo", "hi", "includes_zero",
    "halfwidth", "se"}``: the observed difference, the 2.5/97.5 percentiles of the replicated
    differences, half the CI's width and the replicates' standard deviation (for :func:`power`).
    """
    aiqs = bootstrap_aiqs(picks, data, n_boot=n_boot, seed=seed)

    def interval(a: np.ndarray, z: np.ndarray) -> dict:
        d = a - z
        lo, hi = np.percentile(d[1:], [2.5, 97.5])
        return {"diff": float(d[0]), "lo": float(lo), "hi": float(hi), "includes_zero": bool(lo <= 0 <= hi),
                "halfwidth": float((hi - lo) / 2), "se": float(np.std(d[1:]))}

    out = {}
    for name in picks:
        res = {"vs_zero": interval(aiqs[name], aiqs["zero"])}
        for base in baselines:
            if base != name and base in aiqs:
                res[f"vs_{base}"] = interval(aiqs[name], aiqs[base])
        out[name] = res
    return out


Z95, Z80 = 1.959964, 0.841621     # two-sided 95% CI; 80% power


def power(ci: dict, n: int, target: float) -> dict:
    """What a test set of ``n`` queries can show about an AIQ difference, from its bootstrap CI.

    ``ci`` is one entry of :func:`paired_bootstrap`. ``mde_50`` (≈ the CI half-width) is the
    smallest true difference whose 95% CI excludes zero half the time; ``mde_80`` (2.80 SE) the
    one that does so 80% of the time. ``detectable`` says whether ``target`` reaches ``mde_80``
    (``None`` when the difference has no spread: the routers pick alike), and ``rows_for_target`` how many test queries would make ``mde_80`` equal ``target``
    (SE shrinks as 1/√n). A normal approximation: read it as a size, not a p-value.
    """
    se = ci["se"]
    mde80 = (Z95 + Z80) * se
    # se == 0: the two routers pick alike on every replicate, so the data say nothing about a gain
    need = int(np.ceil(n * (mde80 / target) ** 2)) if target > 0 and se > 0 else None
    return {"target": target, "rows": n, "halfwidth": ci["halfwidth"], "se": se, "mde_50": ci["halfwidth"],
            "mde_80": float(mde80), "detectable": bool(mde80 <= target) if se > 0 else None, "rows_for_target": need}
