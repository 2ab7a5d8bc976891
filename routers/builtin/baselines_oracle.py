"""``oracle``: scores are the true outcomes (evaluation only: it reads ``QueryBatch.outcomes``)."""

from __future__ import annotations

import numpy as np

from coe.errors import InvalidRequestError
from coe.routers.base import QueryBatch, Router, Scores, register_router


@register_router("oracle")
class OracleRouter(Router):
    needs_embeddings = False
    needs_labels = True

    def fit(self, data, embeddings, ctx=None) -> OracleRouter:
        self._set_experts(data)
        return self

    def score(self, batch: QueryBatch) -> Scores:
        if batch.outcomes is None:
            raise InvalidRequestError("the oracle router needs the true outcomes (offline evaluation only)")
        return self._scores(np.asarray(batch.outcomes, dtype=np.float64))
