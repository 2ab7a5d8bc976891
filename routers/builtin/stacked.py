"""``stacked``: a weighted blend of other routers' quality predictions, weights learned by CV.

``members`` names the routers to combine, each optionally with fixed params
(``"knn:k=50:shrink=8"``). Fitting runs ``folds``-fold cross-validation on the training data
to get every member's out-of-fold predictions ``q_k`` ``[N, M]``, then learns non-negative
weights and an intercept, ``q̂ = b + Σ_k w_k q_k``, by least squares over all (query, expert)
cells (stacked generalisation, Wolpert 1992; Breiman's non-negative stacking). The members are
then refitted on all the data. ``coe eval`` gives it its members with their own CV-chosen
params and reports whether it beats them in cross-validation.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import Field, field_validator

from coe.routers.base import (
    QueryBatch,
    Router,
    RouterParams,
    create_router,
    register_router,
    router_class,
)


def parse_member(spec: str) -> tuple[str, dict]:
    """``"knn:k=50:shrink=8"`` → ``("knn", {"k": 50, "shrink": 8})`` (values read as JSON when they parse)."""
    name, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"member {spec!r}: expected 'router:key=value:...', got {pair!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return name, params


def member_spec(name: str, params: dict) -> str:
    """The inverse of :func:`parse_member` (params whose value is None or a list are left out)."""
    parts = [name] + [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in sorted(params.items())
                      if v is not None and not isinstance(v, list)]
    return ":".join(parts)


class StackedParams(RouterParams):
    members: list[str] = Field(default_factory=lambda: ["knn:k=50:shrink=8", "learned", "irt"],
                               description="Routers to blend, 'name' or 'name:key=value:...'.")
    folds: int = Field(3, ge=2, le=20, description="Inner folds for the out-of-fold predictions.")
    seed: int = 0

    @field_validator("members")
    @classmethod
    def _members(cls, members: list[str]) -> list[str]:
        if not members:
            raise ValueError("give at least one member router")
        for spec in members:
            name, params = parse_member(spec)
            if name == "stacked":
                raise ValueError("a stacked router cannot contain another stacked router")
            mcls = router_class(name)   # RouterNotFoundError lists the available names
            if mcls.needs_labels:
                raise ValueError(f"member {name!r} cannot be stacked (it reads the true outcomes)")
            mcls.validate_params(params)
        return members


@register_router("stacked")
class StackedRouter(Router):
    Params = StackedParams

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.members: list[Router] = []
        self.weights = np.zeros(0)      # [K]
        self.intercept = 0.0

    def _new_members(self) -> list[Router]:
        return [create_router(*parse_member(spec)) for spec in self.params.members]

    def fit(self, data, embeddings, ctx=None) -> StackedRouter:
        from scipy.optimize import nnls

        from coe.routers.tuning import kfold

        self._set_experts(data)
        x = np.asarray(embeddings)
        n, m = data.quality.shape
        specs = self.params.members
        oof = np.zeros((n, m, len(specs)))                                   # [N, M, K]
        for held in kfold(n, self.params.folds, self.params.seed):
            train = np.setdiff1d(np.arange(n), held)
            batch = QueryBatch([data.queries[i] for i in held], x[held])
            for k, member in enumerate(self._new_members()):
                oof[held, :, k] = member.fit(data.subset(train), x[train], ctx).score(batch).quality
        feats = oof.reshape(n * m, -1)                                        # [N·M, K]
        target = data.quality.reshape(-1)
        design = np.hstack([feats, np.ones((n * m, 1)), -np.ones((n * m, 1))])   # free intercept as two ≥0 terms
        coef, _ = nnls(design, target)
        self.weights, self.intercept = coef[: len(specs)], float(coef[-2] - coef[-1])
        self.members = [r.fit(data, x, ctx) for r in self._new_members()]
        self.notes = {"weights": {spec: float(w) for spec, w in zip(specs, self.weights)},
                      "intercept": self.intercept}
        return self

    def score(self, batch: QueryBatch):
        preds = [r.score(batch).quality for r in self.members]                # K × [B, M]
        quality = self.intercept + sum(w * q for w, q in zip(self.weights, preds))
        return self._scores(np.asarray(quality, dtype=np.float64))

    def state(self):
        arrays = {"weights": self.weights, "intercept": np.array([self.intercept])}
        for k, r in enumerate(self.members):
            arrays.update({f"m{k}.{key}": v for key, v in r.state().items()})
        return arrays

    def set_state(self, arrays) -> None:
        self.weights, self.intercept = arrays["weights"], float(arrays["intercept"][0])
        self.members = self._new_members()
        for k, r in enumerate(self.members):
            prefix = f"m{k}."
            r.experts, r.costs = list(self.experts), self.costs
            r.set_state({key[len(prefix):]: v for key, v in arrays.items() if key.startswith(prefix)})
