"""The one selection policy shared by every router, and its calibration.

Modes (``coe.config.PolicyConfig``):

- ``max_quality``: the expert with the highest predicted quality;
- ``tradeoff``: argmax of quality − λ·cost;
- ``threshold``: the cheapest expert whose predicted quality is ≥ τ (the best one when none is).

Ties go to the cheaper expert, then to the earlier column. :func:`calibrate` picks λ or τ so
that, over a sample of queries, the average predicted cost or the share of calls to the most
expensive expert meets a target (as RouteLLM calibrates its threshold).

Load (optional, on top of any mode): with ``load_weight`` μ > 0 each expert's predicted quality
is lowered by μ × its expected delay in seconds before the mode applies (``tradeoff`` becomes
argmax of quality − λ·cost − μ·delay): the delay is the wait for a slot at the ingress's
admission queue plus, for a pooled expert that is not resident, its measured swap-in time. An
expert whose server is down is never chosen while any other is up. :meth:`SelectionPolicy.plan`
ranks every expert of one query this way and returns the :class:`Plan` the service follows
(its first healthy candidate serves; the rest are the fallbacks, in order).

Uncertainty fallback (optional, on top of any mode): when the router reports how sure it is
(``Scores.uncertainty``) and the policy names a ``fallback_expert``, a query whose chosen
expert's predicted quality has a standard error above ``max_uncertainty`` goes to the fallback
expert instead (SambaNova's CoE falls back to a strong model when unsure).
:func:`calibrate_fallback` sets ``max_uncertainty`` so that a target share of queries falls back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from coe.errors import ConfigError

Mode = Literal["max_quality", "tradeoff", "threshold"]


@dataclass(frozen=True)
class ExpertLoad:
    """The live state of one expert that the policy weighs, as the ingress sees it now."""

    healthy: bool = True             # its server is up and it loaded (not held down, not unavailable)
    queue_depth: int = 0             # requests waiting for a slot of it or of its server, ahead of a new one
    running: int = 0                 # its requests holding a slot now
    expected_wait_s: float = 0.0     # expected wait for a slot (admission queue and measured service time)
    resident: bool | None = True     # pooled expert: on the device now (None: the pool has not said yet)
    swap_s: float | None = None      # pooled and not resident: measured swap-in time (None: resident or unknown)

    @property
    def delay_s(self) -> float:
        """What μ weighs: the expected wait for a slot plus the swap-in time, in seconds."""
        return self.expected_wait_s + (self.swap_s or 0.0)


@dataclass(frozen=True)
class Candidate:
    """One expert of a :class:`Plan`: what the router predicts and what the ingress sees now.
    ``quality``/``uncertainty`` are None where the router gives none."""

    expert: str
    quality: float | None
    uncertainty: float | None
    cost: float
    queue_depth: int
    running: int
    expected_wait_ms: float
    resident: bool | None
    swap_ms: float | None
    healthy: bool


@dataclass(frozen=True)
class Plan:
    """The routing decision of one query: every candidate expert, best first (the healthy ones
    before the others). The first healthy candidate serves; the rest are its fallbacks, in order."""

    candidates: tuple[Candidate, ...]

    @property
    def expert(self) -> str:
        """The expert that serves: the first candidate (healthy when any is)."""
        return self.candidates[0].expert

    def ranked(self, exclude=(), usable=None) -> list[str]:
        """The healthy candidates' ids in plan order without ``exclude``; ``usable(expert_id)``, when
        given, re-checks health now (it may have changed since the plan was made)."""
        return [c.expert for c in self.candidates if c.healthy and c.expert not in exclude
                and (usable is None or usable(c.expert))]


@dataclass(frozen=True)
class SelectionPolicy:
    mode: Mode = "max_quality"
    lam: float = 0.0
    tau: float = 0.5
    fallback_expert: str | None = None
    max_uncertainty: float | None = None
    load_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> SelectionPolicy:
        return cls(mode=cfg.mode, lam=cfg.lam, tau=cfg.tau, fallback_expert=getattr(cfg, "fallback_expert", None),
                   max_uncertainty=getattr(cfg, "max_uncertainty", None),
                   load_weight=getattr(cfg, "load_weight", 0.0))

    def select(self, quality: np.ndarray, cost: np.ndarray | None = None, *,
               uncertainty: np.ndarray | None = None, experts: list[str] | None = None,
               delay: np.ndarray | None = None, healthy: np.ndarray | None = None) -> np.ndarray:
        """Column index chosen for each row of ``quality`` ``[B, M]``; ``cost`` is ``[M]`` or ``[B, M]``.

        ``delay`` (seconds, ``[M]`` or ``[B, M]``) and ``healthy`` (bool, same shapes) as for
        :meth:`rank`. With ``uncertainty`` ``[B, M]`` and ``experts`` (column names) given, and the
        policy's ``fallback_expert`` among them (and healthy), rows whose chosen column's
        uncertainty exceeds ``max_uncertainty`` get the fallback column instead; otherwise both are
        ignored.
        """
        pick = self.rank(quality, cost, delay=delay, healthy=healthy)[:, 0]
        if (uncertainty is None or experts is None or self.fallback_expert is None
                or self.max_uncertainty is None or self.fallback_expert not in experts):
            return pick
        fb = experts.index(self.fallback_expert)
        u = np.asarray(uncertainty, dtype=np.float64)
        chosen_u = u[np.arange(len(pick)), pick]
        go = chosen_u > self.max_uncertainty
        if healthy is not None:
            go &= np.broadcast_to(np.asarray(healthy, dtype=bool), u.shape)[:, fb]
        return np.where(go, fb, pick)

    def rank(self, quality: np.ndarray, cost: np.ndarray | None = None, *,
             delay: np.ndarray | None = None, healthy: np.ndarray | None = None) -> np.ndarray:
        """Column indices of each row of ``quality`` ``[B, M]``, best first (``[B, M]``): the order
        of the policy's mode, the first being its choice. ``delay``: each expert's expected delay in
        seconds, weighed by ``load_weight``; ``healthy``: False columns go last, whatever their
        score. Ties go to the cheaper expert, then to the earlier column; NaN quality ranks last.
        Raises ValueError for a bad shape or no columns."""
        quality = np.asarray(quality, dtype=np.float64)
        if quality.ndim != 2:
            raise ValueError(f"quality must be [B, M], got shape {quality.shape}")
        b, m = quality.shape
        if m == 0:
            raise ValueError("no experts to choose from")
        c = np.zeros((b, m)) if cost is None else np.broadcast_to(np.asarray(cost, dtype=np.float64), (b, m))
        q = np.where(np.isnan(quality), -np.inf, quality)
        if delay is not None and self.load_weight > 0:
            q = q - self.load_weight * np.broadcast_to(np.asarray(delay, dtype=np.float64), (b, m))
        # Tie-break toward the cheaper expert by a vanishing cost term.
        eps = 1e-9 * c / (np.abs(c).max() + 1e-30)
        if self.mode == "max_quality":
            keys = [-(q - eps)]
        elif self.mode == "tradeoff":
            keys = [-(q - self.lam * c - eps)]
        elif self.mode == "threshold":
            ok = q >= self.tau          # the cheapest that reaches τ; the best when none does
            keys = [np.where(ok, c + eps, -(q - eps)), ~ok]
        else:
            raise ConfigError(f"unknown policy mode {self.mode!r}; allowed: max_quality, tradeoff, threshold")
        if healthy is not None:
            keys.append(~np.broadcast_to(np.asarray(healthy, dtype=bool), (b, m)))
        return np.lexsort(keys, axis=-1)   # stable: exact ties keep column order  # [B, M]

    def plan(self, experts: Sequence[str], quality: Mapping[str, float], cost: Mapping[str, float], *,
             uncertainty: Mapping[str, float] | None = None, load: Mapping[str, ExpertLoad] | None = None,
             head: str | None = None) -> Plan:
        """The :class:`Plan` of one query over ``experts`` (in this order on ties): predicted
        ``quality`` and ``uncertainty`` per expert (missing: none), ``cost`` per expert, live
        ``load`` per expert (missing: idle and healthy). ``head``: an expert the router chose for
        a reason outside the scores (the default expert for a query unlike every expert, the
        fallback expert for an uncertain one), placed first while it is healthy, whatever the
        load. Raises ValueError when ``experts`` is empty."""
        load = load or {}
        idle = ExpertLoad()
        live = [load.get(e, idle) for e in experts]
        q = np.array([[_number(quality.get(e)) for e in experts]])             # [1, M]
        u = np.array([[_number((uncertainty or {}).get(e)) for e in experts]])  # [1, M]
        c = np.array([float(cost.get(e, 0.0)) for e in experts])
        healthy = np.array([x.healthy for x in live])
        delay = np.array([x.delay_s for x in live])
        order = list(self.rank(q, c, delay=delay, healthy=healthy)[0])
        first = int(self.select(q, c, uncertainty=u, experts=list(experts), delay=delay, healthy=healthy)[0])
        if head in experts and load.get(head, idle).healthy:
            first = list(experts).index(head)
        order.remove(first)
        order.insert(0, first)
        return Plan(tuple(_candidate(experts[j], q[0, j], u[0, j], c[j], live[j]) for j in order))


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _candidate(expert: str, quality: float, uncertainty: float, cost: float, load: ExpertLoad) -> Candidate:
    return Candidate(expert=expert, quality=_finite(quality), uncertainty=_finite(uncertainty), cost=float(cost),
                     queue_depth=load.queue_depth, running=load.running,
                     expected_wait_ms=load.expected_wait_s * 1000.0, resident=load.resident,
                     swap_ms=None if load.swap_s is None else load.swap_s * 1000.0, healthy=load.healthy)


def lambda_sweep(costs: np.ndarray, n: int = 60) -> np.ndarray:
    """λ values from 0 (max quality) to large enough that the cheapest expert always wins.

    λ is scaled by the most expensive expert's cost, so the same sweep suits USD and unit costs.
    """
    top = float(np.nanmax(costs)) if np.size(costs) else 1.0
    top = top if top > 0 else 1.0
    return np.concatenate([[0.0], np.geomspace(1e-3, 1e3, n - 1)]) / top


def calibrate(
    quality: np.ndarray,
    cost: np.ndarray,
    *,
    mode: Literal["tradeoff", "threshold"] = "tradeoff",
    target_cost: float | None = None,
    target_top_share: float | None = None,
    iters: int = 60,
) -> SelectionPolicy:
    """A policy whose λ (``tradeoff``) or τ (``threshold``) meets one target on these queries.

    ``target_cost``: average predicted cost per query at most this; ``target_top_share``: share of
    calls to the most expensive expert at most this (0..1). Bisection on a monotone knob: a
    larger λ never raises cost, a larger τ never lowers it. Returns the least restrictive policy that meets the target; raises
    :class:`ConfigError` when it cannot be met even by the cheapest choice.
    """
    if (target_cost is None) == (target_top_share is None):
        raise ConfigError("calibrate needs exactly one of target_cost or target_top_share")
    quality = np.asarray(quality, dtype=np.float64)
    b, m = quality.shape
    c = np.broadcast_to(np.asarray(cost, dtype=np.float64), (b, m))
    top = int(np.argmax(c.mean(axis=0)))

    def measure(policy: SelectionPolicy) -> float:
        pick = policy.select(quality, c)
        if target_cost is not None:
            return float(c[np.arange(b), pick].mean())
        return float((pick == top).mean())

    target = target_cost if target_cost is not None else target_top_share
    make = (lambda v: SelectionPolicy("tradeoff", lam=v)) if mode == "tradeoff" else (
        lambda v: SelectionPolicy("threshold", tau=v)
    )
    if mode == "tradeoff":
        lo, hi = 0.0, 1e6 / max(float(c.max()), 1e-30)
    elif mode == "threshold":
        # τ above every prediction sends each query to its best expert (most expensive behaviour
        # of threshold); τ at the minimum sends everything to the cheapest expert.
        lo, hi = float(quality.max()) + 1.0, float(quality.min())
    else:
        raise ConfigError(f"calibrate mode {mode!r}; allowed: tradeoff, threshold")
    if measure(make(lo)) <= target + 1e-12:
        return make(lo)
    if measure(make(hi)) > target + 1e-12:
        raise ConfigError(f"target {target} cannot be met: even the cheapest choices give {measure(make(hi)):.6g}")
    for _ in range(iters):
        mid = (lo + hi) / 2 if mode == "threshold" else np.sqrt(max(lo, 1e-12 * hi) * hi)
        if measure(make(mid)) <= target + 1e-12:
            hi = mid
        else:
            lo = mid
    return make(hi)


def calibrate_fallback(
    policy: SelectionPolicy,
    quality: np.ndarray,
    cost: np.ndarray | None,
    uncertainty: np.ndarray,
    experts: list[str],
    *,
    fallback_expert: str,
    target_share: float,
) -> SelectionPolicy:
    """``policy`` with ``fallback_expert`` and the ``max_uncertainty`` that sends at most
    ``target_share`` (0..1) of these queries to it, because their chosen expert is too uncertain.

    Like λ/τ it is calibrated on predicted scores only (no outcomes): the threshold is the
    ``1 − target_share`` quantile of the chosen experts' uncertainties. Raises
    :class:`ConfigError` for an unknown expert or a share outside [0, 1].
    """
    if fallback_expert not in experts:
        raise ConfigError(f"fallback expert {fallback_expert!r} is not one of the router's experts: {', '.join(experts)}")
    if not 0 <= target_share <= 1:
        raise ConfigError(f"target fallback share must be between 0 and 1, got {target_share}")
    pick = policy.select(quality, cost)
    u = np.asarray(uncertainty, dtype=np.float64)[np.arange(len(pick)), pick]
    if target_share <= 0 or len(u) == 0:
        thr = float("inf") if len(u) == 0 else float(u.max())
    else:
        # the largest threshold whose exceedance share is <= target: a quantile of the sorted values
        srt = np.sort(u)
        k = int(np.floor(target_share * len(u)))          # queries allowed to fall back
        thr = float(srt[len(u) - k - 1]) if k < len(u) else float(srt[0]) - 1.0
    return replace(policy, fallback_expert=fallback_expert, max_uncertainty=thr)
