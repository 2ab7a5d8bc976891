"""The router the service calls: fitted or description-based scores + the shared policy.

Two sources of scores, combined per query:

- **fitted** (``router.fitted``, a folder from ``coe router fit``): predicted quality on the 0..1
  outcome scale for the experts it was fitted on;
- **centroid** over each registered expert's ``description`` + ``examples``: cosine similarity.

How the scales meet: with a fitted router, an expert it has never seen (e.g. registered at
runtime) scores ``best_fitted_quality(query) + (cos(query, expert) − new_expert_similarity)``:
it wins a query exactly when the query is closer to its description than
``router.new_expert_similarity``, and otherwise ranks below the fitted experts by how far it
falls short. A query less similar than ``router.min_profile_similarity`` to every profiled one
(``Router.coverage``) gets no local evidence: under ``router.outside_profile: profile_mean`` (the
default) each fitted expert scores its mean outcome over the fitted data (the expert best on
average wins; unseen experts as above, against the best of those means); under
``descriptions`` every expert is scored as without a fitted router. Without a fitted router all
experts are scored by raw cosine similarity; when the
best similarity is below ``router.unsure_similarity`` (or the query is empty), the query goes
to ``router.default_expert``. Costs are the experts' configured ``cost`` (one scale for all).

``router.params`` are honoured: with ``router.name: centroid`` they configure the description
router; with ``router.fitted`` the fitted router keeps the params it was fitted with, and
``router.params`` that contradict them are refused at start-up (refit instead). Concurrent
requests share embedding batches through :mod:`coe.routers.microbatch`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from coe.errors import ConfigError, ExpertNotFoundError, available


@dataclass
class RoutingDecision:
    expert: str                      # chosen expert id
    scores: dict[str, float]         # predicted quality per expert id (what the policy saw)
    router: str                      # router name
    costs: dict[str, float] | None = None
    cached: bool = False             # the query's embedding came from a cache (no model work)
    uncertainty: dict[str, float] = field(default_factory=dict)   # standard error of ``scores``, where known
    # why ``expert``: "policy" (the policy's pick on the scores), "unsure" (the default expert: the
    # query is unlike every expert, or empty), "uncertain" (the policy's fallback_expert)
    reason: Literal["policy", "unsure", "uncertain"] = "policy"


@dataclass
class _ExpertInfo:
    id: str
    cost: float
    has_texts: bool


class OnlineRouter:
    """Thread-safe. Routes queries to expert ids using a fitted or description-based router
    plus the shared selection policy from the config.

    ``route`` may run in many threads while ``add_expert``/``remove_expert`` change the expert
    set; each ``route`` call sees one consistent snapshot.
    """

    def __init__(self, cfg, experts: list, fitted=None, embedder=None) -> None:
        from coe.routers.builtin.centroid import CentroidRouter
        from coe.routers.embedding import get_embedder
        from coe.routers.policy import SelectionPolicy

        self.cfg = cfg
        self.fitted = fitted
        self.name = fitted.name if fitted is not None else "centroid"
        self.policy = SelectionPolicy.from_config(cfg.policy)
        self.embedder = embedder if embedder is not None else get_embedder(cfg.embedder, threads=cfg.embedder_threads)
        self._centroid = CentroidRouter(cfg.params if cfg.name == CentroidRouter.name else None)
        self._lock = threading.RLock()
        self._experts: dict[str, _ExpertInfo] = {}
        for e in experts:
            self.add_expert(e)

    # -- expert set -------------------------------------------------------------------------
    def add_expert(self, expert) -> None:
        """Register (or replace) an expert: embeds its description + examples for the centroid scores."""
        from coe.routers.builtin.centroid import expert_texts

        texts = expert_texts(expert.description, list(expert.examples))
        emb = self.embedder.encode(texts) if texts else None
        with self._lock:
            if emb is not None:
                self._centroid.set_expert(expert.id, emb, cost=float(expert.cost))
            else:
                self._centroid.remove_expert(expert.id)
            self._experts[expert.id] = _ExpertInfo(expert.id, float(expert.cost), emb is not None)

    def remove_expert(self, expert_id: str) -> None:
        """Stop routing to ``expert_id``; :class:`ExpertNotFoundError` when it is not registered."""
        with self._lock:
            if expert_id not in self._experts:
                raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(self._experts)}")
            del self._experts[expert_id]
            self._centroid.remove_expert(expert_id)

    def replace_fitted(self, fitted) -> None:
        """Serve ``fitted`` from now on: the fitted router refitted on more outcome data (a runtime
        profile, ``coe.routers.profile_data``), with the same embedder. Requests in flight finish
        with the router they started with."""
        with self._lock:
            self.fitted = fitted

    def experts(self) -> list[str]:
        with self._lock:
            return list(self._experts)

    @property
    def params(self) -> dict:
        """The parameters of the router in use: the fitted router's, else the centroid's (``router.params``)."""
        used = self.fitted if self.fitted is not None else self._centroid
        return used.params.model_dump()

    # -- routing ----------------------------------------------------------------------------
    def route(self, queries: list[str]) -> list[RoutingDecision]:
        """One decision per query, in order; the non-empty queries are embedded once, together."""
        from coe.routers.base import QueryBatch

        with self._lock:
            infos = list(self._experts.values())
        if not infos:
            raise ExpertNotFoundError("no experts are registered; nothing to route to")
        ids = [i.id for i in infos]
        costs = np.array([i.cost for i in infos])
        default = self.cfg.default_expert if self.cfg.default_expert in ids else None
        live = [k for k, q in enumerate(queries) if q and q.strip()]
        decisions: list[RoutingDecision | None] = [None] * len(queries)
        if live:
            emb, cached = self.embedder.encode_tracked([queries[k] for k in live])   # [B, D], [B]
            batch = QueryBatch([queries[k] for k in live], emb)
            quality, unsure, spread = self._quality(batch, ids, infos)   # [B, E], [B], [B, E]
            plain = self.policy.select(quality, costs)
            picks = self.policy.select(quality, costs, uncertainty=spread, experts=ids)
            for row, k in enumerate(live):
                choice, reason = ids[picks[row]], "policy" if picks[row] == plain[row] else "uncertain"
                if (unsure[row] or not np.isfinite(quality[row, picks[row]])) and default is not None:
                    choice, reason = default, "unsure"
                decisions[k] = self._decision(choice, ids, quality[row], costs, cached=bool(cached[row]),
                                              spread=spread[row], reason=reason)
        for k, d in enumerate(decisions):
            if d is None:   # empty query
                decisions[k] = self._decision(default or ids[0], ids, np.full(len(ids), np.nan), costs,
                                              reason="unsure")
        return decisions  # type: ignore[return-value]

    def _quality(self, batch, ids: list[str], infos: list[_ExpertInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(quality [B, E], unsure [B], uncertainty [B, E]: the fitted router's standard errors,
        nan where it gives none, so the policy's low-confidence fallback only sees real ones)."""
        b, e = len(batch), len(ids)
        quality = np.full((b, e), -np.inf)
        cent = self._centroid.score(batch)
        cos = np.full((b, e), -np.inf)
        for j, eid in enumerate(cent.experts):
            if eid in ids:
                cos[:, ids.index(eid)] = cent.quality[:, j]
        spread = np.full((b, e), np.nan)
        fitted = self.fitted   # one router for the whole batch, even while replace_fitted runs
        if fitted is None:
            best = cos.max(axis=1)
            return cos, best < self.cfg.unsure_similarity, spread
        fit = fitted.score(batch)
        known = [ids.index(x) for x in fit.experts if x in ids]
        cols = [j for j, x in enumerate(fit.experts) if x in ids]
        if known:
            quality[:, known] = fit.quality[:, cols]
            if fit.uncertainty is not None:
                spread[:, known] = fit.uncertainty[:, cols]
            best_known = quality[:, known].max(axis=1, keepdims=True)      # [B, 1]
        else:
            best_known = np.zeros((b, 1))
        unseen = [j for j, x in enumerate(ids) if x not in fit.experts]
        if unseen:
            quality[:, unseen] = best_known + (cos[:, unseen] - self.cfg.new_expert_similarity)
        unsure = ~np.isfinite(quality).any(axis=1)
        floor = self.cfg.min_profile_similarity
        coverage = fitted.coverage(batch) if floor is not None else None   # [B] | None
        if coverage is not None:
            outside = coverage < floor          # the profiles say nothing about these queries
            spread[outside] = np.nan
            mean = fitted.mean_quality() if self.cfg.outside_profile == "profile_mean" else None
            if mean is not None and known:
                row = np.full(e, -np.inf)
                row[known] = np.asarray(mean)[cols]
                quality[outside] = row
                if unseen:
                    quality[np.ix_(outside, unseen)] = row[known].max() + (
                        cos[np.ix_(outside, unseen)] - self.cfg.new_expert_similarity)
                unsure[outside] = False
            else:
                quality[outside] = cos[outside]
                unsure[outside] = cos[outside].max(axis=1) < self.cfg.unsure_similarity
        return quality, unsure, spread

    def _decision(self, choice: str, ids: list[str], row: np.ndarray, costs: np.ndarray, *,
                  cached: bool = False, spread: np.ndarray | None = None, reason: str = "policy") -> RoutingDecision:
        scores = {eid: float(v) for eid, v in zip(ids, row) if np.isfinite(v)}
        spread = np.full(len(ids), np.nan) if spread is None else spread
        return RoutingDecision(
            expert=choice, scores=scores, router=self.name, costs={eid: float(c) for eid, c in zip(ids, costs)},
            cached=cached, uncertainty={eid: float(v) for eid, v in zip(ids, spread) if np.isfinite(v)},
            reason=reason,
        )


