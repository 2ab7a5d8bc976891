"""Helpers for the engine tests."""

from __future__ import annotations

from coe.types import ChatMessage, GenerationRequest, SamplingParams
from tests.helpers import LoopThread, make_lora  # noqa: F401  (re-exported for the engine tests)


def chat(text: str, *, max_tokens: int = 16, temperature: float = 0.0, adapter: str | None = None, **kw):
    """A one-message chat request (greedy by default)."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, **kw)
    return GenerationRequest(
        request_id="t", messages=[ChatMessage(role="user", content=text)], sampling=sampling, adapter=adapter
    )


