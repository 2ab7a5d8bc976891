"""``centroid``: each expert is the mean embedding of its example queries (and description).

Needs no outcome data (RouterRetriever's pilot embeddings, semantic-router's utterances): this
is how a newly registered expert gets traffic before any outcomes exist. Score = cosine
similarity between the query and the expert's centroid.

Fitted on outcome data, an expert's examples are the training queries weighted by how much
better than the average expert it did on them, and the similarity is mapped to a quality
estimate by a per-expert least-squares line (slope ≥ 0) around the expert's mean quality.
"""

from __future__ import annotations

import threading

import numpy as np
from pydantic import Field

from coe.routers.base import FitContext, QueryBatch, Router, RouterParams, Scores, register_router


def expert_texts(description: str, examples: list[str]) -> list[str]:
    """The texts that describe an expert: its description (when set) and its example queries."""
    return [t for t in [description, *examples] if t and t.strip()]


def unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


class CentroidParams(RouterParams):
    calibrate: bool = Field(True, description="Fitted on outcomes: map similarity to quality per expert.")


@register_router("centroid")
class CentroidRouter(Router):
    """Thread-safe for concurrent ``score`` and ``set_expert``/``remove_expert``."""

    Params = CentroidParams
    needs_outcomes = False
    cv_grid = {"calibrate": [True, False]}

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self._lock = threading.Lock()
        self.centroids = np.zeros((0, 0), dtype=np.float32)   # [M, D]
        self.slope = np.zeros(0)                               # [M]; 0 means raw cosine
        self.offset = np.zeros(0)                              # [M]
        self.calibrated = np.zeros(0, dtype=bool)              # [M]; False: score is the raw cosine

    # -- descriptions -----------------------------------------------------------------------
    def set_expert(self, expert_id: str, text_embeddings: np.ndarray, cost: float = 1.0) -> None:
        """Add or replace an expert described by the embeddings ``[n, D]`` of its texts (raw cosine score)."""
        if len(text_embeddings) == 0:
            raise ValueError(f"expert {expert_id!r} has no description or examples to build a centroid from")
        c = unit(np.asarray(text_embeddings, dtype=np.float32).mean(axis=0))
        with self._lock:
            experts = list(self.experts)
            cents = self.centroids if len(experts) else np.zeros((0, c.shape[0]), dtype=np.float32)
            costs = list(self.costs) if self.costs is not None else [1.0] * len(experts)
            slope, offset, cal = list(self.slope), list(self.offset), list(self.calibrated)
            if expert_id in experts:
                i = experts.index(expert_id)
                cents = cents.copy()
                cents[i] = c
                costs[i], slope[i], offset[i], cal[i] = cost, 0.0, 0.0, False
            else:
                experts.append(expert_id)
                cents = np.vstack([cents, c[None]])
                costs.append(cost)
                slope.append(0.0)
                offset.append(0.0)
                cal.append(False)
            self.experts, self.centroids = experts, cents
            self.costs, self.slope, self.offset = np.asarray(costs, float), np.asarray(slope), np.asarray(offset)
            self.calibrated = np.asarray(cal, dtype=bool)

    def remove_expert(self, expert_id: str) -> None:
        with self._lock:
            if expert_id not in self.experts:
                return
            keep = [i for i, e in enumerate(self.experts) if e != expert_id]
            self.experts = [self.experts[i] for i in keep]
            self.centroids = self.centroids[keep]
            self.costs = None if self.costs is None else self.costs[keep]
            self.slope, self.offset, self.calibrated = self.slope[keep], self.offset[keep], self.calibrated[keep]

    # -- protocol ---------------------------------------------------------------------------
    def fit(self, data, embeddings, ctx: FitContext | None = None) -> CentroidRouter:
        ctx = ctx or FitContext()
        if data is None:
            for expert_id, emb in ctx.description_embeddings.items():
                self.set_expert(expert_id, emb)
            return self
        self._set_experts(data)
        y = data.quality                                          # [N, M]
        x = np.asarray(embeddings, dtype=np.float32)              # [N, D]
        adv = np.clip(y - y.mean(axis=1, keepdims=True), 0, None)  # [N, M] how much better than average
        w = adv + 1e-3 * (y > 0)
        cents = unit((w.T @ x) / np.maximum(w.sum(axis=0)[:, None], 1e-12))  # [M, D]
        self.centroids = cents.astype(np.float32)
        sims = x @ self.centroids.T                               # [N, M]
        m = y.shape[1]
        self.slope, self.offset = np.zeros(m), y.mean(axis=0)
        if self.params.calibrate:
            for j in range(m):
                s, t = sims[:, j], y[:, j]
                var = s.var()
                slope = ((s - s.mean()) * (t - t.mean())).mean() / var if var > 1e-12 else 0.0
                self.slope[j] = max(slope, 0.0)
                self.offset[j] = t.mean() - self.slope[j] * s.mean()
        else:
            self.slope[:] = 1.0
            self.offset[:] = 0.0
        # A fitted expert scores on the quality scale (offset + slope*sim); description-only
        # experts keep the raw cosine.
        self.calibrated = np.ones(m, dtype=bool)
        return self

    def similarities(self, embeddings: np.ndarray) -> np.ndarray:
        with self._lock:
            cents = self.centroids
        return np.asarray(embeddings, dtype=np.float32) @ cents.T   # [B, M]

    def score(self, batch: QueryBatch) -> Scores:
        with self._lock:
            experts, cents, costs = list(self.experts), self.centroids, self.costs
            slope, offset, calibrated = self.slope, self.offset, self.calibrated
        if not experts:
            return Scores(experts=[], quality=np.zeros((len(batch), 0)), cost=np.zeros(0))
        sims = np.asarray(batch.embeddings, dtype=np.float32) @ cents.T   # [B, M]
        quality = np.where(calibrated[None, :], offset[None, :] + slope[None, :] * sims, sims)
        return Scores(experts=experts, quality=quality.astype(np.float64), cost=costs)

    def state(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "slope": self.slope, "offset": self.offset, "calibrated": self.calibrated}

    def set_state(self, arrays) -> None:
        self.centroids = arrays["centroids"].astype(np.float32)
        self.slope, self.offset = arrays["slope"], arrays["offset"]
        self.calibrated = arrays["calibrated"].astype(bool)
