"""Response shaping: the plain chat response and the server-sent-event stream of a streamed one.

:class:`EventStream` turns an expert server's :class:`StreamDelta` s into OpenAI chunk events. It
owns what the stream holds (the upstream generation and the expert's admission slot) and frees
both exactly once, on ``aclose()`` or at the end, even when it is closed before it was iterated
(a client that left before the first byte was sent).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

from coe.errors import EngineError
from coe.serving.api.admission import Deadline
from coe.serving.api.errors import as_coe_error, error_body
from coe.serving.api.models import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    RoutingInfo,
    Usage,
    new_id,
)
from coe.serving.metrics import ServiceMetrics
from coe.types import GenerationOutput


def response_of(out: GenerationOutput, info: RoutingInfo) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        model=info.expert,
        choices=[Choice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)],
        usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    total_tokens=out.prompt_tokens + out.completion_tokens),
        coe=info,
    )


class EventStream:
    """An async iterator of SSE lines (``data: {...}\\n\\n``), ending with ``data: [DONE]``.

    Errors after the first token end the stream with an error event in the request's terms; the
    deadline ends it the same way. Not thread-safe (one event loop)."""

    def __init__(self, info: RoutingInfo, req, first, upstream, *, t0: float, deadline: Deadline,
                 metrics: ServiceMetrics, public_error: Callable[[Exception], Exception],
                 release: Callable[[], None]) -> None:
        self.info = info
        self._upstream = upstream
        self._release = release
        self._metrics = metrics
        self._closed = False
        self._finished = False
        metrics.queue.labels(info.expert).inc()
        self._gen = self._events(req, first, t0, deadline, public_error)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop: cancels the generation (when not finished) and frees the slot; idempotent."""
        if self._closed:
            return
        self._closed = True
        expert = self.info.expert
        try:
            await self._gen.aclose()
            with contextlib.suppress(Exception):  # closing after a failure
                await self._upstream.aclose()
        finally:
            self._metrics.queue.labels(expert).dec()
            if not self._finished:
                self._metrics.cancelled.labels(expert).inc()
            self._release()

    async def _events(self, req, first, t0: float, deadline: Deadline, public_error) -> AsyncIterator[str]:
        cid, created, expert, m = new_id(), int(time.time()), self.info.expert, self._metrics
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: DeltaMessage | None, finish=None, usage=None, coe=None) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=expert,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish)] if delta is not None else [],
                                    usage=usage, coe=coe)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        yield chunk(DeltaMessage(role="assistant", content=""), coe=self.info)
        delta, usage = first, None
        while delta is not None:
            if delta.text or delta.finish_reason is None:
                yield chunk(DeltaMessage(content=delta.text))
            if delta.finish_reason is not None:
                usage = Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                              total_tokens=delta.prompt_tokens + delta.completion_tokens)
                m.add_tokens(expert, delta.completion_tokens)
                yield chunk(DeltaMessage(), finish=delta.finish_reason)
                break
            try:
                delta = await deadline.run(self._upstream.__anext__())
            except StopAsyncIteration:
                break
            except Exception as raw:  # noqa: BLE001
                err = as_coe_error(raw) or EngineError(f"generation failed: {type(raw).__name__}")
                m.errors.labels(expert, err.code).inc()
                err = public_error(err)
                yield f"data: {json.dumps(error_body(err.message, type_=err.code, code=err.code))}\n\n"
                break
        if include_usage and usage is not None:
            yield chunk(None, usage=usage)
        yield "data: [DONE]\n\n"
        self._finished = True
        m.latency.labels(expert).observe(time.perf_counter() - t0)
