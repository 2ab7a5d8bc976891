"""Helpers for the engine tests (a module, not the conftest: test folders are not packages)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path

from coe.types import ChatMessage, GenerationRequest, SamplingParams


class LoopThread:
    """An asyncio loop running forever on a daemon thread; ``run`` waits for a coroutine.

    vLLM's ``AsyncLLM`` binds to the loop that first uses it, so every engine call in these
    tests goes through one long-lived loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-tests-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def chat(text: str, *, max_tokens: int = 16, temperature: float = 0.0, adapter: str | None = None, **kw):
    """A one-message chat request (greedy by default)."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, **kw)
    return GenerationRequest(
        request_id="t", messages=[ChatMessage(role="user", content=text)], sampling=sampling, adapter=adapter
    )


def make_lora(*args, **kwargs):
    """``make_lora`` of the shared tests/conftest.py (loaded by path)."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("coe_shared_conftest_engines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_lora(*args, **kwargs)
