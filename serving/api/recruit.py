"""Recruit and aggregate (Symbolic-MoE, Mixture-of-Agents): several experts answer one chat request.

A routed chat request that sends ``coe: {recruit: k, aggregate: "vote" | "<expert id>"}`` (or
any routed request, when ``router.policy.recruit`` sets ``k`` ≥ 2 and its ``when`` trigger fires)
is decided once (:meth:`CoEService.decide`); the first ``k`` healthy experts of the plan are asked
concurrently, each through the service's own per-expert chat path (a request pinned to the
expert, as ``model: "<expert id>"`` is: its admission queue, its server's batch, its fallback);
then

- ``vote``: the majority of the normalized final answers (:func:`coe.scoring.answers.vote`: choice
  letters, final numbers or folded text), ties to the higher predicted quality, then plan order;
  the response is the winning expert's full answer;
- ``<expert id>``: that expert gets the question and the k answers (:func:`aggregator_messages`)
  and writes the final answer. If it fails, the answers are voted on instead.

Usage and ``coe.cost`` are the sums over every call that answered (recruits and aggregator).
``coe`` names ``recruited``, ``failed`` (``{expert, error}``: left out of the vote),
``aggregate`` and, for a vote, ``votes``. When no recruited expert answers, the request is served
the usual single-expert way (routing, fallbacks) and ``coe.failed`` still names the recruits.
Streaming streams the aggregated answer: a vote's winner as chunks once every answer is in; an
aggregator's own stream. Bad options get a 400 naming ``coe.recruit``/``coe.aggregate``. A
request whose trigger does not fire is served by the single-expert path on the decision already
made (``service.chat(req, info=...)``): it is routed once. The whole request shares one deadline.

One path (:func:`answer`) serves both edges; an :class:`Edge` says only whether the answer leaves
whole or streamed. Uses only the service's public methods (``sampling``, ``decide``, ``chat``,
``chat_stream``). Runs on the ingress's event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from coe.errors import CoEError, InvalidRequestError, available
from coe.scoring.answers import normalize_answer, vote
from coe.serving.api.admission import Deadline
from coe.serving.api.models import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    DeltaMessage,
    RecruitFailure,
    RoutingInfo,
    Usage,
)
from coe.serving.api.service import ROUTED
from coe.serving.api.sse import sse
from coe.serving.api.validation import coe_options
from coe.types import ChatMessage

VOTE = "vote"
ORDER = ("choice", "number", "text")   # what ``answer: auto`` tries, in this order


@dataclass(frozen=True)
class Recruitment:
    """What one request recruits: ``k`` experts, aggregated by ``aggregate`` ('vote' or an expert id);
    ``when``/``threshold``: the config's trigger ('always' for a request that asks itself)."""

    k: int
    aggregate: str = VOTE
    answer: str = "auto"
    when: str = "always"
    threshold: float | None = None


