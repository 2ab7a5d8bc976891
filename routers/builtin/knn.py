"""``knn``: a faiss inner-product index over the embedded training queries (RouterBench's baseline).

An expert's predicted quality is the similarity-weighted mean outcome of the ``k`` nearest
training queries, shrunk toward the expert's mean quality by ``shrink`` pseudo-neighbours:
``q̂ = (Σ w_i y_i + shrink·prior) / (Σ w_i + shrink)`` with ``w_i = max(sim_i, 0)``. With
``shrink = 0`` it is the plain kNN of RouterBench.

Uncertainty (neighbour agreement): the standard error of that weighted mean,
``sqrt(Σ p_i (y_i − q̂)² / (n_eff + shrink))`` with ``p_i = w_i / Σ w`` and Kish's effective
number of neighbours ``n_eff = (Σ w)² / Σ w²``: neighbours that disagree make it large.
"""

from __future__ import annotations

import threading

import numpy as np
from pydantic import Field

from coe.routers.base import QueryBatch, Router, RouterParams, Scores, register_router


class KnnParams(RouterParams):
    k: int = Field(20, ge=1, le=10_000, description="Neighbours per query.")
    shrink: float = Field(0.0, ge=0, description="Pseudo-neighbours at the expert's mean quality.")


@register_router("knn")
class KnnRouter(Router):
    Params = KnnParams
    gives_uncertainty = True
    cv_grid = {"k": [10, 20, 50, 100], "shrink": [0.0, 2.0, 8.0, 32.0]}

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self._index = None
        self._lock = threading.Lock()
        self.keys = np.zeros((0, 0), dtype=np.float32)   # [N, D]
        self.values = np.zeros((0, 0))                    # [N, M]
        self.prior = np.zeros(0)                          # [M]

    def fit(self, data, embeddings, ctx=None) -> KnnRouter:
        self._set_experts(data)
        self.keys = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.values = data.quality.astype(np.float64)
        self.prior = self.values.mean(axis=0)
        self._index = None
        return self

    def _get_index(self):
        with self._lock:
            if self._index is None:
                import faiss

                index = faiss.IndexFlatIP(self.keys.shape[1])
                index.add(self.keys)
                self._index = index
            return self._index

    def score(self, batch: QueryBatch) -> Scores:
        index = self._get_index()
        k = min(self.params.k, len(self.keys))
        sims, idx = index.search(np.ascontiguousarray(batch.embeddings, dtype=np.float32), k)  # [B, k]
        w = np.clip(sims, 0, None).astype(np.float64) + 1e-6 * (idx >= 0)   # [B, k]
        y = self.values[np.clip(idx, 0, None)]                               # [B, k, M]
        s = self.params.shrink
        wsum = w.sum(axis=1, keepdims=True)                                  # [B, 1]
        quality = (np.einsum("bk,bkm->bm", w, y) + s * self.prior) / (wsum + s)
        p = w / wsum                                                         # [B, k]
        spread = np.einsum("bk,bkm->bm", p, (y - quality[:, None, :]) ** 2)  # [B, M]
        n_eff = wsum ** 2 / (w ** 2).sum(axis=1, keepdims=True)             # [B, 1]
        return self._scores(quality, np.sqrt(spread / (n_eff + s)))

    def coverage(self, batch: QueryBatch) -> np.ndarray:
        sims, _ = self._get_index().search(np.ascontiguousarray(batch.embeddings, dtype=np.float32), 1)  # [B, 1]
        return sims[:, 0]

    def mean_quality(self) -> np.ndarray:
        return self.prior

    def state(self):
        return {"keys": self.keys, "values": self.values, "prior": self.prior}

    def set_state(self, arrays) -> None:
        self.keys = np.ascontiguousarray(arrays["keys"], dtype=np.float32)
        self.values, self.prior = arrays["values"], arrays["prior"]
        self._index = None
