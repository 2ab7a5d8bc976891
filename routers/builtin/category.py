"""``category``: the Composition-of-Experts two-step router.

1. A classifier on the embedding maps a query to a category (multinomial logistic regression,
   scikit-learn). Categories come from the data's ``categories`` (e.g. RouterBench's
   ``eval_name``, a profile's ``category``) when they vary; else from the experts' configured
   ``category`` fields (``FitContext.categories``, at least two distinct): each training query is
   labelled with the category whose experts beat the average expert on it by the most (ties: the
   category name closest to the query in embedding space); else from k-means clusters of the
   training embeddings (faiss).
2. A category → expert table picks the expert: learned from outcomes (each expert's mean
   quality in the category, shrunk toward its overall mean by ``shrink`` pseudo-queries), or
   given in ``params.table`` as ``"category=expert"`` entries (that expert then scores 1 in the
   category, the others 0).

Predicted quality is the table row of the query's category, mixed by the classifier's
probabilities. When the classifier is unsure (max probability < ``min_confidence``) the query
gets every expert's overall mean quality, and ``general_expert`` (if set) is lifted above all
others, so the policy sends it there.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coe.errors import ConfigError
from coe.routers.base import QueryBatch, Router, RouterParams, Scores, register_router


class CategoryParams(RouterParams):
    n_categories: int = Field(8, ge=2, le=512, description="k-means clusters when the data has no categories.")
    shrink: float = Field(10.0, ge=0, description="Pseudo-queries at the expert's overall mean per category.")
    min_confidence: float = Field(0.0, ge=0, le=1, description="Below this max probability the query is 'unsure'.")
    general_expert: str | None = Field(None, description="Expert for unsure queries.")
    table: list[str] = Field(default_factory=list, description="Fixed 'category=expert' entries.")
    c: float = Field(1.0, gt=0, description="Inverse L2 strength of the classifier.")
    seed: int = 0


@register_router("category")
class CategoryRouter(Router):
    Params = CategoryParams
    cv_grid = {"n_categories": [4, 8, 16], "shrink": [5.0, 20.0, 80.0]}

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.coef = np.zeros((0, 0))       # [D, C]
        self.intercept = np.zeros(0)       # [C]
        self.table_q = np.zeros((0, 0))    # [C, M]
        self.prior = np.zeros(0)           # [M]
        self.categories: list[str] = []

    def _labels(self, data, x: np.ndarray, ctx) -> tuple[np.ndarray, list[str]]:
        cats = getattr(data, "categories", None)
        if cats is not None and len(set(cats)) > 1:
            names = sorted(set(cats))
            return np.array([names.index(c) for c in cats]), names
        configured = {e: c for e, c in (ctx.categories if ctx else {}).items() if c and e in self.experts}
        if len(set(configured.values())) > 1:
            return self._labels_from_experts(data, x, configured, ctx)
        import faiss

        k = min(self.params.n_categories, len(x))
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=self.params.seed, verbose=False, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        _, lab = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return lab[:, 0], [f"cluster-{i}" for i in range(k)]

    def _labels_from_experts(self, data, x, configured: dict[str, str], ctx) -> tuple[np.ndarray, list[str]]:
        """Label queries by the configured category whose experts do best on them, relative to average."""
        names = sorted(set(configured.values()))
        adv = data.quality - data.quality.mean(axis=1, keepdims=True)            # [N, M]
        gain = np.stack([adv[:, [self.experts.index(e) for e, c in configured.items() if c == name]].mean(axis=1)
                         for name in names], axis=1)                              # [N, C]
        if ctx is not None and ctx.embed is not None:
            # a vanishing tie-break toward the category whose name the query is closest to
            gain = gain + 1e-6 * (x @ np.asarray(ctx.embed(names), dtype=np.float64).T)
        return np.argmax(gain, axis=1), names

    def fit(self, data, embeddings, ctx=None) -> CategoryRouter:
        from sklearn.linear_model import LogisticRegression

        self._set_experts(data)
        x = np.asarray(embeddings, dtype=np.float64)
        y = data.quality
        labels, names = self._labels(data, x, ctx)
        present = sorted(set(labels.tolist()))
        self.categories = [names[i] for i in present]
        labels = np.array([present.index(v) for v in labels])
        self.prior = y.mean(axis=0)
        c = len(present)
        table = np.zeros((c, y.shape[1]))
        for i in range(c):
            rows = labels == i
            table[i] = (y[rows].sum(axis=0) + self.params.shrink * self.prior) / (rows.sum() + self.params.shrink)
        self.table_q = self._apply_fixed_table(table)
        if c == 1:
            self.coef, self.intercept = np.zeros((x.shape[1], 1)), np.zeros(1)
            return self
        clf = LogisticRegression(C=self.params.c, max_iter=100, tol=1e-3)
        clf.fit(x, labels)
        coef, icpt = clf.coef_, clf.intercept_
        if c == 2:   # sklearn keeps one row for two classes
            coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
        self.coef, self.intercept = coef.T, icpt
        return self

    def _apply_fixed_table(self, table: np.ndarray) -> np.ndarray:
        for entry in self.params.table:
            cat, sep, expert = entry.partition("=")
            if not sep or cat not in self.categories or expert not in self.experts:
                raise ConfigError(
                    f"category router: table entry {entry!r} must be 'category=expert' with a category in "
                    f"{self.categories} and an expert in {self.experts}"
                )
            row = np.zeros(table.shape[1])
            row[self.experts.index(expert)] = 1.0
            table[self.categories.index(cat)] = row
        return table

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = np.asarray(embeddings, dtype=np.float64) @ self.coef + self.intercept   # [B, C]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def score(self, batch: QueryBatch) -> Scores:
        p = self.probabilities(batch.embeddings)                  # [B, C]
        quality = p @ self.table_q                                # [B, M]
        unsure = p.max(axis=1) < self.params.min_confidence      # [B]
        if unsure.any():
            fallback = np.tile(self.prior, (int(unsure.sum()), 1))
            g = self.params.general_expert
            if g is not None and g in self.experts:
                fallback[:, self.experts.index(g)] = fallback.max() + 1.0
            quality[unsure] = fallback
        return self._scores(quality)

    def state(self):
        return {
            "coef": self.coef, "intercept": self.intercept, "table_q": self.table_q,
            "prior": self.prior, "categories": np.array(self.categories),
        }

    def set_state(self, arrays) -> None:
        self.coef, self.intercept = arrays["coef"], arrays["intercept"]
        self.table_q, self.prior = arrays["table_q"], arrays["prior"]
        self.categories = [str(c) for c in arrays["categories"]]