def requested(service, req: ChatCompletionRequest) -> Recruitment | None:
    """The request's recruitment (its ``coe`` options over ``router.policy.recruit``), or None for
    a single-expert request. Raises InvalidRequestError (400) naming ``coe.recruit`` or
    ``coe.aggregate``: k outside 1..number of experts, an unknown aggregator, ``aggregate`` without
    recruiting, or recruiting with ``n`` > 1, ``tools`` or a pinned ``model``. The config's default
    applies to routed requests without tools only (a client that did not ask is served as usual)."""
    opts = coe_options(req.coe)
    cfg = service.config.router.policy.recruit
    ids = service.catalog.ids()
    if opts.recruit is not None and not 1 <= opts.recruit <= len(ids):
        raise InvalidRequestError(f"coe.recruit is {opts.recruit}; allowed: 1 to {len(ids)} (the number of experts)",
                                  param="coe.recruit")
    if opts.aggregate is not None and opts.aggregate != VOTE and opts.aggregate not in ids:
        raise InvalidRequestError(f"coe.aggregate is {opts.aggregate!r}; allowed: {VOTE} or an expert id: "
                                  f"{available(ids)}", param="coe.aggregate")
    k = opts.recruit if opts.recruit is not None else cfg.k
    if opts.aggregate is not None and opts.recruit is None and k < 2:
        raise InvalidRequestError("coe.aggregate needs coe.recruit of 2 or more (router.policy.recruit is off)",
                                  param="coe.aggregate")
    if k < 2:
        return None
    asked = opts.recruit is not None
    if not asked and (req.model != ROUTED or req.tools):
        return None
    if req.model != ROUTED:
        raise InvalidRequestError(f"coe.recruit needs model '{ROUTED}' (routed): model {req.model!r} pins one expert",
                                  param="coe.recruit")
    if req.n not in (None, 1):
        raise InvalidRequestError(f"coe.recruit cannot be combined with n = {req.n}: a recruited request gives one "
                                  "aggregated choice; leave n out", param="coe.recruit")
    if req.tools:
        raise InvalidRequestError("coe.recruit cannot be combined with tools: tool calls are not aggregated; leave "
                                  "tools out or recruit 1", param="coe.recruit")
    return Recruitment(k=k, aggregate=opts.aggregate or cfg.aggregate, answer=opts.answer or cfg.answer,
                       when="always" if asked else cfg.when, threshold=None if asked else cfg.threshold)


def recruits(candidates, rec: Recruitment) -> list[str]:
    """The experts to ask, best first: the first ``rec.k`` healthy candidates of the plan, or none
    when the trigger does not fire (``margin``: the first's predicted quality exceeds the second's
    by ``threshold`` or more; ``uncertainty``: the first's standard error is at most ``threshold``
    or unknown)."""
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        return []
    top = healthy[0]
    if rec.when == "uncertainty" and not (top.uncertainty is not None and top.uncertainty > rec.threshold):
        return []
    if rec.when == "margin":
        second = healthy[1] if len(healthy) > 1 else None
        if second is None or top.quality is None or second.quality is None \
                or top.quality - second.quality >= rec.threshold:
            return []
    return [c.expert for c in healthy[:rec.k]]


def answer_kind(texts) -> str:
    """The first of choice, number, text that every non-empty reply gives (text when none)."""
    given = [t for t in texts if t]
    for kind in ORDER[:-1]:
        if given and all(normalize_answer(t, kind) is not None for t in given):
            return kind
    return "text"


def pick(texts, quality, kind: str = "auto") -> tuple[int, str, list[str | None]]:
    """(index of the reply that wins the vote, the kind compared, the normalized answers).

    ``texts`` best first (plan order); ``quality``: predicted quality per reply (None: unknown,
    ranks last). The majority answer wins; ties go to the higher quality, then the earlier reply;
    the winner is its best supporter. When no reply gives an answer the first reply wins."""
    kind = answer_kind(texts) if kind == "auto" else kind
    normalized = [normalize_answer(t, kind) for t in texts]
    rank = [-math.inf if q is None else float(q) for q in quality]
    won = vote(normalized, rank)
    return (0 if won is None else won), kind, normalized


def aggregator_messages(messages, answers: list[str]) -> list[ChatMessage]:
    """The aggregator's conversation: ``messages`` with the last user message replaced by the
    question, the candidate ``answers`` and the instruction to write the best final answer
    (appended as a user message when there is none)."""
    messages = list(messages)
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    question = messages[last].text() if last is not None else ""
    shown = "\n\n".join(f"Answer {i}:\n{a.strip()}" for i, a in enumerate(answers, 1))
    prompt = (f"{question}\n\nHere are {len(answers)} candidate answers from different experts; some may be "
              f"wrong.\n\n{shown}\n\nCompare them and write the best final answer to the question.")
    if last is None:
        return messages + [ChatMessage(role="user", content=prompt)]
    messages[last] = ChatMessage(role="user", content=prompt)
    return messages


