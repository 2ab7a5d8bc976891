"""Tune a model2vec static embedder towards its teacher, the way tokenlearn / "potion" models are made.

A distilled model2vec model gives each token the teacher's embedding of that token alone; the
average of those is only a rough stand-in for the teacher's embedding of a whole text. Tuning
regresses the static model's (weighted) mean of token vectors onto the teacher's sentence
embeddings of a corpus of real texts (cosine loss), with model2vec's own trainer
(``model2vec.train.StaticModelForSimilarity``: the token table and per-token weights are trained,
no head). The targets are the teacher's unit embeddings projected onto their top ``dims``
principal axes (no centring, so the teacher's cosine geometry is kept; ``dims`` = the teacher's
width is a plain rotation), and the distilled token vectors, projected the same way, are the
starting point.

The corpus (:func:`collect_corpus`) is local text only, from training data only: the training
splits of ``../shared/data`` (RouterBench ``*_train`` prompts without their shared few-shot
header, GSM8K train questions and solution lines except the last :data:`GSM8K_HELDOUT` items,
MBPP tasks labelled ``train``) plus any ``*.txt`` file that is not a test split (one text per
line). Never in it, even where another source repeats them: the ``*_test`` splits, the GSM8K
*test* questions of RouteLLM's ``routellm_gsm8k_responses.csv``, and the held-out GSM8K train
items (the math expert never trains on them; ``bench/composition.py`` profiles and evaluates
the experts on them).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coe.errors import ModelNotFoundError
from coe.model_paths import CORPUS_LAYOUT

_CALC = re.compile(r"<<[^>]*>>")   # GSM8K's calculator annotations
# The last GSM8K train items are held out: the math expert's ``holdout``
# (adapters/experts/math/training_args.json), the probes bench/composition.py evaluates on.
GSM8K_HELDOUT = 500
GSM8K_TEST = "routing/routellm_gsm8k_responses.csv"   # RouteLLM's GSM8K eval: the GSM8K test questions


def _is_test(path: Path) -> bool:
    return "test" in path.stem.lower().split("_")


def _csv_prompts(path: Path) -> list[str]:
    import csv

    csv.field_size_limit(1 << 30)
    with path.open(newline="", encoding="utf-8") as fh:
        return [row["prompt"] for row in csv.DictReader(fh) if row.get("prompt")]


def _routerbench(path: Path) -> list[str]:
    """A RouterBench split's queries as routers embed them (shared few-shot header removed)."""
    from coe.routers.datasets import routing_texts, shared_prefix

    prompts = _csv_prompts(path)
    return routing_texts(prompts, shared_prefix(prompts))


def collect_corpus(root: Path, *, limit: int | None = None) -> list[str]:
    """Deduplicated texts under ``root`` (see the module docstring), in a deterministic order.

    ``limit`` keeps that many, chosen by hash (stable across runs). Raises
    :class:`ModelNotFoundError` naming the expected layout when ``root`` holds no usable text.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelNotFoundError(f"corpus folder {root} does not exist; it needs {CORPUS_LAYOUT}")
    texts: list[str] = []
    for path in sorted(root.glob("routing/*_train.csv")):
        texts += _routerbench(path)
    held_out: set[str] = set()
    gsm8k = root / "training" / "gsm8k_train.jsonl"
    if gsm8k.is_file():
        rows = [json.loads(line) for line in gsm8k.read_text(encoding="utf-8").splitlines() if line.strip()]
        cut = max(len(rows) - GSM8K_HELDOUT, 0)
        for i, row in enumerate(rows):
            lines = [row["question"]] + [_CALC.sub("", s) for s in row.get("answer", "").splitlines()
                                         if not s.startswith("####")]
            if i < cut:
                texts += lines
            else:
                held_out.update(t.strip() for t in lines)
    mbpp = root / "probes" / "mbpp.jsonl"
    if mbpp.is_file():
        rows = [json.loads(line) for line in mbpp.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts += [r["text"] for r in rows if r.get("split") == "train"]
    for path in sorted(root.rglob("*.txt")):
        if not _is_test(path):
            texts += path.read_text(encoding="utf-8").splitlines()
    # never a test split's or a held-out probe's text, even where another source repeats it
    held_out |= {t.strip() for p in sorted(root.glob("routing/*_test.csv")) for t in _routerbench(p)}
    if (root / GSM8K_TEST).is_file():
        held_out |= {t.strip() for t in _csv_prompts(root / GSM8K_TEST)}
    seen: dict[str, None] = {}
    for t in texts:
        t = t.strip()
        if t and t not in held_out:
            seen.setdefault(t, None)
    out = sorted(seen, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    if not out:
        raise ModelNotFoundError(f"no corpus text found under {root}; it needs {CORPUS_LAYOUT}")
    return out[:limit] if limit else out


def corpus_sha256(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def teacher_targets(teacher: Path, corpus: Path, *, max_seq_length: int, limit: int | None = None,
                    say=print) -> tuple[list[str], np.ndarray]:
    """The corpus texts (:func:`collect_corpus`) and the teacher's unit embeddings of them ``[N, D]``:
    what the embedders trained on local text learn to reproduce."""
    from coe.routers.embedders import load_backend

    texts = collect_corpus(corpus, limit=limit)
    say(f"embedding {len(texts):,} corpus texts from {corpus} with the teacher (once)")
    return texts, load_backend(str(teacher), max_seq_length=max_seq_length).encode(texts, 64)


@dataclass(frozen=True)
class TuneResult:
    """What tuning did, for the prepared folder's manifest."""

    dims: int
    texts: int
    val_texts: int
    val_loss_before: float   # mean cosine distance to the teacher's own embedding (its full space)
    val_loss_after: float    # of held-out corpus texts: comparable across ``dims``


