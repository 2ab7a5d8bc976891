"""Distil MiniLM into a shallower transformer: its first layers, trained to its sentence embeddings.

Layer pruning alone (keep MiniLM's first ``layers`` transformer layers) makes the embedder 2–6×
faster but moves its embeddings away from the teacher's. Distillation trains the pruned student
(all its weights, the token table included) to reproduce the teacher's mean-pooled, unit
sentence embeddings on a corpus of local text (cosine loss), the way TinyBERT-style task-agnostic
distillation and sentence-transformers' "model distillation" recipe do it.

The corpus and its targets are :func:`coe.routers.static_tune.teacher_targets`: local training text only, never a
``*_test`` split. A ``val_share`` of it (drawn with ``seed``) is held out: the epoch with the
lowest held-out loss is kept. The student is saved as a plain transformers folder (the
teacher's architecture with fewer layers) plus its tokenizer; ``coe models prepare``
(:mod:`coe.tools.models`) exports it to ONNX and quantises it like MiniLM itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coe.routers.static_tune import corpus_sha256, teacher_targets


@dataclass(frozen=True)
class DistilResult:
    """What distillation did, for the prepared folder's manifest."""

    layers: int
    texts: int
    val_texts: int
    epochs: int              # epochs run; the best one (lowest held-out loss) is kept
    val_loss_pruned: float   # mean cosine distance to the teacher, held-out texts, before training
    val_loss_after: float


def _batches(lengths: np.ndarray, idx: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``idx`` in batches of similar length (little padding), the batch order shuffled."""
    order = idx[np.argsort(lengths[idx], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class _Student:
    """The teacher's architecture cut to its first ``layers`` layers, mean-pooled and normalised."""

    def __init__(self, teacher: Path, layers: int, max_seq_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(teacher))
        model = AutoModel.from_pretrained(str(teacher), attn_implementation="eager")
        if not 1 <= layers <= model.config.num_hidden_layers:
            raise ValueError(f"layers must be 1..{model.config.num_hidden_layers}; got {layers}")
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
        self.model = model
        self.max_seq_length = max_seq_length

    def tokens(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                              return_tensors="pt")

    def embed(self, batch: dict):
        import torch

        h = self.model(**batch).last_hidden_state                        # [B, T, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)          # [B, T, 1]
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)          # [B, D]
        return torch.nn.functional.normalize(pooled, dim=-1)

    def loss(self, texts: list[str], targets: np.ndarray):
        import torch

        y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        return (1.0 - (self.embed(self.tokens(texts)) * y).sum(-1)).mean()

    def evaluate(self, texts: list[str], targets: np.ndarray, batch_size: int) -> float:
        import torch

        self.model.eval()
        total = 0.0
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                total += float(self.loss(texts[i : i + batch_size], targets[i : i + batch_size])) * len(
                    texts[i : i + batch_size])
        return total / max(len(texts), 1)


def distil(teacher: Path, texts: list[str], targets: np.ndarray, *, layers: int, epochs: int = 3,
           learning_rate: float = 2e-4, batch_size: int = 64, max_seq_length: int = 256, val_share: float = 0.05,
           seed: int = 0, say=print):
    """Train the ``layers``-layer student of ``teacher`` towards ``targets`` ``[N, D]`` (unit rows).

    Returns ``(student, DistilResult)``; the student holds the best epoch's weights.
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    student = _Student(teacher, layers, max_seq_length)
    order = rng.permutation(len(texts))
    n_val = max(1, int(len(texts) * val_share))
    val, train = order[:n_val], order[n_val:]
    x_val, y_val = [texts[i] for i in val], targets[val]
    lengths = np.array([len(ids) for ids in student.tokenizer(texts, truncation=True,
                                                               max_length=max_seq_length)["input_ids"]])
    before = best = student.evaluate(x_val, y_val, batch_size)
    say(f"{layers}-layer student: held-out cosine distance {before:.4f} before training")
    best_state = {k: v.clone() for k, v in student.model.state_dict().items()}
    opt = torch.optim.AdamW(student.model.parameters(), lr=learning_rate, weight_decay=0.01)
    steps = epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=steps, pct_start=0.06,
                                                anneal_strategy="linear")
    ran = 0
    for epoch in range(epochs):
        student.model.train()
        batches = _batches(lengths, train, batch_size, rng)
        for step, batch in enumerate(batches, 1):
            loss = student.loss([texts[i] for i in batch], targets[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % max(len(batches) // 5, 1) == 0 and step < len(batches):
                say(f"epoch {epoch + 1}/{epochs}: {step}/{len(batches)} batches, training loss {loss.item():.4f}")
        ran = epoch + 1
        val_loss = student.evaluate(x_val, y_val, batch_size)
        say(f"epoch {ran}/{epochs}: held-out cosine distance {val_loss:.4f}")
        if val_loss < best:
            best, best_state = val_loss, {k: v.clone() for k, v in student.model.state_dict().items()}
    student.model.load_state_dict(best_state)
    student.model.eval()
    return student, DistilResult(layers, len(train), len(val), ran, before, best)


def build_distilled(teacher: Path, corpus: Path, out: Path, *, layers: int, epochs: int = 3,
                    max_seq_length: int = 256, limit: int | None = None, say=print) -> dict:
    """Distil ``teacher`` (a sentence-transformers MiniLM folder) into its first ``layers`` layers
    on the texts under ``corpus``; save the student (transformers folder + tokenizer) to ``out``.

    Returns the facts for the manifest. Raises :class:`coe.errors.ModelNotFoundError` when
    ``corpus`` holds no usable text.
    """
    texts, targets = teacher_targets(teacher, corpus, max_seq_length=max_seq_length, limit=limit, say=say)
    student, res = distil(teacher, texts, targets, layers=layers, epochs=epochs, max_seq_length=max_seq_length,
                          say=say)
    out = Path(out)
    student.model.save_pretrained(str(out))
    student.tokenizer.save_pretrained(str(out))
    for name in ("tokenizer.json", "vocab.txt"):      # the fast tokenizer's own files, as the teacher has them
        if (Path(teacher) / name).is_file():
            shutil.copy2(Path(teacher) / name, out / name)
    return {"corpus_texts": len(texts), "corpus_sha256": corpus_sha256(texts), "layers": res.layers,
            "epochs": res.epochs, "val_texts": res.val_texts,
            "val_cosine_loss_pruned": round(res.val_loss_pruned, 5),
            "val_cosine_loss_after": round(res.val_loss_after, 5)}
