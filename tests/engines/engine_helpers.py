"""Helpers for the engine tests."""

from __future__ import annotations

from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams
from tests.helpers import LoopThread, generate, generate_batch, make_lora  # noqa: F401  (re-exported for the engine tests)


def chat(text: str, *, max_tokens: int = 16, temperature: float = 0.0, adapter: str | None = None, **kw):
    """A one-message chat dispatch (greedy by default)."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, **kw)
    return Dispatch(GenerationRequest(request_id="t", messages=[ChatMessage(role="user", content=text)],
                                      sampling=sampling), adapter=adapter)