def principal_axes(targets: np.ndarray, dims: int) -> np.ndarray:
    """The top ``dims`` principal axes of ``targets`` ``[N, D]`` as rows ``[dims, D]``."""
    from sklearn.decomposition import PCA

    if dims > min(targets.shape):
        raise ValueError(f"{dims} dims need at least {dims} texts and teacher width {dims}; got {targets.shape}")
    return PCA(n_components=dims, svd_solver="full", random_state=0).fit(targets).components_.astype(np.float32)


def tune(base, texts: list[str], targets: np.ndarray, *, dims: int, epochs: int = 10, val_share: float = 0.1,
         learning_rate: float = 1e-3, batch_size: int = 256, seed: int = 0):
    """Fit ``base`` (a model2vec ``StaticModel`` in the teacher's space) to ``targets`` ``[N, D]``.

    Returns ``(StaticModel of width dims, TuneResult)``. A ``val_share`` of ``texts`` (drawn with
    ``seed``) is held out from training: the trainer keeps the epoch with the lowest loss there.
    Deterministic for a given corpus, teacher and thread count.
    """
    import torch
    from model2vec.train import StaticModelForSimilarity

    if base.dim != targets.shape[1]:
        raise ValueError(f"base model width {base.dim} != teacher width {targets.shape[1]}: distil without PCA")
    axes = principal_axes(targets, dims)                                 # [dims, D]
    y = (targets @ axes.T).astype(np.float32)                            # [N, dims]
    vectors = torch.from_numpy(np.nan_to_num(base.embedding).astype(np.float32) @ axes.T)   # [V, dims]
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = max(1, int(len(texts) * val_share))
    val, train = order[:n_val], order[n_val:]
    model = StaticModelForSimilarity(
        vectors=vectors, tokenizer=base.tokenizer, n_layers=0, out_dim=dims, freeze_weights=False,
        normalize=True, max_length=base.max_length,
        token_mapping=None if base.token_mapping is None else base.token_mapping.tolist(),
        weights=None if base.weights is None else torch.from_numpy(base.weights),
    )
    x_val, y_val = [texts[i] for i in val], y[val]
    before = _cosine_loss(model.encode(x_val) @ axes, targets[val])    # mapped back: [n_val, D]
    model.fit([texts[i] for i in train], y[train], X_val=x_val, y_val=y_val, learning_rate=learning_rate,
              batch_size=batch_size, max_epochs=epochs, early_stopping_patience=3, device="cpu",
              random_seed=seed)
    after = _cosine_loss(model.encode(x_val) @ axes, targets[val])
    tuned = model.to_static_model()
    # the base's settings (model_type, normalize, ...) with this width: how loaders recognise the folder
    tuned.config = {**base.config, "hidden_dim": dims, "apply_pca": dims, "embedding_dtype": "float32",
                    "tuned_to_sentence_embeddings": True}
    return tuned, TuneResult(dims, len(train), len(val), before, after)


def _cosine_loss(pred: np.ndarray, y: np.ndarray) -> float:
    p = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
    t = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return float(np.mean(1.0 - np.sum(p * t, axis=1)))


def build_tuned(teacher: Path, corpus: Path, out: Path, *, dims: int, epochs: int = 10, limit: int | None = None,
                max_seq_length: int = 256, say=print) -> dict:
    """Distil ``teacher`` (a sentence-transformers folder) with model2vec, tune it on the texts under
    ``corpus`` and save it to ``out`` as a model2vec folder (``StaticModel.save_pretrained``) with
    the ``coe_embedder.json`` marker.

    Returns the facts for the manifest (corpus size and checksum, the held-out loss before/after).
    Raises :class:`ModelNotFoundError` when ``corpus`` holds no usable text.
    """
    from model2vec.distill import distill

    from coe.routers.embedders import MARKER

    texts, targets = teacher_targets(teacher, corpus, max_seq_length=max_seq_length, limit=limit, say=say)
    say("distilling the starting token table with model2vec")
    base = distill(model_name=str(teacher), pca_dims=None)
    say(f"tuning the token table to the teacher's sentence embeddings ({dims} dims, ≤ {epochs} epochs)")
    model, res = tune(base, texts, targets, dims=dims, epochs=epochs)
    model.save_pretrained(str(out))
    (Path(out) / MARKER).write_text(json.dumps({"backend": "model2vec"}, indent=2))
    return {"corpus_texts": len(texts), "corpus_sha256": corpus_sha256(texts), "dims": res.dims,
            "val_texts": res.val_texts, "val_cosine_loss_before": round(res.val_loss_before, 5),
            "val_cosine_loss_after": round(res.val_loss_after, 5)}
