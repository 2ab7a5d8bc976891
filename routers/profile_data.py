"""A fitted router's outcome data plus measured runtime profiles, and the refit on both.

The service's fitted router (``router.fitted``) was fitted on a data file its ``router.json``
names (``data``). :class:`ProfiledData` reads it once and, given the stored profile outcomes
(:class:`coe.profile_records.ProfileOutcome`), builds the data the router is refitted on:

- rows: the fitted data's queries, then every profiled query not among them;
- columns: the fitted experts, then each live profiled expert (in order of its first outcome);
- cells: the measured outcome where there is one. A cell nobody measured (an expert profiled
  on a budget of the probes, or a fitted expert a foreign probe's measurement failed for) is
  filled (:func:`impute_missing`: what the other experts' outcomes on that row predict for this
  expert, from a ridge fit on its measured rows, plus its own deviation from that prediction on
  its ``IMPUTE_K`` nearest measured rows) and marked unobserved in ``RoutingData.observed``:
  routers that fit on the mask (``irt``) ignore it; the others see a value that says no more than
  the expert's own measurements and the other experts' outcomes on the same row do. An expert
  with no measured row gets no column (it stays routed by description).

The refit keeps the fitted router's class and chooses its params by the offline selection rule
(:func:`select_params`): K-fold cross-validation over the router's ``cv_grid`` on the refit data
(:func:`coe.routers.tuning.cross_validate`, the CV ``coe eval`` uses), best mean held-out AIQ,
within a time budget; over budget, the fitted router's own params are kept. With no outcome at
all the fitted router itself is returned unchanged. Thread-safe after construction (the refit
runs in a worker thread; it is CPU-bound and must stay off the event loop).
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np

from coe.errors import ConfigError

IMPUTE_K = 10


def fitted_folder(cfg, base_dir: Path | None) -> Path | None:
    """The folder ``router.fitted`` names (relative to ``base_dir``), or None."""
    if not cfg.fitted:
        return None
    folder = Path(cfg.fitted)
    return folder if folder.is_absolute() or base_dir is None else Path(base_dir) / folder


def data_path(folder: Path, meta: dict) -> Path:
    """The data file a fitted router records (``data`` in router.json): absolute, or relative to
    the folder or one of its parents (the repository or the installed package); ConfigError
    when it is not found."""
    rel = meta.get("data")
    if not rel:
        raise ConfigError(f"fitted router {folder} does not record its data file (router.json 'data'); refit it "
                          "with `coe router fit`")
    path = Path(rel)
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [p / path for p in [folder, *list(folder.resolve().parents)[:4]]]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"the data file {rel} of fitted router {folder} is not found (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)})")


class ProfiledData:
    """The fitted router's data (see the module docstring). ``embed``: texts -> unit-norm ``[n, D]``
    (the service router's embedder). Raises ConfigError when the folder or its data is unusable."""

    def __init__(self, folder: Path, embed) -> None:
        from coe.routers.base import load_router
        from coe.routers.datasets import load_routing_data, shared_prefix

        self.folder = folder
        self.router, self.meta = load_router(folder)
        self.path = data_path(folder, self.meta)
        self.base = load_routing_data(self.path, "native")
        if list(self.base.models) != list(self.router.experts):
            raise ConfigError(f"{self.path} has experts {self.base.models}, but fitted router {folder} was fitted "
                              f"on {self.router.experts}: refit it")
        self.embed = embed
        self.prefix = shared_prefix(self.base.queries)
        self._base_emb: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def experts(self) -> list[str]:
        return list(self.base.models)

    def queries(self) -> set[str]:
        return set(self.base.queries)

    def _embed(self, queries: list[str]) -> np.ndarray:
        from coe.routers.datasets import routing_texts

        return np.asarray(self.embed(routing_texts(queries, self.prefix)), dtype=np.float32)

    def base_embeddings(self) -> np.ndarray:
        with self._lock:
            if self._base_emb is None:
                self._base_emb = self._embed(list(self.base.queries))
            return self._base_emb

    def with_outcomes(self, outcomes: list, live: set[str]):
        """``(RoutingData, embeddings [N, D])``: the fitted data plus ``outcomes`` of experts in
        ``live`` (fitted experts always count)."""
        from coe.routers.datasets import RoutingData

        base = self.base
        experts = list(base.models)
        for o in outcomes:
            if o.expert not in experts and o.expert in live:
                experts.append(o.expert)
        queries = list(base.queries)
        row_of = {q: i for i, q in enumerate(queries)}
        categories = list(base.categories or [""] * len(queries))
        for o in outcomes:
            if o.expert in experts and o.query not in row_of:
                row_of[o.query] = len(queries)
                queries.append(o.query)
                categories.append(o.category or "")
        n, m, m0 = len(queries), len(experts), len(base.models)
        quality = np.full((n, m), np.nan)
        cost = np.full((n, m), np.nan)
        quality[: len(base), :m0] = base.quality
        cost[: len(base), :m0] = base.costs_or_ones()
        for o in outcomes:   # later outcomes replace earlier ones (a re-profile)
            if o.expert in experts:
                quality[row_of[o.query], experts.index(o.expert)] = o.outcome
                cost[row_of[o.query], experts.index(o.expert)] = o.cost
        observed = np.isfinite(quality)
        keep = observed.any(axis=0)
        keep[:m0] = True
        experts = [e for e, k in zip(experts, keep) if k]
        quality, cost, observed = quality[:, keep], cost[:, keep], observed[:, keep]
        emb = self.base_embeddings()
        if n > len(base):
            emb = np.vstack([emb, self._embed(queries[len(base):])])
        impute_missing(quality, cost, observed, emb)
        data = RoutingData(queries=queries, models=experts, quality=quality, cost=cost, source=f"{self.path} + profiles",
                           categories=categories if any(categories) else None,
                           observed=None if observed.all() else observed)
        return data, emb

    def refit(self, outcomes: list, live: set[str], ctx=None, *, budget_s: float = 0.0):
        """The fitted router refitted on :meth:`with_outcomes` (same class; params by
        :func:`select_params` within ``budget_s`` seconds, 0: the fitted params); the fitted router
        itself when no outcome applies. ``notes["profiled"]["refit"]`` says how the params were
        chosen (:class:`coe.profile_records.RefitReport` fields)."""
        from coe.routers.base import create_router

        data, emb = self.with_outcomes(outcomes, live)
        if list(data.models) == list(self.base.models) and len(data) == len(self.base):
            return self.router
        params, report = select_params(self.router.name, self.router.params.model_dump(), data, emb, ctx,
                                       budget_s=budget_s)
        router = create_router(self.router.name, params).fit(data, emb, ctx)
        router.notes = {**self.router.notes, "profiled": {"rows": len(data), "experts": list(data.models),
                                                          "imputed_cells": int((~data.observed).sum())
                                                          if data.observed is not None else 0,
                                                          "refit": {**report, "params": router.params.model_dump()}}}
        return router


def select_params(name: str, params: dict, data, emb: np.ndarray, ctx=None, *, budget_s: float, folds: int = 5,
                  seed: int = 0) -> tuple[dict, dict]:
    """``(params, report)``: the combination of router ``name``'s ``cv_grid`` (over ``params``) with the
    best mean held-out AIQ in ``folds``-fold CV on ``data`` (:func:`coe.routers.tuning.cross_validate`),
    or ``params`` unchanged when the whole grid is not scored within ``budget_s`` seconds (checked
    between combinations, so one combination may overrun it), when ``budget_s`` is 0, or when
    ``data`` has too few rows for the folds. ``report``: selected_by (cv | kept), cv_aiq, scored,
    grid, seconds, note. Blocking and CPU-bound."""
    from coe.routers.base import router_class
    from coe.routers.tuning import cross_validate

    cls = router_class(name)
    grid = {} if cls.needs_labels else dict(cls.cv_grid or {})
    keys = sorted(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    report = {"selected_by": "kept", "cv_aiq": None, "scored": 0, "grid": len(combos), "seconds": 0.0, "note": None}
    if budget_s <= 0 or not combos:
        report["note"] = "serving.refit_budget_s is 0" if combos else f"router {name} has no grid to cross-validate"
        return params, report
    if len(data) < 2 * folds:
        report["note"] = f"{len(data)} rows are too few for {folds}-fold cross-validation"
        return params, report
    t0, table = time.monotonic(), []
    for combo in combos:
        if time.monotonic() - t0 > budget_s:
            report.update(seconds=round(time.monotonic() - t0, 3), scored=len(table),
                          note=f"over serving.refit_budget_s ({budget_s:g} s) after {len(table)} of {len(combos)} "
                               "combinations: the fitted params are kept")
            return params, report
        res = cross_validate(name, data, emb, grid={k: [v] for k, v in combo.items()}, base_params=params,
                             folds=folds, seed=seed, ctx=ctx)
        table.append((res.params, res.score))
    best = max(range(len(table)), key=lambda i: table[i][1] if np.isfinite(table[i][1]) else -np.inf)
    report.update(selected_by="cv", cv_aiq=float(table[best][1]), scored=len(table),
                  seconds=round(time.monotonic() - t0, 3))
    return table[best][0], report


def impute_missing(quality: np.ndarray, cost: np.ndarray, observed: np.ndarray, emb: np.ndarray) -> None:
    """Fill unobserved cells in place. Per expert ``j``: a baseline from the other experts'
    outcomes on the same row (:func:`peer_baseline`: ``j``'s measured rows regressed on the experts
    measured wherever ``j`` is, the ridge strength by leave-one-out, the plain mean among the
    choices), plus ``j``'s own deviation from it, the cosine-weighted mean over its ``IMPUTE_K``
    nearest measured rows; clipped to the measured range. With no such peer it is the kNN mean of
    ``j``'s measured outcomes. Cost: ``j``'s mean measured cost."""
    if not observed.any():
        return
    lo, hi = float(np.min(quality[observed])), float(np.max(quality[observed]))
    for j in range(quality.shape[1]):
        seen = np.flatnonzero(observed[:, j])
        miss = np.flatnonzero(~observed[:, j])
        if len(miss) == 0 or len(seen) == 0:
            continue
        base = peer_baseline(quality, observed, j)   # reads measured cells only, never filled ones
        resid = quality[seen, j] - base[seen]
        sims = emb[miss] @ emb[seen].T                                   # [miss, seen]
        k = min(IMPUTE_K, len(seen))
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]               # [miss, k]
        w = np.clip(np.take_along_axis(sims, top, axis=1), 0, None) + 1e-6
        quality[miss, j] = np.clip(base[miss] + (w * resid[top]).sum(axis=1) / w.sum(axis=1), lo, hi)
        cost[miss, j] = cost[seen, j].mean()


RIDGE_ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MIN_PEER_ROWS = 8


def peer_baseline(quality: np.ndarray, measured: np.ndarray, j: int) -> np.ndarray:
    """Expert ``j``'s predicted outcome on every row from the other experts' outcomes on it: ridge
    regression over ``j``'s measured rows, on the experts measured on all of them (standardized),
    with the strength of least leave-one-out error among :data:`RIDGE_ALPHAS` and the plain mean
    (no peer at all). Rows where a peer is unmeasured, and every row with fewer than
    :data:`MIN_PEER_ROWS` measured or no peer, get the mean."""
    seen = np.flatnonzero(measured[:, j])
    y = quality[seen, j]
    base = np.full(len(quality), y.mean())
    peers = [c for c in range(quality.shape[1]) if c != j and measured[seen, c].all()]
    n = len(seen)
    if n < MIN_PEER_ROWS or not peers:
        return base
    peers = [c for c in peers if quality[seen, c].std() > 1e-9]   # a constant column tells nothing
    if not peers:
        return base
    x = quality[np.ix_(seen, peers)]
    mu, sd = x.mean(axis=0), x.std(axis=0)
    xs = (x - mu) / sd
    yc = y - y.mean()
    u, sv, vt = np.linalg.svd(xs, full_matrices=False)
    uy = u.T @ yc
    best_err, best_alpha = float(np.sum((yc * n / (n - 1)) ** 2)), None    # the mean's own leave-one-out error
    for alpha in RIDGE_ALPHAS:
        shrink = sv ** 2 / (sv ** 2 + alpha * n)
        fit = u @ (shrink * uy)
        lev = (u ** 2) @ shrink + 1.0 / n
        err = float(np.sum(((yc - fit) / np.clip(1.0 - lev, 1e-6, None)) ** 2))
        if err < best_err:
            best_err, best_alpha = err, alpha
    if best_alpha is None:
        return base
    coef = vt.T @ (sv / (sv ** 2 + best_alpha * n) * uy)   # the ridge solution, from the same SVD
    rows = np.flatnonzero(measured[:, peers].all(axis=1))
    base[rows] = y.mean() + ((quality[np.ix_(rows, peers)] - mu) / sd) @ coef
    return base
