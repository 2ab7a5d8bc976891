"""Response shaping: the plain chat response and the server-sent-event stream of a streamed one.

:class:`EventStream` turns an expert server's :class:`StreamDelta` s into chunk events shaped by a
:class:`Chunks` (:class:`ChatChunks` here; the legacy completions' in ``completions.py``). It
owns what the stream holds (the upstream generation and the expert's admission slot) and frees
both exactly once, on ``aclose()`` or at the end, even when it is closed before it was iterated
(a client that left before the first byte was sent).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from pydantic import BaseModel

from coe.errors import EngineError
from coe.serving.api.admission import Deadline
from coe.serving.api.errors import as_coe_error, error_body
from coe.serving.api.logprobs import chat_logprobs, prompt_logprobs_of
from coe.serving.api.models import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    DeltaToolCall,
    RoutingInfo,
    ToolCall,
    Usage,
    new_id,
)
from coe.serving.api.tools import ToolCallParser, parse_tool_calls
from coe.serving.metrics import ServiceMetrics
from coe.types import GenerationOutput, StreamDelta


def usage_of(out: GenerationOutput | StreamDelta) -> Usage:
    return Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                 total_tokens=out.prompt_tokens + out.completion_tokens)


def tool_finish(finish_reason: str, called: bool) -> str:
    """``"tool_calls"`` when the model called a tool and stopped by itself; else its own reason."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def response_of(out: GenerationOutput, info: RoutingInfo, *, top_logprobs: int | None = None,
                tools: Callable[[], ToolCallParser] | None = None) -> ChatCompletionResponse:
    """The chat response; ``top_logprobs`` (the SamplingParams count, None = not asked) adds
    ``choices[].logprobs``; the output's prompt logprobs, when asked for, become ``prompt_logprobs``;
    ``tools`` (makes the parser of the expert's tool calls, None = no tools) splits the text into
    ``content`` and ``tool_calls``."""
    logprobs = None
    if top_logprobs is not None and out.logprobs is not None:
        logprobs = chat_logprobs(out.token_ids, out.logprobs, top_logprobs)
    content, calls = parse_tool_calls(tools, out.text) if tools is not None else (out.text, [])
    return ChatCompletionResponse(
        model=info.expert,
        choices=[Choice(message=AssistantMessage(content=content, tool_calls=calls or None),
                        finish_reason=tool_finish(out.finish_reason, bool(calls)), logprobs=logprobs)],
        usage=usage_of(out),
        coe=info,
        prompt_logprobs=prompt_logprobs_of(out.prompt_logprobs) if out.prompt_logprobs is not None else None,
    )


class Chunks(Protocol):
    """How an :class:`EventStream` shapes its events (chat chunks, legacy completion chunks)."""

    include_usage: bool

    def opening(self) -> str | None:
        """The first event before any token (None: none)."""

    def content(self, delta: StreamDelta) -> str:
        """The event(s) of a delta's text (and logprobs); "" when there is nothing to send yet."""

    def finish(self, delta: StreamDelta) -> str:
        """The event(s) carrying what is left and the finish reason."""

    def usage(self, usage: Usage) -> str:
        """The usage event (sent when ``include_usage``)."""


def sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


class ChatChunks:
    """OpenAI chat chunks: a role chunk with the routing info, content chunks (with logprobs and,
    on the first, vLLM's prompt_logprobs when asked for), a finish chunk, the usage chunk.

    With ``tools`` (makes the parser of the expert's tool calls) the text goes through a parser: text
    outside the calls streams as content, each call is one ``delta.tool_calls`` chunk once whole,
    and the finish reason is ``"tool_calls"`` after a call (see ``serving/api/tools.py``)."""

    def __init__(self, req, info: RoutingInfo, *, top_logprobs: int | None,
                 tools: Callable[[], ToolCallParser] | None = None) -> None:
        self.info, self.top = info, top_logprobs
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.id, self.created = new_id(), int(time.time())
        self.parser, self.calls = (tools() if tools is not None else None), 0

    def _chunk(self, delta: DeltaMessage | None, finish=None, **kw) -> str:
        choices = [ChunkChoice(delta=delta, finish_reason=finish, logprobs=kw.pop("logprobs", None))] \
            if delta is not None else []
        return sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.info.expert, choices=choices,
                                       **kw))

    def opening(self) -> str:
        return self._chunk(DeltaMessage(role="assistant", content=""), coe=self.info)

    def content(self, delta: StreamDelta) -> str:
        logprobs = chat_logprobs(delta.token_ids, delta.logprobs, self.top) \
            if self.top is not None and delta.logprobs is not None else None
        prompt = prompt_logprobs_of(delta.prompt_logprobs) if delta.prompt_logprobs is not None else None
        if self.parser is None:
            return self._chunk(DeltaMessage(content=delta.text), logprobs=logprobs, prompt_logprobs=prompt)
        return self._pieces(self.parser.feed(delta.text), logprobs=logprobs, prompt_logprobs=prompt)

    def finish(self, delta: StreamDelta) -> str:
        rest = self._pieces(self.parser.finish()) if self.parser is not None else ""
        return rest + self._chunk(DeltaMessage(), finish=tool_finish(delta.finish_reason, self.calls > 0))

    def _pieces(self, pieces: list[str | ToolCall], **first) -> str:
        """The chunks of a parser's pieces; the first carries ``first`` (logprobs), which get a
        chunk of their own when there is no piece to carry them."""
        events = []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                delta = DeltaMessage(tool_calls=[DeltaToolCall(index=self.calls, **piece.model_dump())])
                self.calls += 1
            else:
                delta = DeltaMessage(content=piece)
            events.append(self._chunk(delta, **first))
            first = {}
        if not events and any(v is not None for v in first.values()):
            events.append(self._chunk(DeltaMessage(), **first))
        return "".join(events)

    def usage(self, usage: Usage) -> str:
        return self._chunk(None, usage=usage)


class EventStream:
    """An async iterator of SSE lines (``data: {...}\\n\\n``), ending with ``data: [DONE]``.

    Errors after the first token end the stream with an error event in the request's terms; the
    deadline ends it the same way. Not thread-safe (one event loop)."""

    def __init__(self, info: RoutingInfo, shape: Chunks, first, upstream, *, deadline: Deadline,
                 metrics: ServiceMetrics, public_error: Callable[[Exception], Exception],
                 release: Callable[[], None]) -> None:
        self.info = info
        self._upstream = upstream
        self._release = release
        self._metrics = metrics
        self._closed = False
        self._finished = False
        metrics.queue.labels(info.expert).inc()
        self._gen = self._events(shape, first, deadline, public_error)

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

    async def _events(self, shape: Chunks, first, deadline: Deadline, public_error) -> AsyncIterator[str]:
        expert, m = self.info.expert, self._metrics
        opening = shape.opening()
        if opening is not None:
            yield opening
        delta, usage = first, None
        while delta is not None:
            if delta.text or delta.finish_reason is None or delta.logprobs or delta.prompt_logprobs is not None:
                event = shape.content(delta)
                if event:
                    yield event
            if delta.finish_reason is not None:
                usage = usage_of(delta)
                m.add_tokens(expert, delta.completion_tokens)
                yield shape.finish(delta)
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
        if shape.include_usage and usage is not None:
            yield shape.usage(usage)
        yield "data: [DONE]\n\n"
        self._finished = True
        m.latency.labels(expert).observe(time.perf_counter() - deadline.started)
