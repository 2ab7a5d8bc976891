"""Token sampling and incremental text output for the transformers engine.

``sample_token`` picks one token from one row's logits (greedy at temperature 0, otherwise
temperature + top-p with the request's own ``torch.Generator``). ``TextStream`` turns the
growing list of generated ids into text deltas: it detokenises incrementally (a multi-byte
character split over tokens is held back until complete) and applies stop strings (the stop
string and anything after it never reach the caller).
"""

from __future__ import annotations

from coe.types import SamplingParams


def make_generator(seed: int | None, device: str):
    """A per-request generator: seeded requests are reproducible, others draw a fresh seed."""
    import random

    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else random.getrandbits(63))
    return gen


def sample_token(logits, params: SamplingParams, generator) -> int:
    """One token id from ``logits`` ([V], any float dtype)."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


class TextStream:
    """Incremental detokenisation plus stop strings for one request.

    ``push(token_id)`` returns ``(delta_text, stopped)``; ``flush()`` returns the text held
    back at the end (a possible stop-string prefix). Not thread-safe; one per request.
    """

    CONTEXT = 5  # prompt tokens used as left context so the first word gets its leading space

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded answer so far
        self.sent = 0  # characters of self.text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                return self._take(end), True
            return self._take(len(self.text) - self._held_back()), False
        return self._take(len(self.text)), False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta

    def flush(self) -> str:
        return self._take(len(self.text))


def accept_token(row, token: int, eos: set[int]):
    """Append a sampled ``token`` to a decoding row and return the :class:`StreamDelta` to emit.

    ``row`` has ``generated`` (token list), ``text`` (:class:`TextStream`), ``params``
    (SamplingParams), ``prompt_ids`` and ``done``; ``done`` is set when the row finishes (EOS,
    a stop string, or ``max_tokens``). Shared by every engine's decode loop.
    """
    from coe.types import StreamDelta

    row.generated.append(token)
    finish = None
    if token in eos:
        text, finish = row.text.flush(), "stop"
    else:
        text, stopped = row.text.push(token)
        if stopped:
            finish = "stop"
        elif len(row.generated) >= row.params.max_tokens:
            text, finish = text + row.text.flush(), "length"
    row.done = finish is not None
    return StreamDelta(text=text, token_ids=[token], finish_reason=finish,
                       prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.generated))
