"""The one selection policy shared by every router, and its calibration.

Modes (``coe.config.PolicyConfig``):

- ``max_quality``: the expert with the highest predicted quality;
- ``tradeoff``: argmax of quality − λ·cost;
- ``threshold``: the cheapest expert whose predicted quality is ≥ τ (the best one when none is).

Ties go to the cheaper expert, then to the earlier column. :func:`calibrate` picks λ or τ so
that, over a sample of queries, the average predicted cost or the share of calls to the most
expensive expert meets a target (as RouteLLM calibrates its threshold).

Uncertainty fallback (optional, on top of any mode): when the router reports how sure it is
(``Scores.uncertainty``) and the policy names a ``fallback_expert``, a query whose chosen
expert's predicted quality has a standard error above ``max_uncertainty`` goes to the fallback
expert instead (SambaNova's CoE falls back to a strong model when unsure).
:func:`calibrate_fallback` sets ``max_uncertainty`` so that a target share of queries falls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from coe.errors import ConfigError

Mode = Literal["max_quality", "tradeoff", "threshold"]


@dataclass(frozen=True)
class SelectionPolicy:
    mode: Mode = "max_quality"
    lam: float = 0.0
    tau: float = 0.5
    fallback_expert: str | None = None
    max_uncertainty: float | None = None

    @classmethod
    def from_config(cls, cfg) -> SelectionPolicy:
        return cls(mode=cfg.mode, lam=cfg.lam, tau=cfg.tau, fallback_expert=getattr(cfg, "fallback_expert", None),
                   max_uncertainty=getattr(cfg, "max_uncertainty", None))

    def select(self, quality: np.ndarray, cost: np.ndarray | None = None, *,
               uncertainty: np.ndarray | None = None, experts: list[str] | None = None) -> np.ndarray:
        """Column index chosen for each row of ``quality`` ``[B, M]``; ``cost`` is ``[M]`` or ``[B, M]``.

        With ``uncertainty`` ``[B, M]`` and ``experts`` (column names) given, and the policy's
        ``fallback_expert`` among them, rows whose chosen column's uncertainty exceeds
        ``max_uncertainty`` get the fallback column instead; otherwise both are ignored.
        """
        pick = self._select(quality, cost)
        if (uncertainty is None or experts is None or self.fallback_expert is None
                or self.max_uncertainty is None or self.fallback_expert not in experts):
            return pick
        u = np.asarray(uncertainty, dtype=np.float64)
        chosen_u = u[np.arange(len(pick)), pick]
        return np.where(chosen_u > self.max_uncertainty, experts.index(self.fallback_expert), pick)

    def _select(self, quality: np.ndarray, cost: np.ndarray | None) -> np.ndarray:
        quality = np.asarray(quality, dtype=np.float64)
        if quality.ndim != 2:
            raise ValueError(f"quality must be [B, M], got shape {quality.shape}")
        b, m = quality.shape
        if m == 0:
            raise ValueError("no experts to choose from")
        c = np.zeros((b, m)) if cost is None else np.broadcast_to(np.asarray(cost, dtype=np.float64), (b, m))
        # Tie-break toward the cheaper expert by a vanishing cost term.
        eps = 1e-9 * c / (np.abs(c).max() + 1e-30)
        if self.mode == "max_quality":
            return np.argmax(quality - eps, axis=1)
        if self.mode == "tradeoff":
            return np.argmax(quality - self.lam * c - eps, axis=1)
        if self.mode == "threshold":
            ok = quality >= self.tau
            cheapest_ok = np.argmin(np.where(ok, c, np.inf) + eps, axis=1)
            best = np.argmax(quality - eps, axis=1)
            return np.where(ok.any(axis=1), cheapest_ok, best)
        raise ConfigError(f"unknown policy mode {self.mode!r}; allowed: max_quality, tradeoff, threshold")


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
    return SelectionPolicy(policy.mode, policy.lam, policy.tau, fallback_expert=fallback_expert, max_uncertainty=thr)
