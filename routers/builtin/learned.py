"""``learned``: a ridge head on the query embedding predicting every expert's quality at once.

``q̂(x) = prior + shrink · (x − x̄) W`` with ``W = (XᵀX + l2·I)⁻¹ Xᵀ(Y − prior)`` (one solve for
all experts), clipped to the outcome range. ``prior`` is each expert's mean training quality,
so with strong regularisation or ``shrink → 0`` the router degrades gracefully to the best
single model per cost level (the zero router), and per-query evidence moves it only as far as
cross-validation on the training split says it is worth. The cost-aware policy then trades
these predictions against each expert's cost.

``text_dim > 0`` appends a stateless lexical view of the query to ``x``: character 3–5-grams
hashed into ``text_dim`` buckets (scikit-learn's ``HashingVectorizer``, L2-normalised) times
``text_weight``, after the few-shot header all training queries share (as the embedder sees
them). It sees surface cues a sentence embedding averages away (code syntax, digits, answer
formats) and needs no fitted vocabulary.

Uncertainty (ridge variance): the Bayesian-ridge standard error of the prediction,
``shrink · σ_m · sqrt(x̃ᵀ (XᵀX + l2·I)⁻¹ x̃)`` with ``σ_m²`` expert ``m``'s training residual
variance: large for queries far from the training data.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coe.routers.base import QueryBatch, Router, RouterParams, Scores, register_router
from coe.routers.datasets import routing_texts, shared_prefix


class LearnedParams(RouterParams):
    l2: float = Field(10.0, gt=0, description="Ridge penalty on the head's weights.")
    shrink: float = Field(1.0, ge=0, le=1, description="Fraction of the per-query deviation from the prior kept.")
    text_dim: int = Field(0, ge=0, le=4096, description="Hashed character 3–5-gram features appended to the "
                          "embedding (0: the embedding alone).")
    text_weight: float = Field(0.5, ge=0, description="Scale of the hashed n-gram block against the unit-norm embedding.")


def hashed_ngrams(texts: list[str], dim: int) -> np.ndarray:
    """``[B, dim]`` L2-normalised counts of character 3–5-grams hashed into ``dim`` buckets."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), n_features=dim, alternate_sign=False, norm="l2")
    return vec.transform(texts).toarray()


@register_router("learned")
class LearnedRouter(Router):
    Params = LearnedParams
    gives_uncertainty = True
    # text_dim is opt-in (router.params) until coe eval has measured it on the test splits
    cv_grid = {"l2": [1.0, 3.0, 10.0, 30.0, 100.0], "shrink": [0.25, 0.5, 0.75, 1.0]}

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.weights = np.zeros((0, 0))   # [D, M]
        self.mean_x = np.zeros(0)         # [D]
        self.prior = np.zeros(0)          # [M]
        self.bounds = np.array([0.0, 1.0])
        self.gram_inv = np.zeros((0, 0))  # [D, D]
        self.resid_sd = np.zeros(0)       # [M]
        self.prefix = ""                  # shared few-shot header stripped before the n-grams

    def fit(self, data, embeddings, ctx=None) -> LearnedRouter:
        self._set_experts(data)
        self.prefix = shared_prefix(data.queries) if self.params.text_dim else ""
        x = self._features(data.queries, embeddings)          # [N, D (+ text_dim)]
        y = data.quality                                      # [N, M]
        self.mean_x, self.prior = x.mean(axis=0), y.mean(axis=0)
        xc = x - self.mean_x
        gram = xc.T @ xc + self.params.l2 * np.eye(x.shape[1])   # [D, D]
        self.gram_inv = np.linalg.inv(gram)
        self.weights = self.gram_inv @ (xc.T @ (y - self.prior))   # [D, M]
        self.bounds = np.array([y.min(), y.max()])
        self.resid_sd = (y - self.prior - xc @ self.weights).std(axis=0)
        return self

    def score(self, batch: QueryBatch) -> Scores:
        x = self._features(batch.texts, batch.embeddings) - self.mean_x     # [B, D]
        quality = self.prior + self.params.shrink * (x @ self.weights)     # [B, M]
        lev = np.sqrt(np.clip(np.einsum("bi,ij,bj->b", x, self.gram_inv, x), 0, None))   # [B]
        sd = self.params.shrink * lev[:, None] * self.resid_sd[None, :]
        return self._scores(np.clip(quality, self.bounds[0], self.bounds[1]), sd)

    def _features(self, texts, embeddings) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float64)
        if not self.params.text_dim:
            return x
        grams = hashed_ngrams(routing_texts(list(texts), self.prefix), self.params.text_dim)   # [B, text_dim]
        return np.hstack([x, self.params.text_weight * grams])

    def state(self):
        return {"weights": self.weights, "mean_x": self.mean_x, "prior": self.prior, "bounds": self.bounds,
                "gram_inv": self.gram_inv, "resid_sd": self.resid_sd, "prefix": np.array(self.prefix)}

    def set_state(self, arrays) -> None:
        self.weights, self.mean_x = arrays["weights"], arrays["mean_x"]
        self.prior, self.bounds = arrays["prior"], arrays["bounds"]
        # folders fitted before uncertainty existed: zero uncertainty
        d, m = self.weights.shape
        self.gram_inv = arrays["gram_inv"] if "gram_inv" in arrays else np.zeros((d, d))
        self.resid_sd = arrays["resid_sd"] if "resid_sd" in arrays else np.zeros(m)
        self.prefix = str(arrays["prefix"]) if "prefix" in arrays else ""
