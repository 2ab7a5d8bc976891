"""Tuning a model2vec static embedder towards its teacher (``minilm-l6-m2v-tuned``), on a tiny BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.errors import ModelNotFoundError

WORDS = [
    "write", "a", "python", "function", "to", "find", "the", "first", "repeated", "character",
    "in", "given", "string", "baker", "made", "muffins", "and", "sold", "of", "them", "how",
    "many", "are", "left", "what", "is", "capital", "france", "list", "sum", "numbers", "eggs",
    "per", "day",
]
SENTENCES = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + i % 6)) for i in range(40)]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, width-32 random BERT with a word-piece tokenizer (sentence-transformers mean-pools it)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)])}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def test_tuning_fits_the_teacher_and_loads_as_an_embedder(tiny_bert_dir, tmp_path):
    from coe.routers.embedders import folder_spec, load_backend
    from coe.routers.static_tune import build_tuned

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
    from coe import models

    monkeypatch.delenv(models.CORPUS_ENV, raising=False)
    monkeypatch.setattr(models, "default_corpus", lambda: None)
    with pytest.raises(ModelNotFoundError, match=r"minilm-l6-m2v-tuned --corpus DIR` \(or set COE_CORPUS\)"):
        models.BUILTIN["minilm-l6-m2v-tuned"].build(tmp_path, models.Progress(quiet=True), corpus=None)


def test_prepare_all_builds_the_corpus_model_only_on_request(monkeypatch, capsys):
    """`coe models prepare` (no alias, as the set-up runs it) skips the corpus-tuned embedder: minutes
    of MiniLM over a corpus for a model that is not the default."""
    import argparse

    from coe import models
    from coe.cli.models import _prepare

    built = []
    spec = models.BUILTIN["minilm-l6-m2v-tuned"]
    monkeypatch.setattr(models, "BUILTIN", {spec.alias: spec})
    monkeypatch.setattr(models, "is_prepared", lambda alias: False)
    monkeypatch.setattr(models, "prepare", lambda alias, **kw: built.append(alias))
    args = argparse.Namespace(aliases=[], corpus=None, force=False, no_verify=True, quiet=True)
    assert _prepare(args) == 0
    assert built == [] and "skipped (built on request" in capsys.readouterr().out
    _prepare(argparse.Namespace(**{**vars(args), "aliases": [spec.alias]}))
    assert built == [spec.alias]
