"""Fixtures for router tests: a tiny synthetic routing dataset embedded with the real MiniLM."""

from __future__ import annotations

import numpy as np
import pytest

MATH = [
    "What is {a} plus {b}?", "Compute {a} times {b}.", "A shop sells {a} apples for {b} dollars each; what is the total?",
    "Solve for x: x + {a} = {b}.", "What is {a} percent of {b}?", "Divide {b} by {a} and round the answer.",
]
CODE = [
    "Write a python function that returns the {a}th fibonacci number.", "Write a python function to sort a list of {b} strings.",
    "Write a function that reverses a string of length {a}.", "Implement binary search over a sorted list of {b} integers in python.",
    "Write a python function to check whether {a} is a prime number.", "Write a python class for a stack holding {b} items.",
]
CHAT = [
    "Tell me a fun fact about the number {a}.", "Write a short poem about autumn number {a}.",
    "Give me {a} tips for a job interview.", "What should I cook for dinner for {a} people?",
    "Describe a sunny beach in {a} sentences.", "Recommend {a} good books about history.",
]
MODELS = ["math-expert", "code-expert", "general"]
COSTS = np.array([2.0, 3.0, 1.0])


def synthetic_rows(n_per_kind: int = 12, seed: int = 0):
    """(queries, kinds, quality [N, 3], cost [N, 3]): each specialist is right on its own kind."""
    rng = np.random.default_rng(seed)
    queries, kinds = [], []
    for kind, templates in (("math", MATH), ("code", CODE), ("chat", CHAT)):
        for i in range(n_per_kind):
            t = templates[i % len(templates)]
            queries.append(t.format(a=int(rng.integers(2, 99)), b=int(rng.integers(2, 99))))
            kinds.append(kind)
    quality = np.zeros((len(queries), 3))
    for r, kind in enumerate(kinds):
        quality[r] = {"math": [1, 0, 0.3], "code": [0, 1, 0.3], "chat": [0.2, 0.2, 1]}[kind]
    quality = np.clip(quality + rng.normal(0, 0.05, quality.shape), 0, 1)
    return queries, kinds, quality, np.tile(COSTS, (len(queries), 1))


@pytest.fixture(scope="session")
def embedder(minilm_dir):
    from coe.routers.embedding import Embedder

    return Embedder(str(minilm_dir))


@pytest.fixture(scope="session")
def synthetic(embedder):
    """(train RoutingData, train embeddings, test RoutingData, test embeddings, test kinds)."""
    from coe.routers.datasets import RoutingData

    q, kinds, y, c = synthetic_rows(12, seed=0)
    tq, tkinds, ty, tc = synthetic_rows(4, seed=1)
    cats = kinds
    train = RoutingData(q, list(MODELS), y, c, source="synthetic-train", categories=cats)
    test = RoutingData(tq, list(MODELS), ty, tc, source="synthetic-test", categories=tkinds)
    return train, embedder.encode(q), test, embedder.encode(tq), tkinds


# a tiny BERT teacher for the embedders built from it (static tuning, layer distillation)
WORDS = [
    "write", "a", "python", "function", "to", "find", "the", "first", "repeated", "character",
    "in", "given", "string", "baker", "made", "muffins", "and", "sold", "of", "them", "how",
    "many", "are", "left", "what", "is", "capital", "france", "list", "sum", "numbers", "eggs",
    "per", "day",
]
TINY_SENTENCES = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + i % 6)) for i in range(40)]


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def tiny_sentences() -> list[str]:
    """40 short sentences over the tiny BERT's vocabulary."""
    return list(TINY_SENTENCES)
