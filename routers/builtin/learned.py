"""``learned``: a ridge head on the query embedding predicting every expert's quality at once.

``q̂(x) = prior + shrink · (x − x̄) W`` with ``W = (XᵀX + l2·I)⁻¹ Xᵀ(Y − prior)`` (one solve for
all experts), clipped to the outcome range. ``prior`` is each expert's mean training quality,
so with strong regularisation or ``shrink → 0`` the router degrades gracefully to the best
single model per cost level (the zero router), and per-query evidence moves it only as far as
cross-validation on the training split says it is worth. The cost-aware policy then trades
these predictions against each expert's cost.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coe.routers.base import QueryBatch, Router, RouterParams, Scores, register_router


class LearnedParams(RouterParams):
    l2: float = Field(10.0, gt=0, description="Ridge penalty on the head's weights.")
    shrink: float = Field(1.0, ge=0, le=1, description="Fraction of the per-query deviation from the prior kept.")


@register_router("learned")
class LearnedRouter(Router):
    Params = LearnedParams
    cv_grid = {"l2": [1.0, 3.0, 10.0, 30.0, 100.0], "shrink": [0.25, 0.5, 0.75, 1.0]}

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.weights = np.zeros((0, 0))   # [D, M]
        self.mean_x = np.zeros(0)         # [D]
        self.prior = np.zeros(0)          # [M]
        self.bounds = np.array([0.0, 1.0])

    def fit(self, data, embeddings, ctx=None) -> LearnedRouter:
        self._set_experts(data)
        x = np.asarray(embeddings, dtype=np.float64)          # [N, D]
        y = data.quality                                      # [N, M]
        self.mean_x, self.prior = x.mean(axis=0), y.mean(axis=0)
        xc = x - self.mean_x
        gram = xc.T @ xc + self.params.l2 * np.eye(x.shape[1])   # [D, D]
        self.weights = np.linalg.solve(gram, xc.T @ (y - self.prior))   # [D, M]
        self.bounds = np.array([y.min(), y.max()])
        return self

    def score(self, batch: QueryBatch) -> Scores:
        x = np.asarray(batch.embeddings, dtype=np.float64) - self.mean_x   # [B, D]
        quality = self.prior + self.params.shrink * (x @ self.weights)     # [B, M]
        return self._scores(np.clip(quality, self.bounds[0], self.bounds[1]))

    def state(self):
        return {"weights": self.weights, "mean_x": self.mean_x, "prior": self.prior, "bounds": self.bounds}

    def set_state(self, arrays) -> None:
        self.weights, self.mean_x = arrays["weights"], arrays["mean_x"]
        self.prior, self.bounds = arrays["prior"], arrays["bounds"]
