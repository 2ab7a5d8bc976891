"""Log-probabilities in the HTTP shapes: OpenAI chat ``logprobs``, vLLM ``prompt_logprobs``, and the
legacy completions ``logprobs`` (``tokens, token_logprobs, top_logprobs, text_offset``).

The engines give :data:`coe.types.PositionLogprobs` (token id -> ``Logprob``: the chosen token
plus the N most likely); these pure functions shape them. A token's text is the engine's
``decoded_token``; ``bytes`` are its UTF-8 bytes (OpenAI's field).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from coe.types import PositionLogprobs


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list,
                                           description="The top_logprobs most likely tokens at this position.")


class ChoiceLogprobs(BaseModel):
    """OpenAI's ``choices[].logprobs`` of a chat answer: one entry per generated token."""

    content: list[TokenLogprob] | None = None


class PromptLogprob(BaseModel):
    """vLLM's prompt-logprob entry: ``rank`` 1 is the most likely token."""

    logprob: float
    rank: int
    decoded_token: str


class CompletionLogprobs(BaseModel):
    """The legacy completions ``choices[].logprobs`` (parallel lists, one entry per token)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


def _top(entry: PositionLogprobs, n: int) -> list[tuple[int, object]]:
    """The ``n`` most likely tokens of a position, most likely first."""
    return sorted(((t, e) for t, e in entry.items() if e.rank <= n), key=lambda te: te[1].rank)[:n]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs], top: int) -> ChoiceLogprobs:
    """OpenAI's chat ``logprobs`` for the generated ``token_ids`` with ``top`` alternatives each."""
    content = []
    for token, entry in zip(token_ids, entries):
        chosen = entry[token]
        content.append(TokenLogprob(
            token=chosen.decoded_token, logprob=chosen.logprob, bytes=_bytes(chosen.decoded_token),
            top_logprobs=[TopLogprob(token=e.decoded_token, logprob=e.logprob, bytes=_bytes(e.decoded_token))
                          for _, e in _top(entry, top)],
        ))
    return ChoiceLogprobs(content=content)


def prompt_logprobs_of(entries: list[PositionLogprobs | None]) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's response ``prompt_logprobs``: per prompt token None (the first) or token id (a string,
    as JSON keys are) -> ``{logprob, rank, decoded_token}``."""
    return [None if entry is None else
            {str(t): PromptLogprob(logprob=e.logprob, rank=e.rank, decoded_token=e.decoded_token)
             for t, e in entry.items()}
            for entry in entries]


def completion_logprobs(token_ids: list[int], entries: list[PositionLogprobs | None], texts: list[str], top: int,
                        offset: int = 0) -> CompletionLogprobs:
    """The legacy completions ``logprobs`` of ``token_ids`` (``texts``: each token's text; an entry
    None, the first prompt token's, gives null logprobs). ``text_offset`` counts characters of the
    joined token texts from ``offset``, as vLLM does."""
    out = CompletionLogprobs()
    for token, entry, text in zip(token_ids, entries, texts):
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry[token].logprob)
        tops = {e.decoded_token: e.logprob for _, e in _top(entry, top)}
        tops.setdefault(entry[token].decoded_token, entry[token].logprob)  # the chosen token too, as vLLM
        out.top_logprobs.append(tops)
    return out
