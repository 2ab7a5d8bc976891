"""The ingress logic: route (or pin), generate on the chosen expert's server, retry on a fallback.

:class:`CoEService` holds the live expert set (config + registry), the online router and a
:class:`coe.serving.api.backend.Backend`. The FastAPI routes (``serving/api/routes.py``) are thin
calls into it; registration lives in ``serving/api/admin.py``. Async methods run on the
ingress's event loop; the router (CPU-bound embedding) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from coe.config import CoEConfig, Expert, LoraExpert, ModelExpert
from coe.errors import (
    CoEError,
    EngineError,
    ExpertNotFoundError,
    ForbiddenError,
    InvalidRequestError,
    UnauthorizedError,
    available,
)
from coe.serving.api.backend import Backend
from coe.serving.api.errors import as_coe_error, error_body
from coe.serving.api.models import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    RouteRequest,
    RoutingInfo,
    Usage,
    new_id,
)
from coe.serving.deployments.spec import server_id_of
from coe.serving.metrics import ServiceMetrics
from coe.types import GenerationRequest, SamplingParams

log = logging.getLogger("coe.serving")
ROUTED = "coe"


def query_text(messages) -> str:
    """The text the router sees: the last user message (all messages when there is none)."""
    users = [m.text() for m in messages if m.role == "user"]
    return users[-1] if users else "\n".join(m.text() for m in messages)


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class CoEService:
    """Routes and serves chat requests; see the module docstring."""

    def __init__(self, config: CoEConfig, *, backend: Backend, router, registry=None,
                 base_dir: Path | None = None, experts: list[Expert] | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.config = config
        self.base_dir = base_dir
        self.backend = backend
        self.router = router
        self.registry = registry
        self.metrics = metrics or ServiceMetrics()
        self.experts: dict[str, Expert] = {e.id: e for e in (experts if experts is not None else config.experts)}
        self.config_ids = {e.id for e in config.experts}
        self.admin_lock = asyncio.Lock()
        s = config.serving
        self.admin_key = s.admin_key or os.environ.get(s.admin_key_env) or None

    # ------------------------------------------------------------------ auth

    def check_admin(self, authorization: str | None) -> None:
        """401 without a Bearer token, 403 with a wrong one (or when no admin key is configured)."""
        token = bearer(authorization)
        if not token:
            raise UnauthorizedError("the admin API needs `Authorization: Bearer <admin key>`")
        if self.admin_key is None:
            raise ForbiddenError(
                f"no admin key is configured: set serving.admin_key or ${self.config.serving.admin_key_env}"
            )
        if not hmac.compare_digest(token.encode(), self.admin_key.encode()):
            raise ForbiddenError("the admin key is wrong")

    def check_api(self, authorization: str | None) -> None:
        key = self.config.serving.api_key
        if key is None:
            return
        token = bearer(authorization)
        if not token:
            raise UnauthorizedError("this service needs `Authorization: Bearer <api key>`")
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ForbiddenError("the api key is wrong")

    # ------------------------------------------------------------------ routing

    async def decide(self, model: str, messages) -> RoutingInfo:
        """Pin (``model`` is an expert id) or route (``model == 'coe'``)."""
        if model != ROUTED:
            if model not in self.experts:
                raise ExpertNotFoundError(
                    f"unknown model {model!r}; available: {ROUTED} (routed), {available(self.experts)}", param="model"
                )
            return RoutingInfo(expert=model, router="pinned", pinned=True)
        text = query_text(messages) if messages else ""
        t0 = time.perf_counter()
        decision = (await asyncio.to_thread(self.router.route, [text]))[0]
        elapsed = time.perf_counter() - t0
        self.metrics.routing.observe(elapsed)
        expert = decision.expert
        if expert not in self.experts:  # a stale router choice: fall back to the general expert
            expert = self.config.router.default_expert or next(iter(self.experts))
        return RoutingInfo(expert=expert, router=decision.router, scores=dict(decision.scores),
                           routing_ms=elapsed * 1000.0)

    async def route(self, req: RouteRequest) -> dict:
        if req.query is None and not req.messages:
            raise InvalidRequestError("/v1/route needs `query` or non-empty `messages`", param="query")
        from coe.types import ChatMessage

        messages = req.messages or [ChatMessage(role="user", content=req.query)]
        info = await self.decide(req.model, messages)
        return {"expert": info.expert, "router": info.router, "scores": info.scores,
                "pinned": info.pinned, "routing_ms": info.routing_ms}

    def models(self) -> ModelList:
        cards = [ModelCard(id=ROUTED, kind="router", description="Routed to the best expert for each query")]
        for e in self.experts.values():
            cards.append(ModelCard(id=e.id, kind=e.kind, base=getattr(e, "base", None), description=e.description))
        return ModelList(data=cards)

    # ------------------------------------------------------------------ generation

    def sampling(self, req: ChatCompletionRequest) -> SamplingParams:
        s = self.config.serving
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if max_tokens is None:
            max_tokens = s.max_tokens_default
        if not 1 <= max_tokens <= s.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is {max_tokens}; allowed: 1 to {s.max_tokens_limit}", param="max_tokens"
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=stop,
            seed=req.seed,
        )

    def _target(self, expert_id: str, req: ChatCompletionRequest, sampling: SamplingParams):
        expert = self.experts[expert_id]
        messages = list(req.messages)
        system = getattr(expert, "system_prompt", None)
        if system and not any(m.role == "system" for m in messages):
            from coe.types import ChatMessage

            messages.insert(0, ChatMessage(role="system", content=system))
        request = GenerationRequest(
            request_id=new_id(), messages=messages, sampling=sampling.model_copy(),
            adapter=expert_id if isinstance(expert, LoraExpert) else None, expert=expert_id,
        )
        adapter_path = expert.adapter if isinstance(expert, LoraExpert) else None
        return server_id_of(expert), request, adapter_path

    def _fallback(self, expert_id: str, err: CoEError, tried: list[str], routed: bool) -> str | None:
        """The expert to retry on after an engine failure: the expert's ``fallback``; for routed
        (not pinned) requests, else the router's ``default_expert``. None: give up (503)."""
        nxt = self.experts[expert_id].fallback
        if nxt is None and routed:
            nxt = self.config.router.default_expert
        if isinstance(err, EngineError) and nxt and nxt in self.experts and nxt not in tried:
            log.warning("expert %s failed (%s); retrying on fallback %s", expert_id, err, nxt)
            self.metrics.fallbacks.labels(expert_id, nxt).inc()
            return nxt
        return None

    async def _timed(self, awaitable, expert_id: str):
        """``awaitable`` within ``serving.request_timeout_s``; a timeout is an EngineError (503)."""
        timeout = self.config.serving.request_timeout_s
        try:
            return await asyncio.wait_for(awaitable, timeout=timeout)
        except TimeoutError:
            raise EngineError(f"expert {expert_id!r} did not answer within {timeout:g} s") from None

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        """A whole answer; raises CoEError (mapped to HTTP by the caller)."""
        sampling = self.sampling(req)
        info = await self.decide(req.model, req.messages)
        expert, tried, t0 = info.expert, [], time.perf_counter()
        while True:
            self.metrics.requests.labels(expert, "chat").inc()
            queued = self.metrics.queue.labels(expert)
            queued.inc()
            try:
                served = await self._timed(self.backend.generate(*self._target(expert, req, sampling)), expert)
                break
            except Exception as raw:
                err = as_coe_error(raw)
                if err is None:
                    raise
                self.metrics.errors.labels(expert, err.code).inc()
                tried.append(expert)
                nxt = self._fallback(expert, err, tried, routed=not info.pinned)
                if nxt is None:
                    raise err from None
                info.fallback_from, expert = info.fallback_from or expert, nxt
            finally:
                queued.dec()
        out = served.output
        info.expert = expert
        m = self.metrics
        m.batch.labels(expert).observe(served.batch_size)
        m.add_tokens(expert, out.completion_tokens)
        m.latency.labels(expert).observe(time.perf_counter() - t0)
        return ChatCompletionResponse(
            model=expert,
            choices=[Choice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)],
            usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                        total_tokens=out.prompt_tokens + out.completion_tokens),
            coe=info,
        )

    async def chat_stream(self, req: ChatCompletionRequest) -> tuple[RoutingInfo, AsyncIterator[str]]:
        """Start a streamed answer. Errors before the first token raise here (so the HTTP status
        can still say so); later ones end the stream with an error event. The returned iterator
        yields SSE lines and ends with ``data: [DONE]``; closing it cancels the generation."""
        sampling = self.sampling(req)
        info = await self.decide(req.model, req.messages)
        expert, tried, t0 = info.expert, [], time.perf_counter()
        while True:
            self.metrics.requests.labels(expert, "chat_stream").inc()
            upstream = self.backend.stream(*self._target(expert, req, sampling))
            try:
                first = await self._timed(upstream.__anext__(), expert)
                break
            except StopAsyncIteration:
                first = None
                break
            except Exception as raw:
                await _close(upstream)
                err = as_coe_error(raw)
                if err is None:
                    raise
                self.metrics.errors.labels(expert, err.code).inc()
                tried.append(expert)
                nxt = self._fallback(expert, err, tried, routed=not info.pinned)
                if nxt is None:
                    raise err from None
                info.fallback_from, expert = info.fallback_from or expert, nxt
        info.expert = expert
        self.metrics.ttft.labels(expert).observe(time.perf_counter() - t0)
        return info, self._sse(info, req, first, upstream, t0)

    async def _sse(self, info: RoutingInfo, req, first, upstream, t0: float) -> AsyncIterator[str]:
        cid, created, expert = new_id(), int(time.time()), info.expert
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: DeltaMessage, finish=None, usage=None, coe=None) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=expert,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish)] if delta else [],
                                    usage=usage, coe=coe)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        self.metrics.queue.labels(expert).inc()
        finished = False
        try:
            yield chunk(DeltaMessage(role="assistant", content=""), coe=info)
            delta, usage = first, None
            while delta is not None:
                if delta.text or delta.finish_reason is None:
                    yield chunk(DeltaMessage(content=delta.text))
                if delta.finish_reason is not None:
                    usage = Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                                  total_tokens=delta.prompt_tokens + delta.completion_tokens)
                    self.metrics.add_tokens(expert, delta.completion_tokens)
                    yield chunk(DeltaMessage(), finish=delta.finish_reason)
                    break
                try:
                    delta = await upstream.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as raw:  # noqa: BLE001
                    err = as_coe_error(raw) or EngineError(f"generation failed: {type(raw).__name__}")
                    self.metrics.errors.labels(expert, err.code).inc()
                    yield f"data: {json.dumps(error_body(err.message, type_=err.code, code=err.code))}\n\n"
                    break
            if include_usage and usage is not None:
                c = ChatCompletionChunk(id=cid, created=created, model=expert, choices=[], usage=usage)
                yield f"data: {c.model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
            self.metrics.latency.labels(expert).observe(time.perf_counter() - t0)
        finally:
            self.metrics.queue.labels(expert).dec()
            if not finished:
                self.metrics.cancelled.labels(expert).inc()
            await _close(upstream)

    # ------------------------------------------------------------------ health

    async def readiness(self) -> tuple[bool, dict[str, str | None]]:
        """(ready, per expert: None or why not). Ready when every expert's engine has loaded."""
        try:
            states = await asyncio.wait_for(self.backend.ready(), timeout=10)
        except Exception as err:  # noqa: BLE001
            return False, {eid: f"expert servers did not answer: {type(err).__name__}" for eid in self.experts}
        out = {eid: states.get(eid, "not loaded yet") for eid in self.experts}
        for eid, why in out.items():
            self.metrics.ready.labels(eid).set(0 if why else 1)
        return all(v is None for v in out.values()), out

    async def refresh_gauges(self) -> None:
        """Scrape-time gauges: readiness per expert, batcher queue depth per server."""
        await self.readiness()
        try:
            stats = await asyncio.wait_for(self.backend.stats(), timeout=5)
        except Exception:  # noqa: BLE001  (a scrape must not fail because one server is slow)
            return
        for sid, st in stats.items():
            if "queue_depth" in st:
                self.metrics.server_queue.labels(sid).set(st["queue_depth"])

    def server_of(self, expert: Expert) -> str:
        return server_id_of(expert)

    def model_experts(self) -> list[str]:
        return sorted(e.id for e in self.experts.values() if isinstance(e, ModelExpert))


async def _close(agen) -> None:
    try:
        await agen.aclose()
    except Exception:  # noqa: BLE001  (closing after a failure)
        pass