# ------------------------------------------------------------------ gathering the answers


@dataclass
class Gathered:
    """The recruited answers of one request (plan order) and what they cost."""

    info: RoutingInfo                     # the routed decision
    rec: Recruitment
    trace: bool
    deadline: Deadline                    # the request's, from before it was routed
    asked: list[str] = field(default_factory=list)          # the recruits, best first (none: the trigger did not fire)
    answers: list[ChatCompletionResponse] = field(default_factory=list)
    quality: list[float | None] = field(default_factory=list)
    asked_for: list[str] = field(default_factory=list)      # the recruited expert each answer stands for
    failed: list[RecruitFailure] = field(default_factory=list)
    usage: Usage = field(default_factory=lambda: Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0))
    cost: float = 0.0

    def add(self, response: ChatCompletionResponse, cost: float) -> None:
        self.usage = add_usage(self.usage, response.usage)
        self.cost += cost

    def coe(self, expert: str, aggregate: str, **extra) -> RoutingInfo:
        """The response's ``coe``: the routed decision with ``expert`` answering and the recruits named."""
        return self.info.model_copy(update={
            "expert": expert, "pinned": False, "fallback_from": None,
            "candidates": self.info.candidates if self.trace else None,
            "recruited": [a.model for a in self.answers], "failed": list(self.failed),
            "aggregate": aggregate, "cost": self.cost, **extra})


def add_usage(a: Usage, b: Usage | None) -> Usage:
    if b is None:
        return a
    return Usage(prompt_tokens=a.prompt_tokens + b.prompt_tokens,
                 completion_tokens=a.completion_tokens + b.completion_tokens,
                 total_tokens=a.total_tokens + b.total_tokens)


def pinned(req: ChatCompletionRequest, expert: str, **update) -> ChatCompletionRequest:
    """``req`` pinned to ``expert``, without coe options and unstreamed unless ``update`` says so."""
    return req.model_copy(update={"model": expert, "coe": None, "stream": False, "stream_options": None, **update})


def _cost(service, expert: str) -> float:
    e = service.catalog.get(expert)
    return float(e.cost) if e is not None else 0.0


async def gather(service, req: ChatCompletionRequest, rec: Recruitment) -> Gathered:
    """Decide once, then ask the recruited experts concurrently, each pinned, within the request's
    deadline. ``asked`` is empty when the trigger did not fire (nobody was asked; ``info`` is the
    decision the single-expert path then serves). A recruit that fails is named in ``failed``; so is
    one whose fallback answered for an expert that had already answered (one expert votes once)."""
    deadline = Deadline(service.config.serving.request_timeout_s)
    service.sampling(req)   # every check that needs no expert, before anything is generated
    info = await service.decide(req.model, req.messages, trace=True)
    got = Gathered(info=info, rec=rec, trace=coe_options(req.coe).trace, deadline=deadline,
                   asked=recruits(info.candidates or [], rec))
    if not got.asked:
        return got
    quality = {c.expert: c.quality for c in info.candidates}
    for e in got.asked:
        service.metrics.recruited.labels(e, "answer").inc()
    results = await deadline.run(asyncio.gather(
        *(service.chat(pinned(req, e), deadline=deadline) for e in got.asked), return_exceptions=True))
    for asked, res in zip(got.asked, results):
        if isinstance(res, BaseException):
            if not isinstance(res, CoEError):
                raise res
            got.failed.append(RecruitFailure(expert=asked, error=res.message))
            continue
        served = res.model
        got.add(res, _cost(service, served))
        if served != asked:
            already = served in [a.model for a in got.answers]
            got.failed.append(RecruitFailure(expert=asked, error=(
                f"it failed; its fallback {served!r} answered"
                + (", which had already answered (left out of the vote)" if already else " in its place"))))
            if already:
                continue
        got.answers.append(res)
        got.quality.append(quality.get(served))
        got.asked_for.append(asked)
    return got


