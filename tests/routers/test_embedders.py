"""Embedding backends behind ``router.embedder``: detection, the fast built-in embedders, caches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.errors import ConfigError
from coe.routers.embedders import MARKER, backend_names, folder_spec, load_backend

QUERIES = [
    "Write a python function to find the first repeated character in a given string.",
    "A baker made 24 muffins and sold 3/4 of them. How many are left?",
    "What is the capital of France?",
]


def test_the_folder_declares_its_backend(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert folder_spec(str(plain)) == {"backend": "sentence-transformers"}
    assert folder_spec("sentence-transformers/all-MiniLM-L6-v2") == {"backend": "sentence-transformers"}
    static = tmp_path / "static"
    static.mkdir()
    (static / "config.json").write_text(json.dumps({"model_type": "model2vec"}))
    assert folder_spec(str(static)) == {"backend": "model2vec"}
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / MARKER).write_text(json.dumps({"backend": "onnx", "file": "model_int8.onnx"}))
    assert folder_spec(str(marked)) == {"backend": "onnx", "file": "model_int8.onnx"}
    assert {"onnx", "model2vec", "sentence-transformers"} <= set(backend_names())


def test_a_bad_marker_names_the_problem(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"backend": "tensorrt"}))
    with pytest.raises(ConfigError, match="unknown embedding backend 'tensorrt'; available: .*model2vec.*onnx"):
        load_backend(str(tmp_path), max_seq_length=256)
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_backend(str(tmp_path), max_seq_length=256)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    from coe.routers.embedding import Embedder

    return Embedder(str(minilm_dir), memory_items=0).encode(QUERIES)


def _check(alias: str, reference: np.ndarray, min_cos: float) -> None:
    from coe.routers.embedding import Embedder
    from coe.tools import models

    folder = models.prepare(alias, quiet=True)
    emb = Embedder(str(folder), memory_items=0)
    vecs = emb.encode(QUERIES)
    assert vecs.dtype == np.float32 and vecs.shape[0] == len(QUERIES) and vecs.shape[1] == emb.dim
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    # one by one gives the same rows as the batch (padding does not leak into the pooled vector)
    single = np.concatenate([emb.encode([q]) for q in QUERIES])
    assert np.allclose(single, vecs, atol=2e-2)
    if vecs.shape == reference.shape:
        cos = (vecs * reference).sum(axis=1)
        assert cos.min() >= min_cos, f"{alias} drifted from MiniLM: {cos}"
    sims = vecs @ vecs.T      # the routing signal survives: each query is closest to itself
    assert (np.argmax(sims, axis=1) == np.arange(len(QUERIES))).all()


@pytest.mark.parametrize("alias,min_cos", [("minilm-l6-onnx", 0.999), ("minilm-l6-int8", 0.95)])
def test_onnx_embedders_match_minilm(alias, min_cos, reference):
    _check(alias, reference, min_cos)


def test_bf16_embedder_matches_minilm(reference):
    _check("minilm-l6-bf16", reference, 0.99)


@pytest.mark.slow
def test_static_embedder_distilled_from_minilm(reference):
    """model2vec distillation runs ~1-2 minutes the first time (then it is prepared)."""
    from coe.routers.embedding import Embedder
    from coe.tools import models

    _check("minilm-l6-m2v", reference, 0.0)
    emb = Embedder(str(models.prepare("minilm-l6-m2v", quiet=True)), memory_items=0)
    assert emb.backend == "model2vec" and emb.dim == 256
    code, math, chat = emb.encode(QUERIES)
    probe = emb.encode(["Write a python function that reverses a list."])[0]
    assert probe @ code > max(probe @ math, probe @ chat)


def test_encode_tracked_reports_cache_hits(minilm_dir):
    from coe.routers.embedding import Embedder

    emb = Embedder(str(minilm_dir))
    vecs, cached = emb.encode_tracked(["alpha query", "beta query", "alpha query"])
    assert cached.tolist() == [False, False, True] and emb.embedded == 2
    assert np.allclose(vecs[0], vecs[2])
    again, cached = emb.encode_tracked(["beta query", "gamma query"])
    assert cached.tolist() == [True, False] and emb.embedded == 3
    assert np.allclose(again[0], vecs[1])
    off = Embedder(str(minilm_dir), memory_items=0)
    off.encode(["alpha query"])
    assert off.encode_tracked(["alpha query"])[1].tolist() == [False] and off.embedded == 2


def test_a_rebuilt_model_never_reads_the_old_builds_cached_embeddings(tmp_path):
    """The disk cache is keyed by the folder's build (its manifest), not only by its path:
    `coe models prepare --force` may produce different vectors in the same folder."""
    from coe.model_paths import READY
    from coe.routers.embedding import Embedder

    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / READY).write_text('{"files": {"model.onnx": "aaa"}}')
    first = Embedder(str(folder)).model_key
    assert Embedder(str(folder)).model_key == first          # same build: same cache
    (folder / READY).write_text('{"files": {"model.onnx": "bbb"}}')
    assert Embedder(str(folder)).model_key != first          # rebuilt: a fresh cache
