"""The ingress logic: validate, route (or pin), admit, generate on the chosen expert's server, fall back.

:class:`CoEService` holds the live expert set (:class:`ExpertCatalog`: experts, router, registry,
server health), the per-expert admission queues and a :class:`coe.serving.api.backend.Backend`.
The FastAPI routes (``serving/api/routes.py``) are thin calls into it; registration lives in
``serving/api/admin.py``. Async methods run on the ingress's event loop; the router (CPU-bound
embedding) runs in a worker thread.

A request is checked whole before it is routed (``serving/api/validation.py``: 400 naming the
field), carries a deadline (``serving.request_timeout_s``: 504 past it), waits in its expert's
bounded queue (429 with ``Retry-After`` past it), and on an engine failure (503) is retried per
the fault policy on the next expert on a healthy server. Client errors never trigger a fallback.

Each try is one :class:`~coe.types.Dispatch` (:meth:`CoEService.dispatch`); below this module
there is one call, ``backend.stream(dispatch)``, and a whole answer is that stream joined here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from coe.config import CoEConfig, Expert, LoraExpert
from coe.errors import (
    AdapterError,
    EngineError,
    ExpertNotFoundError,
    ForbiddenError,
    InvalidRequestError,
    NotReadyError,
    ReplicaLostError,
    ServerDownError,
    UnauthorizedError,
    available,
)
from coe.routers.policy import SelectionPolicy
from coe.serving.api.admission import Admission, Deadline
from coe.serving.api.backend import Backend
from coe.serving.api.catalog import ExpertCatalog
from coe.serving.api.errors import as_coe_error
from coe.serving.api.live import LiveState
from coe.serving.api.models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    RouteRequest,
    RoutingInfo,
    new_id,
)
from coe.serving.api.sse import ChatChunks, EventStream, response_of
from coe.serving.api.tools import tools_for
from coe.serving.api.validation import (
    chat_logprobs,
    check_text,
    coe_options,
    refuse_unimplemented,
    sampling_params,
)
from coe.serving.deployments.spec import server_id_of
from coe.serving.engines.tokens import check_chat_flags
from coe.serving.metrics import ServiceMetrics
from coe.types import ChatMessage, Dispatch, GenerationOutput, GenerationRequest, SamplingParams

log = logging.getLogger("coe.serving")
ROUTED = "coe"
T = TypeVar("T")


class _AdapterFailed(EngineError):
    """A LoRA expert's adapter failed to load on its server during a request (its folder is gone):
    a 503 for that expert only, so the server's other experts may still take the request. Private
    to the ingress: :meth:`CoEService._public` maps it before it leaves."""


def key_digest(key: str | None) -> bytes | None:
    """The SHA-256 digest a key is kept as (None for no key). A plain hash suffices: the keys
    are random bearer tokens, not passwords, and the digest never leaves the process."""
    return None if key is None else hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def same_key(token: str, digest: bytes) -> bool:
    """Whether ``token`` is the key kept as ``digest``, in constant time (equal-length digests:
    neither the key's length nor its prefix leaks through timing)."""
    return hmac.compare_digest(key_digest(token), digest)


def query_text(messages) -> str:
    """The text the router sees: the last user message (all messages when there is none)."""
    users = [m.text() for m in messages if m.role == "user"]
    return users[-1] if users else "\n".join(m.text() for m in messages)


class CoEService:
    """Routes and serves chat requests; see the module docstring."""

    def __init__(self, config: CoEConfig, *, backend: Backend, router, registry=None,
                 base_dir: Path | None = None, experts: list[Expert] | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        s = config.serving
        self.config = config
        self.base_dir = base_dir
        self.backend = backend
        self.metrics = metrics or ServiceMetrics()
        self.catalog = ExpertCatalog(experts if experts is not None else config.experts,
                                     config_ids={e.id for e in config.experts}, router=router, registry=registry,
                                     down_retry_after_s=s.faults.down_retry_after_s)
        self.admission = Admission(s.admission, server_of=self._server_of)
        self.policy = SelectionPolicy.from_config(config.router.policy)
        self.live = LiveState(self.catalog, self.admission, backend)
        self.admin_lock = asyncio.Lock()
        # Keys come only from the environment (the config refuses inline ones) and are kept only
        # as digests: no plaintext in attributes, reprs or tracebacks.
        self._admin_digest = key_digest(os.environ.get(s.admin_key_env) or None)
        self._api_digest = key_digest(os.environ.get(s.api_key_env) or None)
        self._probe: asyncio.Task | None = None

    def _server_of(self, expert_id: str) -> str | None:
        """The server whose capacity a request to ``expert_id`` takes (None: an expert gone meanwhile)."""
        return self.catalog.server_of(expert_id) if expert_id in self.catalog else None

    @property
    def router(self):
        return self.catalog.router

    # ------------------------------------------------------------------ auth

    def check_admin(self, token: str | None) -> None:
        """401 without a Bearer token, 403 with a wrong one (or when no admin key is configured:
        ``$COE_ADMIN_KEY``, the variable named by ``serving.admin_key_env``, was unset at start)."""
        if not token:
            raise UnauthorizedError("the admin API needs `Authorization: Bearer <admin key>`")
        if self._admin_digest is None:
            raise ForbiddenError(
                f"no admin key is configured: set ${self.config.serving.admin_key_env} in the service's "
                "environment and restart it"
            )
        if not same_key(token, self._admin_digest):
            raise ForbiddenError("the admin key is wrong")

    def check_api(self, token: str | None) -> None:
        """Nothing when chat is open (``$COE_API_KEY``, the variable named by ``serving.api_key_env``,
        was unset at start); else 401 without a Bearer token, 403 with a wrong one."""
        if self._api_digest is None:
            return
        if not token:
            raise UnauthorizedError("this service needs `Authorization: Bearer <api key>`")
        if not same_key(token, self._api_digest):
            raise ForbiddenError("the api key is wrong")

    # ------------------------------------------------------------------ routing

    async def decide(self, model: str, messages, *, trace: bool = False) -> RoutingInfo:
        """Pin (``model`` is an expert id) or route (``model == 'coe'``). A routed request follows
        the policy's plan (:meth:`coe.routers.policy.SelectionPolicy.plan`) over the router's scores
        and the live state (:class:`LiveState`): it skips experts whose server is down (the
        next-best serving one, per ``serving.faults``) and, with ``router.policy.load_weight``,
        weighs each expert's expected wait. ``trace``: the plan goes into ``info.candidates``."""
        self._ensure_probe()
        if model != ROUTED:
            if model not in self.catalog:
                raise ExpertNotFoundError(
                    f"unknown model {model!r}; available: {ROUTED} (routed), {available(self.catalog.ids())}",
                    param="model",
                )
            info = RoutingInfo(expert=model, router="pinned", pinned=True)
            if trace:
                info.candidates = list(self.live.plan(self.policy, [model], {}).candidates)
            return info
        # concurrent queries share one embedding batch
        from coe.routers.microbatch import batcher_for

        text = query_text(messages) if messages else ""
        t0 = time.perf_counter()
        batcher = batcher_for(self.router, self.config.router, on_batch=self.metrics.routing_batch.observe)
        decision = await batcher.route(text)
        elapsed = time.perf_counter() - t0
        self.metrics.observe_routing(elapsed, cached=getattr(decision, "cached", False))
        info = RoutingInfo(expert=decision.expert, router=decision.router, scores=dict(decision.scores),
                           routing_ms=elapsed * 1000.0)
        default = self.config.router.default_expert
        routed = info.expert
        if routed not in self.catalog:  # a stale router choice: fall back to the general expert
            routed = default if default in self.catalog else self.catalog.ids()[0]
        # the router's choice leads unless the policy weighs load and the choice is its own pick on
        # the scores (the default expert of an unsure query stays first)
        head = routed if getattr(decision, "reason", "policy") != "policy" or not self.policy.load_weight else None
        plan = self.live.plan(self.policy, self.catalog.ids(), info.scores,
                              uncertainty=getattr(decision, "uncertainty", None), head=head, default=default)
        info._plan, info.expert = plan, plan.expert
        if trace:
            info.candidates = list(plan.candidates)
        if not self.catalog.serving(routed):
            # 'fail': 503 at once (on_experts) rather than another expert, unless it failed to load
            if self.config.serving.faults.on_server_down == "fail" and self.catalog.health.unavailable(routed) is None:
                info.expert = routed
            elif info.expert != routed:
                info.fallback_from = routed
        return info

    def _ranked(self, info: RoutingInfo, exclude=()) -> list[str]:
        """The serving experts of a routed request's plan, best first, without ``exclude``."""
        plan = info._plan
        return [] if plan is None else plan.ranked(exclude, usable=self.catalog.serving)

    async def route(self, req: RouteRequest) -> dict:
        check_text(req.model_dump())
        if req.query is None and not req.messages:
            raise InvalidRequestError("/v1/route needs `query` or non-empty `messages`", param="query")
        messages = req.messages or [ChatMessage(role="user", content=req.query)]
        info = await self.decide(req.model, messages, trace=True)
        return {"expert": info.expert, "router": info.router, "scores": info.scores,
                "pinned": info.pinned, "routing_ms": info.routing_ms,
                "candidates": [dataclasses.asdict(c) for c in info.candidates or []]}

    def model_card(self, model_id: str) -> ModelCard:
        """The card of ``coe`` or of one expert (ExpertNotFoundError 404 otherwise)."""
        if model_id == ROUTED:
            return ModelCard(id=ROUTED, kind="router", description="Routed to the best expert for each query")
        e = self.catalog.get(model_id)
        if e is None:
            raise ExpertNotFoundError(
                f"unknown model {model_id!r}; available: {ROUTED} (routed), {available(self.catalog.ids())}",
                param="model",
            )
        return ModelCard(id=e.id, kind=e.kind, base=getattr(e, "base", None), description=e.description)

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card(ROUTED)] + [self.model_card(eid) for eid in self.catalog.ids()])

    # ------------------------------------------------------------------ generation

    def sampling(self, req: ChatCompletionRequest) -> SamplingParams:
        """Every check of the request that needs no expert (400 naming the field)."""
        check_text(req.model_dump(exclude_none=True))
        check_chat_flags(req.messages, req.add_generation_prompt, req.continue_final_message)
        logprobs, prompt_logprobs = chat_logprobs(req)
        return sampling_params(req, self.config.serving, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def dispatch(self, expert_id: str, request: GenerationRequest, deadline: Deadline, *,
                 fallbacks: tuple[str, ...] = (), trace: tuple = ()) -> Dispatch:
        """The one request shape below the API: ``request`` (under a new request id) aimed at
        ``expert_id``, its server and adapter; chat messages get the expert's system prompt when
        they have none. Raises ExpertNotFoundError when the expert was removed meanwhile."""
        expert = self.catalog.get(expert_id)
        if expert is None:  # removed while the request was on its way
            raise ExpertNotFoundError(f"expert {expert_id!r} was removed; available: {available(self.catalog.ids())}")
        messages = list(request.messages) if request.messages is not None else None
        system = getattr(expert, "system_prompt", None)
        if messages is not None and system and not any(m.role == "system" for m in messages):
            messages.insert(0, ChatMessage(role="system", content=system))
        lora = isinstance(expert, LoraExpert)
        return Dispatch(request=dataclasses.replace(request, request_id=new_id(), messages=messages),
                        expert=expert_id, server_id=server_id_of(expert), adapter=expert_id if lora else None,
                        adapter_path=expert.adapter if lora else None, deadline=time.time() + deadline.left(),
                        fallbacks=fallbacks, trace=trace)

    def fallbacks(self, info: RoutingInfo) -> tuple[str, ...]:
        """Who takes ``info``'s request if its expert fails, best first: the expert's own
        ``fallback`` chain, then (routed requests) the plan's other healthy candidates, each
        followed by its own chain. :meth:`on_experts` walks them."""
        order: list[str] = []
        for head in [info.expert, *([] if info.pinned else self._ranked(info))]:
            while head is not None and head not in order:
                order.append(head)
                head = getattr(self.catalog.get(head), "fallback", None)
        return tuple(order[1:])

    def model_ref(self, expert_id: str) -> str | None:
        """The model an expert runs on (a LoRA's or mixture's base model's), None when unknown."""
        expert = self.catalog.get(expert_id)
        base = getattr(expert, "base", None)
        if base is not None:
            expert = self.catalog.get(base)
        return getattr(expert, "model", None)

    @staticmethod
    def chat_request(req: ChatCompletionRequest, sampling: SamplingParams, tools=None) -> GenerationRequest:
        """The engine's request; ``tools`` (the tool-call parser, None: no tools) renders ``req.tools``."""
        return GenerationRequest(request_id="", messages=list(req.messages), sampling=sampling,
                                 add_generation_prompt=req.add_generation_prompt,
                                 continue_final_message=req.continue_final_message,
                                 tools=req.tools if tools is not None else None)

    def _public(self, err: Exception, expert_id: str) -> Exception:
        """What the client sees: engine failures name the expert, not the engine's internals
        (those are logged), and carry Retry-After; other errors are already in the request's terms."""
        if not isinstance(err, EngineError):
            return err
        log.warning("expert %s could not answer: %s", expert_id, err.message)
        if isinstance(err, _AdapterFailed) or self.catalog.health.unavailable(expert_id) is not None:
            # (the reason, with its paths, is for the log and the admin API)
            why = "it failed to load on its server (an operator must fix or remove it)"
        elif isinstance(err, ServerDownError):
            why = "its server is down or restarting"
        elif isinstance(err, NotReadyError):
            why = "its engine is still loading"
        else:
            why = "its engine failed on this request"
        retry = getattr(err, "retry_after_s", None) or self.config.serving.faults.down_retry_after_s
        return ServerDownError(f"expert {expert_id!r} is unavailable: {why}; retry later or pick another model",
                               retry_after_s=retry)

    async def on_experts(self, info: RoutingInfo, request: GenerationRequest, deadline: Deadline, endpoint: str,
                         attempt: Callable[[Dispatch], Awaitable[T]]) -> T:
        """``attempt(dispatch)`` on ``info.expert``, then on the decision's :meth:`fallbacks` (the
        one fallback loop of plain and streamed requests): only after an engine failure (503),
        never after a client error nor, with ``serving.faults.on_server_down: fail``, after a
        server found down; the next is the first fallback not tried, serving now and not on a
        server that failed (unless only its adapter did). An expert whose server is down fails
        fast, and so does an unavailable one (its server failed to load it). Sets
        ``info.expert``/``info.fallback_from``; raises the public error when out of options."""
        fallbacks, trace = self.fallbacks(info), tuple(info.candidates or ())
        expert, tried, failed_servers, health = info.expert, [], set(), self.catalog.health
        while True:
            self.metrics.requests.labels(expert, endpoint).inc()
            wait = health.retry_after(expert)
            broken = health.unavailable(expert)
            try:
                if broken is not None:
                    raise ServerDownError(f"expert {expert} is unavailable: {broken}")
                if wait is not None:
                    raise ServerDownError(f"expert {expert} is marked down: {health.why(expert)}", retry_after_s=wait)
                self.live.dispatched(expert)
                result = await attempt(self.dispatch(expert, request, deadline, fallbacks=fallbacks, trace=trace))
                health.mark_up([expert])
                info.expert = expert
                return result
            except Exception as raw:
                err = as_coe_error(raw)
                if err is None:
                    raise
                if isinstance(err, AdapterError):  # not the client's doing: it names no adapter
                    err = _AdapterFailed(f"the adapter of expert {expert} failed to load: {err.message}")
                self.metrics.errors.labels(expert, err.code).inc()
                if isinstance(err, ServerDownError) and not isinstance(err, ReplicaLostError) and wait is None \
                        and broken is None and expert in self.catalog:
                    health.mark_down(self.catalog.on_server(self.catalog.server_of(expert)), err.message,
                                     err.retry_after_s)
                tried.append(expert)
                if expert in self.catalog and not isinstance(err, _AdapterFailed):
                    failed_servers.add(self.catalog.server_of(expert))
                retry = isinstance(err, EngineError) and not (
                    isinstance(err, ServerDownError) and self.config.serving.faults.on_server_down == "fail")
                nxt = next((e for e in fallbacks if retry and e not in tried and self.catalog.serving(e)
                            and self.catalog.server_of(e) not in failed_servers), None)
                if nxt is None:
                    raise self._public(err, expert) from None
                log.warning("expert %s failed (%s); retrying on %s", expert, err.code, nxt)
                self.metrics.fallbacks.labels(expert, nxt).inc()
                info.fallback_from, expert = info.fallback_from or expert, nxt

    async def _admit(self, req: ChatCompletionRequest, info: RoutingInfo | None, deadline: Deadline | None):
        """(deadline, sampling, routing info, tool-call parser or None) of a chat request:
        parameters validated, expert chosen (a tool-capable one when it asks for tools), unimplemented
        fields refused for that expert — before anything is queued. ``info``/``deadline``: see :meth:`chat`."""
        deadline = deadline or Deadline(self.config.serving.request_timeout_s)
        sampling = self.sampling(req)
        trace = coe_options(req.coe).trace
        if info is None:
            info = await self.decide(req.model, req.messages, trace=trace)
        elif not trace:   # a caller's decision made with the plan: the request did not ask to see it
            info = info.model_copy(update={"candidates": None})
        refuse_unimplemented(req, info.expert)
        tools = tools_for(req, info, model_ref=self.model_ref,
                          ranked=lambda: self._ranked(info))
        return deadline, sampling, info, tools

    async def chat(self, req: ChatCompletionRequest, *, info: RoutingInfo | None = None,
                   deadline: Deadline | None = None) -> ChatCompletionResponse:
        """A whole answer; raises CoEError (mapped to HTTP by the caller). Cancelling the call
        (the client went away) cancels the generation on the expert server.

        ``info``: the decision :meth:`decide` already made for this request (its model and
        messages), so the request is not routed again (recruit-and-aggregate decides first);
        ``deadline``: the request's deadline when it started earlier (default: from now). The
        latency metrics count from ``deadline.started``, so a decision made earlier is counted."""
        deadline, sampling, info, tools = await self._admit(req, info, deadline)
        out = await self.generate(info, self.chat_request(req, sampling, tools), deadline, "chat")
        return response_of(out, info, top_logprobs=sampling.logprobs, tools=tools)

    async def generate(self, info: RoutingInfo, request: GenerationRequest, deadline: Deadline,
                       endpoint: str) -> GenerationOutput:
        """``request``'s whole answer from ``info.expert`` (or a fallback, see :meth:`on_experts`):
        its stream joined, through the expert's admission queue, within ``deadline``; metrics
        recorded under ``endpoint``, latency from ``deadline.started``. Cancelling the call cancels
        the generation on the expert server."""

        async def attempt(dispatch: Dispatch) -> GenerationOutput:
            expert = dispatch.expert
            await self.admission.acquire(expert, deadline)
            queued = self.metrics.queue.labels(expert)
            queued.inc()
            try:   # read whole: the server sends the first delta, then the rest as one (Dispatch.hold_s)
                whole = dataclasses.replace(dispatch, hold_s=math.inf)
                return await deadline.run(joined(self.backend.stream(whole)))
            except asyncio.CancelledError:
                self.metrics.cancelled.labels(expert).inc()
                raise
            finally:
                queued.dec()
                self.admission.release(expert)

        out = await self.on_experts(info, request, deadline, endpoint, attempt)
        m = self.metrics
        m.add_tokens(info.expert, out.completion_tokens)
        m.latency.labels(info.expert).observe(time.perf_counter() - deadline.started)
        return out

    async def chat_stream(self, req: ChatCompletionRequest, *, info: RoutingInfo | None = None,
                          deadline: Deadline | None = None) -> tuple[RoutingInfo, EventStream]:
        """Start a streamed answer. Errors before the first token raise here (so the HTTP status
        can still say so); later ones end the stream with an error event. The returned stream
        yields SSE lines and ends with ``data: [DONE]``; ``aclose()`` (the client went away)
        cancels the generation and frees the expert's slot, whether or not it was iterated.
        ``info``, ``deadline``: as for :meth:`chat`."""
        deadline, sampling, info, tools = await self._admit(req, info, deadline)
        shape = ChatChunks(req, info, top_logprobs=sampling.logprobs, tools=tools)
        return info, await self.stream(info, self.chat_request(req, sampling, tools), deadline, "chat_stream", shape)

    async def stream(self, info: RoutingInfo, request: GenerationRequest, deadline: Deadline,
                     endpoint: str, shape) -> EventStream:
        """Start streaming ``request`` from ``info.expert`` (or a fallback): errors before the first
        token raise here; the returned :class:`EventStream` (SSE lines in ``shape``'s chunks) owns the
        generation and the admission slot (see :meth:`chat_stream`)."""

        async def attempt(dispatch: Dispatch):
            expert = dispatch.expert
            await self.admission.acquire(expert, deadline)
            upstream = self.backend.stream(dispatch)
            try:
                first = await deadline.run(upstream.__anext__())
            except StopAsyncIteration:
                first = None
            except BaseException:
                await _close(upstream)
                self.admission.release(expert)
                raise
            return upstream, first

        upstream, first = await self.on_experts(info, request, deadline, endpoint, attempt)
        self.metrics.ttft.labels(info.expert).observe(time.perf_counter() - deadline.started)
        return EventStream(info, shape, first, upstream, deadline=deadline, metrics=self.metrics,
                           public_error=lambda err: self._public(err, info.expert),
                           release=lambda: self.admission.release(info.expert))

    # ------------------------------------------------------------------ health

    def _ensure_probe(self) -> None:
        period = self.config.serving.faults.health_check_period_s
        if period > 0 and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop(period))

    async def _probe_loop(self, period: float) -> None:
        while True:
            try:
                await self.readiness()
            except Exception:  # a probe must never stop probing
                log.exception("health probe failed")
            await asyncio.sleep(period)

    async def close(self) -> None:
        """Stop the background health probe (and a read of the pool's state in flight)."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        await self.live.close()

    async def readiness(self) -> tuple[bool, dict[str, str | None]]:
        """(ready, per expert: None or why not). Ready when every expert of the config has loaded;
        an expert registered at runtime that its server failed to load (its adapter folder is
        gone, say) is reported with its reason but does not hold readiness: it stays removable
        (DELETE /v1/experts/{id}) and routing skips it. Updates the health state: an expert its
        server failed to load is unavailable, one not ready yet is marked down, a ready one up."""
        ids = self.catalog.ids()
        try:
            states = await asyncio.wait_for(self.backend.ready(), timeout=10)
        except Exception as err:  # noqa: BLE001
            return False, {eid: f"expert servers did not answer: {type(err).__name__}" for eid in ids}
        found = {eid: self._state(eid, states) for eid in ids}
        out = {eid: why for eid, (why, _) in found.items()}
        health = self.catalog.health
        health.set_unavailable({eid: why for eid, (why, failed) in found.items() if failed})
        for eid, why in out.items():
            self.metrics.ready.labels(eid).set(0 if why else 1)
            if why is None:
                health.mark_up([eid])
            elif health.unavailable(eid) is None:
                health.mark_down([eid], why)
        config_ids = self.catalog.config_ids
        ready = all(why is None or (eid not in config_ids and found[eid][1]) for eid, why in out.items())
        return ready, out

    def _state(self, expert_id: str, states: dict[str, str | None]) -> tuple[str | None, bool]:
        """(None or why not, whether its server reported that it failed to load). A LoRA expert
        its server does not report (registered at runtime, loaded on a replica's first request
        for it) is as ready as its base model; an expert no server reports is not loaded yet."""
        if expert_id in states:
            return states[expert_id], states[expert_id] is not None
        expert = self.catalog.get(expert_id)
        if isinstance(expert, LoraExpert) and expert.base in states:
            return states[expert.base], states[expert.base] is not None
        return "not loaded yet", False

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


async def joined(stream, until: Callable[[str], str | None] | None = None) -> GenerationOutput:
    """The whole answer of a stream of deltas; the stream is closed in every case (closing it before
    its last delta cancels the generation: the backends' contract, see ``Backend.stream``).

    ``until(text)``: called with the answer so far after each delta that is not the last; a falsy
    value reads on, a string stops reading there, and the output so far comes back with that
    string as its ``finish_reason``. Without ``until``, the stream is read to its end."""
    try:
        if until is None:
            return GenerationOutput.from_deltas([delta async for delta in stream])
        deltas, text = [], ""
        async for delta in stream:
            deltas.append(delta)
            text += delta.text
            if delta.finish_reason is None and (reason := until(text)):
                return dataclasses.replace(GenerationOutput.from_deltas(deltas), finish_reason=reason)
        return GenerationOutput.from_deltas(deltas)
    finally:
        await _close(stream)


async def _close(agen) -> None:
    with contextlib.suppress(Exception):  # closing after a failure: the first error is what matters
        await agen.aclose()