def _voted(got: Gathered) -> ChatCompletionResponse:
    """The vote's response: the winner's whole answer, with the summed usage and the recruits named."""
    texts = [a.choices[0].message.content for a in got.answers]
    won, _, normalized = pick(texts, got.quality, got.rec.answer)
    winner = got.answers[won]
    coe = got.coe(winner.model, VOTE,
                  votes={a.model: n for a, n in zip(got.answers, normalized)})
    if winner.model != got.asked_for[won]:
        coe.fallback_from = got.asked_for[won]
    return winner.model_copy(update={"usage": got.usage, "coe": coe})


def _aggregator_request(req: ChatCompletionRequest, got: Gathered, edge: Edge) -> ChatCompletionRequest:
    texts = [a.choices[0].message.content or "" for a in got.answers]
    return pinned(req, got.rec.aggregate, messages=aggregator_messages(req.messages, texts), **edge.keep(req))


def _aggregated(got: Gathered, served: str) -> RoutingInfo:
    """The aggregator's ``coe`` (``served``: who wrote the answer, the aggregator or its own fallback)."""
    return got.coe(served, got.rec.aggregate, fallback_from=got.rec.aggregate if served != got.rec.aggregate else None)


def _aggregator_failed(got: Gathered, err: CoEError) -> None:
    got.failed.append(RecruitFailure(expert=got.rec.aggregate, error=f"aggregator: {err.message}; the answers "
                                                                      "were voted on instead"))


# ------------------------------------------------------------------ the two entry points


class Edge:
    """How one answer leaves: whole (:data:`PLAIN`, a :class:`ChatCompletionResponse`) or streamed
    (:data:`STREAM`, ``(routing info, SSE stream)``). :func:`answer` is the one recruit path; an
    edge only says how to ask the service and how to name the recruits in what comes back."""

    def keep(self, req: ChatCompletionRequest) -> dict:
        """What a request made on this request's behalf (the aggregator's) keeps of it."""
        return {}

    async def ask(self, service, req: ChatCompletionRequest, **kw):
        return await service.chat(req, **kw)

    def info(self, result) -> RoutingInfo:
        """Who answered ``result``, and why."""
        return result.coe

    def annotated(self, result, coe: RoutingInfo, usage: Usage):
        """``result`` (another answer) with ``coe`` in place of its own and ``usage`` added to its usage."""
        return result.model_copy(update={"usage": add_usage(usage, result.usage), "coe": coe})

    def whole(self, resp: ChatCompletionResponse, req: ChatCompletionRequest):
        return resp


class _Streamed(Edge):
    def keep(self, req):
        return {"stream": True, "stream_options": req.stream_options}

    async def ask(self, service, req, **kw):
        return await service.chat_stream(req, **kw)

    def info(self, result):
        return result[0]

    def annotated(self, result, coe, usage):
        return coe, Annotated(result[1], coe, usage)

    def whole(self, resp, req):
        return resp.coe, _chunks(resp, bool(req.stream_options and req.stream_options.include_usage))


PLAIN, STREAM = Edge(), _Streamed()


