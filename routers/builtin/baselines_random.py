"""``random``: uniform random scores (RouterBench's random router); seeded, so reproducible."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coe.routers.base import QueryBatch, Router, RouterParams, Scores, register_router


class RandomParams(RouterParams):
    seed: int = Field(0, description="Seed of the score generator.")


@register_router("random")
class RandomRouter(Router):
    Params = RandomParams
    needs_embeddings = False

    def fit(self, data, embeddings, ctx=None) -> RandomRouter:
        self._set_experts(data)
        return self

    def score(self, batch: QueryBatch) -> Scores:
        rng = np.random.default_rng(self.params.seed)
        return self._scores(rng.random((len(batch), len(self.experts))))
