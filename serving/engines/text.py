"""Incremental text output for the in-process engines (transformers, pool, mixture).

``TextStream`` turns the growing list of generated ids into text deltas: it detokenises
incrementally (a multi-byte character split over tokens is held back until complete) and
applies stop strings (the stop string and anything after it never reach the caller).
"""

from __future__ import annotations


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
