"""Teacher-forced answer tokens under a causal LM: chat encoding, batching, log-probabilities.

Shared by expert training (the loss covers the answer tokens) and the likelihood scorers
(``reference_nll``, ``choice``), so both see an answer exactly the same way: the user message
rendered with the model's own chat template (``add_generation_prompt``), followed by the
answer and the end-of-turn token. torch is imported inside the functions.

:class:`HFLikelihood` computes log-probabilities with transformers directly (optionally with
one :class:`~coe.adapters.multilora.MultiLoRA` adapter per row); a serving engine's prompt
logprobs can implement the same one-method protocol, :class:`Likelihood`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Likelihood(Protocol):
    def continuation_logprobs(self, items: Sequence[tuple[str, str]], adapters: Sequence[str | None] | None = None
                              ) -> list[list[float] | None]:
        """For each ``(user message, answer)``: the log-probability of every answer token (the
        closing end-of-turn token included), or None when it does not fit the context."""
        ...


def encode_chat(tok, query: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the chat-rendered ``query`` followed by ``answer`` + end-of-turn, and the number
    of trailing answer tokens."""
    prompt = tok.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer.strip() + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, len(a_ids)


def collate(batch: Sequence[tuple[list[int], int]], pad_id: int):
    """Left-pad a batch of (ids, answer length) -> ``input_ids, attention_mask, labels, keep``.

    Labels are -100 except on the answer tokens; ``keep`` = longest answer + 1 is the number of
    trailing positions whose logits are needed (call the model with ``logits_to_keep=keep``
    and compare ``logits[:, :-1]`` with ``labels[:, -keep + 1:]``)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    keep = max(n for _, n in batch) + 1
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for r, (ids, n) in enumerate(batch):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        mask[r, width - len(ids) :] = 1
        labels[r, width - n :] = torch.tensor(ids[-n:])
    return input_ids, mask, labels, keep


class HFLikelihood:
    """:class:`Likelihood` over a transformers causal LM (not thread-safe: one batch at a time).

    ``lora``: a MultiLoRA on ``model`` when ``adapters`` names per-row adapters (None = base).
    Items longer than ``max_len`` tokens give None."""

    def __init__(self, model, tok, *, lora: Any = None, batch_size: int = 8, max_len: int = 1024) -> None:
        self.model, self.tok, self.lora = model, tok, lora
        self.batch_size, self.max_len = batch_size, max_len

    def continuation_logprobs(self, items, adapters=None):
        import contextlib

        import torch

        from coe.logprobs import teacher_forced

        adapters = list(adapters) if adapters is not None else [None] * len(items)
        if len(adapters) != len(items):
            raise ValueError("adapters must name one adapter (or None) per item")
        if any(adapters) and self.lora is None:
            raise ValueError("per-row adapters need a MultiLoRA (lora=...)")
        enc = [encode_chat(self.tok, q, a) for q, a in items]
        out: list[list[float] | None] = [None] * len(items)
        # sort by length so that a batch pads little; results go back to their positions
        order = sorted((i for i, e in enumerate(enc) if len(e[0]) <= self.max_len), key=lambda i: len(enc[i][0]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            ids, mask, labels, keep = collate([enc[i] for i in idx], self.tok.pad_token_id)
            ctx = self.lora.batch([adapters[i] for i in idx]) if self.lora is not None else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [b, keep, V]
            tok_lp = teacher_forced(logits[:, :-1], labels[:, -keep + 1 :])  # [b, keep-1]
            for r, i in enumerate(idx):
                n = enc[i][1]
                out[i] = tok_lp[r, -n:].tolist()
        return out
