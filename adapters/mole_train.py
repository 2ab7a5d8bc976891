"""Fit MoLE gates on (prompt, answer) pairs: the model and the experts stay frozen."""

from __future__ import annotations

import random
import time

import torch

from coe.adapters.mole import MoLE


def train_gates(
    mole: MoLE,
    examples: list[tuple[list[int], int]],
    *,
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-2,
    balance_coef: float = 0.01,
    pad_id: int = 0,
    seed: int = 0,
    log=print,
) -> list[dict]:
    """Adam on the gates only; loss = answer-token cross-entropy + ``balance_coef`` × balance loss.

    ``examples`` are ``(token ids, number of trailing answer tokens)`` as made by
    :func:`coe.scoring.likelihood.encode_chat`. Returns one record per step
    (``{"step", "loss", "ce", "balance", "s"}``)."""
    from coe.adapters.experts.train import batches
    from coe.scoring.likelihood import collate

    for p in mole.model.parameters():
        p.requires_grad_(False)
    params = list(mole.gates.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    stream = batches(examples, batch_size, rng)
    history, t0 = [], time.time()
    for step in range(steps):
        ids, mask, labels, keep = collate(next(stream), pad_id)
        logits = mole(ids, mask, logits_to_keep=keep).logits  # [B, keep, V]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, -keep + 1 :].reshape(-1), ignore_index=-100
        )
        bal = mole.balance_loss()
        loss = ce + balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"step": step + 1, "loss": round(loss.item(), 4), "ce": round(ce.item(), 4),
               "balance": round(bal.item(), 4), "s": round(time.time() - t0, 1)}
        history.append(rec)
        log(f"step {rec['step']}/{steps} loss {rec['loss']} ce {rec['ce']} balance {rec['balance']} {rec['s']}s")
    for p in params:
        p.requires_grad_(False)
    return history