def build_online_router(cfg, experts: list, *, embedder=None) -> OnlineRouter:
    """The service's router for ``cfg`` (a ``coe.config.RouterConfig``) over ``experts``.

    Loads ``cfg.fitted`` when set (a path the config loader made absolute;
    ``coe.config.resolve_relative_paths``); otherwise ``cfg.name`` must be a
    router that needs no outcome data (``centroid``). Raises :class:`ConfigError` otherwise, and
    when ``cfg.name`` or ``cfg.params`` are invalid (:func:`coe.routers.check_router_config`) or
    contradict the params the fitted router was fitted with.
    """
    from coe.routers.base import check_router_config, load_router, router_class

    check_router_config(cfg)
    fitted = None
    if cfg.fitted:
        folder = Path(cfg.fitted)
        fitted, meta = load_router(folder)
        if fitted.needs_labels:
            raise ConfigError(f"router.fitted {folder}: the {fitted.name!r} router needs true outcomes; it cannot serve")
        if meta.get("embedder") and meta["embedder"] != cfg.embedder:
            raise ConfigError(
                f"router.fitted {folder} was fitted with embedder {meta['embedder']!r} but router.embedder is "
                f"{cfg.embedder!r}; use the same embedder"
            )
        _check_fitted_params(cfg, fitted, folder)
    else:
        cls = router_class(cfg.name)
        if cls.needs_outcomes:
            raise ConfigError(
                f"router {cfg.name!r} needs outcome data: set router.fitted to a folder from `coe router fit`, "
                f"or use router.name: centroid"
            )
    return OnlineRouter(cfg, experts, fitted=fitted, embedder=embedder)


def _check_fitted_params(cfg, fitted, folder: Path) -> None:
    """``router.params`` given next to ``router.fitted`` must match what the router was fitted with."""
    if not cfg.params:
        return
    if cfg.name != fitted.name:
        raise ConfigError(
            f"router.fitted {folder} holds a {fitted.name!r} router but router.name is {cfg.name!r}; "
            f"router.params apply to router.name: set router.name: {fitted.name} or refit"
        )
    wanted = type(fitted).validate_params(cfg.params).model_dump(include=set(cfg.params))
    have = fitted.params.model_dump(include=set(cfg.params))
    if wanted != have:
        raise ConfigError(
            f"router.params {wanted} differ from the params router.fitted {folder} was fitted with {have}; "
            f"refit with `coe router fit`, or remove them from router.params"
        )
