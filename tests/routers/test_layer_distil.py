"""Distilling MiniLM into its first layers (``minilm-l{1,2}-distil-int8``): on a tiny BERT, then the
real build (MiniLM, a small local corpus, ONNX int8) end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.errors import ModelNotFoundError


@pytest.fixture(scope="module")
def teacher_dir(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with a second layer that matters (random init leaves it near the identity)."""
    import shutil

    import torch
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("teacher")
    shutil.copytree(tiny_bert_dir, folder, dirs_exist_ok=True)
    model = BertModel.from_pretrained(str(tiny_bert_dir))
    with torch.no_grad():
        for p in model.encoder.layer[1].parameters():
            p.mul_(25.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_the_pruned_student_learns_the_teachers_embeddings(teacher_dir, tiny_sentences):
    from coe.routers.embedders import load_backend
    from coe.routers.layer_distil import distil

    targets = load_backend(str(teacher_dir), max_seq_length=32).encode(tiny_sentences, 8)   # the 2-layer teacher
    student, res = distil(teacher_dir, tiny_sentences, targets, layers=1, epochs=8, learning_rate=3e-3,
                          batch_size=8, max_seq_length=32, val_share=0.2, say=lambda _: None)
    assert res.layers == 1 and len(student.model.encoder.layer) == 1
    assert res.texts + res.val_texts == len(tiny_sentences) and res.val_texts == 8
    assert res.val_loss_after < res.val_loss_pruned      # the best epoch is kept: closer than plain pruning


def test_layers_out_of_range_are_refused(tiny_bert_dir, tiny_sentences):
    from coe.routers.layer_distil import distil

    with pytest.raises(ValueError, match=r"layers must be 1\.\.2; got 3"):
        distil(tiny_bert_dir, tiny_sentences, np.zeros((40, 32), np.float32), layers=3, say=lambda _: None)


def test_prepare_distils_exports_and_checksums(tmp_path, monkeypatch):
    """The real build: MiniLM's first layer, distilled on a small corpus, exported to ONNX int8."""
    from coe.routers.embedding import Embedder
    from coe.tools import models
    from tests.routers.conftest import synthetic_rows

    monkeypatch.setenv("COE_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    queries = synthetic_rows(8, seed=3)[0]
    (corpus / "queries.txt").write_text("\n".join(queries))
    path = models.prepare("minilm-l1-distil-int8", quiet=True, corpus=corpus)
    manifest = json.loads((path / models.READY).read_text())
    assert manifest["layers"] == 1 and manifest["corpus_texts"] == len(set(queries))
    assert manifest["val_cosine_loss_after"] <= manifest["val_cosine_loss_pruned"]
    assert manifest["from_sha256"] == models.sha256_file(models.models_dir() / "minilm-l6" / "model.safetensors")
    assert models.verify_prepared("minilm-l1-distil-int8")
    assert (path / "model_int8.onnx").stat().st_size < 20e6     # one layer of six, int8
    emb = Embedder("minilm-l1-distil-int8", memory_items=0)
    vecs = emb.encode(["Write a python function to sort a list.", "What is 3 plus 4?"])
    assert emb.dim == 384 and vecs.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


def test_prepare_without_a_corpus_says_how_to_give_one(monkeypatch, tmp_path):
    from coe.tools import models

    monkeypatch.setattr(models, "default_corpus", lambda: None)
    with pytest.raises(ModelNotFoundError, match=r"minilm-l1-distil-int8 --corpus DIR` \(or set COE_CORPUS\)"):
        models.BUILDERS["minilm-l1-distil-int8"](tmp_path, models.Progress(quiet=True), corpus=None)
