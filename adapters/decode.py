"""The one sampler, and a small KV-cached decoding loop for the mixtures (X-LoRA, MoLE).

:func:`sample` picks the next token from logits for every decoding path in coe: the serving
engines (per row, with the row's own generator) and :func:`decode` (per batch).

A *stepper* owns the model call(s) and the cache(s); :func:`decode` owns the loop, the
positions of left-padded rows and sampling. ``stepper.forward(ids [B, T], mask [B, S]) ->
logits [B, V]`` runs the next ``T`` tokens (``S`` = all tokens so far, padding included) and
returns the last position's logits; ``stepper.reset()`` drops its caches.

torch is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
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


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """Next token ids from ``logits`` ``[V]`` (returns a 0-d tensor) or ``[B, V]`` (returns ``[B]``).

    Greedy (argmax) when ``temperature == 0``; otherwise softmax at ``temperature``, restricted
    to the smallest set of most likely tokens whose mass reaches ``top_p`` (the most likely token
    always stays), drawn with ``generator`` (a ``torch.Generator`` on the logits' device, or None).
    """
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [..., V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_p, 1, generator=generator)  # [..., 1]
        return order.gather(-1, pick).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    finished rows keep being fed ``pad_id`` so the batch stays rectangular. Runs without
    autograd (only while the generator runs, as ``torch.no_grad`` does for generators)."""
    import torch

    loop = torch.no_grad()(_decode_loop)
    return loop(stepper, ids, mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, generator)


def _decode_loop(stepper, ids, mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, generator):
    import torch

    stepper.reset()
    dev = ids.device  # flags and EOS ids live with the batch (CPU or CUDA)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
    logits = stepper.forward(ids, mask)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev) if eos_ids else torch.empty(
        0, dtype=torch.long, device=dev)
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
