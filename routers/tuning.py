"""Hyperparameters by K-fold cross-validation on the training split only.

For every combination of a router's ``cv_grid`` (or a given grid) the router is fitted on K−1
folds and its AIQ is measured on the held-out fold (λ sweep, the fold's own single-model cost
range); the combination with the best mean AIQ wins. The test split is never seen here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from coe.routers.base import FitContext, create_router, router_class


@dataclass
class CVResult:
    params: dict
    score: float                           # mean held-out AIQ of the chosen params
    table: list[tuple[dict, float]]        # every combination tried, with its mean AIQ
    folds: int
    fold_scores: list[float] | None = None  # the chosen params' held-out AIQ per fold


def kfold(n: int, folds: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::folds] for i in range(folds)]


def cross_validate(
    name: str,
    data,
    embeddings: np.ndarray,
    *,
    grid: dict[str, list] | None = None,
    base_params: dict | None = None,
    folds: int = 5,
    seed: int = 0,
    ctx: FitContext | None = None,
    progress=None,
) -> CVResult:
    """Best params for router ``name`` by mean held-out AIQ over ``folds`` folds of ``data``.

    A grid of one combination is still scored (its CV AIQ is what model selection compares);
    with fewer than ``2 × folds`` rows nothing is scored (``score`` is NaN, ``folds`` 0).
    """
    from coe.routers.evaluate import Reference, sweep_points
    from coe.routers.metrics import aiq

    cls = router_class(name)
    grid = cls.cv_grid if grid is None else grid
    base = dict(base_params or {})
    keys = sorted(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]
    if len(data) < 2 * folds:
        params = {**base, **combos[0]}
        return CVResult(params, float("nan"), [(params, float("nan"))], 0)
    parts = kfold(len(data), folds, seed)
    refs = []
    for i in range(folds):
        held = parts[i]
        refs.append(Reference.from_data(data.subset(held)))
    table, per_fold = [], []
    for combo in combos:
        params = {**base, **combo}
        scores = []
        for i in range(folds):
            held = parts[i]
            train = np.concatenate([parts[j] for j in range(folds) if j != i])
            router = create_router(name, params).fit(data.subset(train), embeddings[train], ctx)
            sub = data.subset(held)
            _, costs, quals, _ = sweep_points(router, sub, embeddings[held])
            scores.append(aiq(costs, quals, refs[i].c_min, refs[i].c_max))
        table.append((params, float(np.mean(scores))))
        per_fold.append(scores)
        if progress is not None:
            progress.update(1)
    best = max(range(len(table)), key=lambda i: table[i][1])
    return CVResult(table[best][0], table[best][1], table, folds, [float(s) for s in per_fold[best]])


def grid_size(name: str) -> int:
    grid = router_class(name).cv_grid
    return int(np.prod([len(v) for v in grid.values()])) if grid else 1
