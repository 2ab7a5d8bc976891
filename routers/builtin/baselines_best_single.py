"""``best-single``: every query gets each expert's mean training quality (no per-query signal).

Under the λ sweep it visits the single models on the quality/cost frontier, so its AIQ is at
most the zero router's: the floor a real router must beat.
"""

from __future__ import annotations

import numpy as np

from coe.routers.base import QueryBatch, Router, Scores, register_router


@register_router("best-single")
class BestSingleRouter(Router):
    needs_embeddings = False

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.prior = np.zeros(0)

    def fit(self, data, embeddings, ctx=None) -> BestSingleRouter:
        self._set_experts(data)
        self.prior = data.quality.mean(axis=0)
        return self

    def score(self, batch: QueryBatch) -> Scores:
        return self._scores(np.tile(self.prior, (len(batch), 1)))

    def state(self):
        return {"prior": self.prior}

    def set_state(self, arrays) -> None:
        self.prior = arrays["prior"]
