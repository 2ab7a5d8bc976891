"""``learned`` with hashed character n-grams (``text_dim``): surface cues the embedding lacks."""

from __future__ import annotations

import numpy as np

from coe.routers import QueryBatch, create_router, load_router, save_router
from coe.routers.datasets import RoutingData

HEADER = "Answer the question below. " * 10 + "\n\n"   # a shared few-shot header (> 200 chars)


def _data(n, seed):
    """Code-looking queries are solved by 'code', word problems by 'math'; embeddings are noise."""
    rng = np.random.default_rng(seed)
    is_code = rng.random(n) < 0.5
    words = ["apples", "trains", "books", "coins", "birds"]
    queries = [HEADER + (f"def f_{i}(xs): return [x for x in xs if x > {i}]" if c else
                         f"Tom has {i} {words[i % 5]} and buys {i + 3} more. How many {words[i % 5]} now?")
               for i, c in enumerate(is_code)]
    y = np.stack([is_code, ~is_code], axis=1).astype(float)     # [N, 2]: code, math
    x = rng.normal(size=(n, 16))
    return RoutingData(queries, ["code", "math"], y), x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ngrams_route_on_surface_cues_and_survive_save_load(tmp_path):
    train, xtr = _data(120, 0)
    test, xte = _data(60, 1)
    want = test.quality.argmax(axis=1)

    def accuracy(router):
        return (router.score(QueryBatch(test.queries, xte)).quality.argmax(axis=1) == want).mean()

    plain = create_router("learned", {"l2": 1.0}).fit(train, xtr)
    text = create_router("learned", {"l2": 1.0, "text_dim": 256, "text_weight": 1.0}).fit(train, xtr)
    assert accuracy(plain) < 0.75 and accuracy(text) >= 0.95
    assert text.prefix == HEADER and text.weights.shape == (16 + 256, 2)
    save_router(text, tmp_path / "t", embedder="minilm-l6")
    loaded, _ = load_router(tmp_path / "t")
    np.testing.assert_allclose(loaded.score(QueryBatch(test.queries, xte)).quality,
                               text.score(QueryBatch(test.queries, xte)).quality)
