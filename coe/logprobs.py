"""Log-probabilities from logits: the one place the engines and the likelihood scorers compute them.

Values are ``log_softmax`` of the raw logits in float32 (before temperature and top-p), the way
vLLM reports them by default (``logprobs_mode="raw_logprobs"``). ``rank`` is 1 + the number of
tokens strictly more likely than the chosen one. torch is imported by the caller's tensors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coe.types import Logprob, PositionLogprobs


def teacher_forced(logits, targets):
    """Log-probability of each ``targets`` token under ``logits``: ``[..., V]`` and ``[...]`` ->
    ``[...]`` (float32). Shared by the likelihood scorers and the engines' prompt logprobs."""
    import torch

    logp = torch.log_softmax(logits.float(), -1)  # [..., V]
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def position_logprobs(logits, chosen: Sequence[int], n: int, decode: Callable[[int], str]) -> list[PositionLogprobs]:
    """One :data:`PositionLogprobs` per row of ``logits`` (``[P, V]``): the ``chosen[p]`` token
    and the ``n`` most likely tokens, each with its log-probability, rank and decoded text."""
    import torch

    logp = torch.log_softmax(logits.float(), -1)  # [P, V]
    ids = torch.as_tensor(list(chosen), dtype=torch.long, device=logp.device)  # [P]
    chosen_lp = logp.gather(-1, ids.unsqueeze(-1))  # [P, 1]
    ranks = (logp > chosen_lp).sum(-1) + 1  # [P]
    top_lp, top_ids = logp.topk(n, dim=-1)  # [P, n]
    chosen_lp, ranks = chosen_lp.squeeze(-1).tolist(), ranks.tolist()
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    out = []
    for p, token in enumerate(chosen):
        entry = {int(token): Logprob(chosen_lp[p], int(ranks[p]), decode(int(token)))}
        for rank, (tid, lp) in enumerate(zip(top_ids[p], top_lp[p]), start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, rank, decode(tid))
        out.append(entry)
    return out


def prompt_logprobs(logits, prompt_ids: Sequence[int], n: int, decode: Callable[[int], str]
                    ) -> list[PositionLogprobs | None]:
    """vLLM's ``prompt_logprobs`` of a prompt from its teacher-forced ``logits`` (``[T, V]``, one
    row per prompt token): ``None`` for the first token, then each token under the logits of
    the position before it."""
    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids)
    return [None, *position_logprobs(logits[:-1], prompt_ids[1:], n, decode)]


def token_decoder(tokenizer) -> Callable[[int], str]:
    """``id -> text`` of one token, as vLLM's ``decoded_token`` (special tokens kept)."""

    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return decode
