"""A small KV-cached decoding loop shared by the mixtures (X-LoRA, MoLE) and the mixture engine.

A *stepper* owns the model call(s) and the cache(s); this module owns the loop, the
positions of left-padded rows and sampling. ``stepper.forward(ids [B, T], mask [B, S]) ->
logits [B, V]`` runs the next ``T`` tokens (``S`` = all tokens so far, padding included) and
returns the last position's logits; ``stepper.reset()`` drops its caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch


class Stepper(Protocol):
    def reset(self) -> None: ...

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last ``new`` tokens of left-padded rows (as transformers' generate)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -new:]


def call_model(model, ids, mask, cache, **kw):
    """One cached forward of ``ids`` (the newest tokens) given the whole ``mask``."""
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(mask, ids.shape[1]),
        past_key_values=cache,
        use_cache=True,
        **kw,
    )


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next tokens ``[B]``: greedy when ``temperature == 0``, else temperature + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(
    stepper: Stepper,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_ids: set[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens [B], finished [B] bool)`` once per new token; stops when all rows finished.

    A row is finished after it emits one of ``eos_ids`` (that token is yielded, flagged);
    finished rows keep being fed ``pad_id`` so the batch stays rectangular."""
    stepper.reset()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    logits = stepper.forward(ids, mask)
    eos = torch.tensor(sorted(eos_ids)) if eos_ids else torch.empty(0, dtype=torch.long)
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        newly = torch.isin(tok, eos) & ~done
        yield tok, done | newly
        done = done | newly
        if bool(done.all()):
            return
        mask = torch.cat([mask, (~done).long().unsqueeze(1)], dim=1)
        logits = stepper.forward(tok.unsqueeze(1), mask)
