"""Tuning a model2vec static embedder towards its teacher (``minilm-l6-m2v-tuned``), on a tiny BERT
(``tiny_bert_dir``, conftest)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.errors import ModelNotFoundError


def test_tuning_fits_the_teacher_and_loads_as_an_embedder(tiny_bert_dir, tiny_sentences, tmp_path):
    from coe.routers.embedders import folder_spec, load_backend
    from coe.routers.static_tune import build_tuned

    SENTENCES = tiny_sentences
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "texts.txt").write_text("\n".join(SENTENCES + SENTENCES[:5]))   # repeats are dropped
    (corpus / "held_test.txt").write_text("what is the capital of france\n")   # a test split: never read
    out = tmp_path / "tuned"
    facts = build_tuned(tiny_bert_dir, corpus, out, dims=8, epochs=30, say=lambda _: None)
    assert facts["corpus_texts"] == len(set(SENTENCES)) and facts["dims"] == 8
    assert facts["val_cosine_loss_after"] <= facts["val_cosine_loss_before"]
    assert folder_spec(str(out)) == {"backend": "model2vec"}
    backend = load_backend(str(out), max_seq_length=32)
    vecs = backend.encode(SENTENCES[:6], 4)
    assert backend.dim == 8 and vecs.shape == (6, 8)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert json.loads((out / "config.json").read_text())["model_type"] == "model2vec"


def test_no_corpus_names_what_it_needs(tmp_path):
    from coe.routers.static_tune import collect_corpus

    with pytest.raises(ModelNotFoundError, match=r"does not exist; it needs routing/\*_train.csv"):
        collect_corpus(tmp_path / "missing")
    (tmp_path / "routing").mkdir()
    (tmp_path / "routing" / "mbpp_test.txt").write_text("only a test split\n")
    with pytest.raises(ModelNotFoundError, match="no corpus text found"):
        collect_corpus(tmp_path)


def test_prepare_without_a_corpus_says_how_to_give_one(monkeypatch, tmp_path):
    from coe.tools import models

    monkeypatch.delenv(models.CORPUS_ENV, raising=False)
    monkeypatch.setattr(models, "default_corpus", lambda: None)
    with pytest.raises(ModelNotFoundError, match=r"minilm-l6-m2v-tuned --corpus DIR` \(or set COE_CORPUS\)"):
        models.BUILDERS["minilm-l6-m2v-tuned"](tmp_path, models.Progress(quiet=True), corpus=None)


def test_prepare_all_builds_the_corpus_model_only_on_request(monkeypatch, capsys):
    """`coe models prepare` (no alias, as the set-up runs it) skips the corpus-tuned embedder: minutes
    of MiniLM over a corpus for a model that is not the default."""
    import argparse

    from coe import model_paths
    from coe.tools import models
    from coe.tools.cli.models import _prepare

    built = []
    spec = model_paths.BUILTIN["minilm-l6-m2v-tuned"]
    monkeypatch.setattr(model_paths, "BUILTIN", {spec.alias: spec})
    monkeypatch.setattr(model_paths, "is_prepared", lambda alias: False)
    monkeypatch.setattr(models, "prepare", lambda alias, **kw: built.append(alias))
    args = argparse.Namespace(aliases=[], corpus=None, force=False, no_verify=True, quiet=True)
    assert _prepare(args) == 0
    assert built == [] and "skipped (built on request" in capsys.readouterr().out
    _prepare(argparse.Namespace(**{**vars(args), "aliases": [spec.alias]}))
    assert built == [spec.alias]