async def answer(service, req: ChatCompletionRequest, edge: Edge):
    """The chat answer through ``edge``, recruiting when the request or the config asks for it (else
    the service's single-expert path). A request that does not recruit (the trigger did not fire) is
    served on the decision already made: routed once. When no recruit answers, the single-expert
    path routes afresh (the failures changed the plan's health) and ``coe.failed`` names the
    recruits. A vote is the winner's whole answer (streamed as chunks once every answer is in); an
    aggregator's answer comes as it would alone, its ``coe`` naming the recruits and its usage the
    sums. Raises CoEError as the service does (errors before the first chunk, streamed); cancelling
    cancels every call."""
    rec = requested(service, req)
    if rec is None:
        return await edge.ask(service, req)
    got = await gather(service, req, rec)
    if not got.asked:
        return await edge.ask(service, req, info=got.info, deadline=got.deadline)
    if not got.answers:   # the usual single-expert path, its fallbacks included
        out = await edge.ask(service, req, deadline=got.deadline)
        return edge.annotated(out, _all_failed(service, got, edge.info(out)), got.usage)
    if rec.aggregate != VOTE:
        service.metrics.recruited.labels(rec.aggregate, "aggregate").inc()
        try:
            out = await got.deadline.run(edge.ask(service, _aggregator_request(req, got, edge),
                                                  deadline=got.deadline))
        except CoEError as err:
            _aggregator_failed(got, err)
        else:
            served = edge.info(out).expert
            got.cost += _cost(service, served)
            return edge.annotated(out, _aggregated(got, served), got.usage)
    return edge.whole(_voted(got), req)


async def chat(service, req: ChatCompletionRequest) -> ChatCompletionResponse:
    """The whole answer (see :func:`answer`)."""
    return await answer(service, req, PLAIN)


async def chat_stream(service, req: ChatCompletionRequest) -> tuple[RoutingInfo, AsyncIterator[str]]:
    """(routing info, SSE stream) as :meth:`CoEService.chat_stream` (see :func:`answer`)."""
    return await answer(service, req, STREAM)


def _all_failed(service, got: Gathered, info: RoutingInfo) -> RoutingInfo:
    """``info`` of the usual single-expert answer, naming the recruits that failed."""
    return info.model_copy(update={"recruited": [], "failed": list(got.failed), "aggregate": got.rec.aggregate,
                                   "cost": got.cost + _cost(service, info.expert)})


async def _chunks(resp: ChatCompletionResponse, include_usage: bool) -> AsyncIterator[str]:
    """A whole answer as OpenAI chat chunks: role (with ``coe``), content, finish, usage, [DONE]."""
    choice = resp.choices[0]

    def chunk(delta, finish=None, **kw) -> str:
        choices = [ChunkChoice(delta=delta, finish_reason=finish, logprobs=kw.pop("logprobs", None))] \
            if delta is not None else []
        return sse(ChatCompletionChunk(id=resp.id, created=resp.created, model=resp.model, choices=choices, **kw))

    yield chunk(DeltaMessage(role="assistant", content=""), coe=resp.coe)
    if choice.message.content or choice.logprobs is not None or resp.prompt_logprobs is not None:
        yield chunk(DeltaMessage(content=choice.message.content or ""), logprobs=choice.logprobs,
                    prompt_logprobs=resp.prompt_logprobs)
    yield chunk(DeltaMessage(), finish=choice.finish_reason)
    if include_usage:
        yield chunk(None, usage=resp.usage)
    yield "data: [DONE]\n\n"


class Annotated:
    """Another answer's :class:`EventStream` with its ``coe`` replaced by ``coe`` and ``usage``
    added to its usage chunk. Closing it closes the inner stream (which frees its slot), even
    when it was never iterated."""

    def __init__(self, events, coe: RoutingInfo, usage: Usage) -> None:
        self.events = events
        self.coe = coe.model_dump(mode="json", exclude_none=True)
        self.usage = usage

    def __aiter__(self) -> Annotated:
        return self

    async def __anext__(self) -> str:
        return self.rewrite(await self.events.__anext__())

    async def aclose(self) -> None:
        await self.events.aclose()

    def rewrite(self, text: str) -> str:
        out = []
        for event in text.split("\n\n"):
            if not event.startswith("data: {"):
                out.append(event)
                continue
            obj = json.loads(event[len("data: "):])
            if obj.get("coe") is not None:
                obj["coe"] = self.coe
            if obj.get("usage") is not None:
                obj["usage"] = add_usage(self.usage, Usage(**obj["usage"])).model_dump()
            out.append("data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
        return "\n\n".join(out)
