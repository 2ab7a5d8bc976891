"""OpenAI's legacy ``POST /v1/completions``: a raw prompt (text or token ids), ``echo``, ``logprobs``.

The endpoint evaluation tools use against an OpenAI-compatible server (lm-evaluation-harness's
``local-completions`` scores a continuation with ``prompt: [[token ids]], echo: true, logprobs: 1,
max_tokens: 1``). The request goes through the same validation, routing (``model: "coe"``
routes on the prompt text; an expert id pins), admission, fallback and metrics as chat
(:class:`~coe.serving.api.service.CoEService`'s public methods); only the shapes differ.

One prompt per request (a list of two is a 400 naming ``prompt``), ``n`` 1, no ``suffix``, no
``best_of`` above 1. A prompt of token ids must pin an expert: ids belong to one tokenizer and the
router reads text. With ``echo`` the prompt's text comes first in ``text`` and, with ``logprobs``,
its tokens come first in ``logprobs`` (the first with null log-probabilities, as in vLLM).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coe.errors import InvalidRequestError
from coe.serving.api.admission import Deadline
from coe.serving.api.logprobs import CompletionLogprobs, completion_logprobs
from coe.serving.api.models import RoutingInfo, StreamOptions, Usage
from coe.serving.api.service import ROUTED
from coe.serving.api.sse import EventStream, sse, usage_of
from coe.serving.api.validation import (
    check_text,
    logprob_count,
    refuse_unimplemented,
    sampling_params,
)
from coe.types import ChatMessage, GenerationOutput, GenerationRequest, StreamDelta


class CompletionRequest(BaseModel):
    """OpenAI's legacy completion request (ranges checked in ``validation.py``: 400 naming the field;
    unknown fields are accepted, and refused there when they ask for something unimplemented)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field("coe", description="'coe' routes on the prompt text; an expert id pins that expert.")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, or token ids of the pinned expert's tokenizer; a list holds one prompt (more get a 400).")
    max_tokens: int | None = Field(None, description="1 to serving.max_tokens_limit.")
    temperature: float | None = Field(None, description="0 to 2; 0 is greedy.")
    top_p: float | None = Field(None, description="0 to 1; 0 is greedy.")
    stop: str | list[str] | None = Field(None, description="Up to 4 non-empty stop strings.")
    seed: int | None = Field(None, description="0 to 2^63-1.")
    n: int | None = Field(None, description="Only 1 is supported.")
    echo: bool = Field(False, description="Put the prompt before the completion in `text` (and in `logprobs`).")
    logprobs: int | None = Field(None, description="0 to 20: each token's log-probability plus the N most likely.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(None, description="Not supported: a suffix gets a 400.")
    best_of: int | None = Field(None, description="Only 1 is supported.")
    user: str | None = None
    presence_penalty: float | None = Field(None, description="-2 to 2; only 0 is supported (else 400).")
    frequency_penalty: float | None = Field(None, description="-2 to 2; only 0 is supported (else 400).")
    logit_bias: dict[str, Any] | None = Field(None, description="Not supported: a bias gets a 400.")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_completion_id())
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    coe: RoutingInfo | None = None


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def prompt_of(req: CompletionRequest) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of the one prompt; 400 naming ``prompt`` for none or several."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError(f"prompt holds {len(prompt)} prompts; allowed: one prompt per request",
                                      param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise InvalidRequestError("prompt is empty; give text or a list of token ids", param="prompt")
    return None, list(prompt)


def check(req: CompletionRequest) -> None:
    """The completions-only refusals (400 naming the field)."""
    if req.suffix is not None:
        raise InvalidRequestError("suffix is not supported (no insertion mode); leave it out", param="suffix")
    if req.best_of is not None and (isinstance(req.best_of, bool) or req.best_of != 1):
        raise InvalidRequestError(f"best_of is {req.best_of}; allowed: 1", param="best_of")


class CompletionText:
    """Turns engine output (a whole :class:`GenerationOutput` or successive :class:`StreamDelta` s)
    into completion ``text`` and ``logprobs``, adding the echoed prompt to the first piece and
    keeping ``text_offset`` running across pieces. One per request."""

    def __init__(self, prompt_text: str | None, *, echo: bool, top: int | None) -> None:
        self.prompt_text, self.echo, self.top = prompt_text, echo, top
        self.first, self.offset = True, 0

    def piece(self, out: GenerationOutput | StreamDelta) -> tuple[str, CompletionLogprobs | None]:
        text, logprobs = out.text, None
        if self.top is not None:
            logprobs = CompletionLogprobs()
        if self.first and self.echo:
            texts = out.prompt_token_texts or []
            prefix = self.prompt_text if self.prompt_text is not None else "".join(texts)
            if logprobs is not None and out.prompt_logprobs is not None:
                logprobs = completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, texts, self.top)
            text, self.offset = prefix + text, len(prefix)
        self.first = False
        if logprobs is not None and out.logprobs:
            texts = [entry[t].decoded_token for t, entry in zip(out.token_ids, out.logprobs)]
            more = completion_logprobs(out.token_ids, out.logprobs, texts, self.top, self.offset)
            self.offset += sum(map(len, texts))
            for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs, field).extend(getattr(more, field))
        return text, logprobs


class CompletionChunks:
    """Legacy completion chunks for :class:`EventStream`: text (and logprobs) pieces, the routing
    info on the first, a finish chunk, the usage chunk."""

    def __init__(self, req: CompletionRequest, info: RoutingInfo, shaper: CompletionText) -> None:
        self.info, self.shaper = info, shaper
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.id, self.created, self.sent_info = new_completion_id(), int(time.time()), False

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        info = None if self.sent_info else self.info
        self.sent_info = True
        return sse(CompletionResponse(id=self.id, created=self.created, model=self.info.expert, choices=choices,
                                      usage=usage, coe=info))

    def opening(self) -> None:
        return None

    def content(self, delta: StreamDelta) -> str:
        text, logprobs = self.shaper.piece(delta)
        return self._chunk([CompletionChoice(text=text, logprobs=logprobs)])

    def finish(self, delta: StreamDelta) -> str:
        return self._chunk([CompletionChoice(text="", finish_reason=delta.finish_reason)])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage=usage)


async def _admit(service, req: CompletionRequest):
    """(deadline, generation request, routing info, text shaper): every check before queueing."""
    deadline = Deadline(service.config.serving.request_timeout_s)
    check_text(req.model_dump(exclude_none=True))
    check(req)
    text, ids = prompt_of(req)
    top = logprob_count(req.logprobs, "logprobs")
    if ids is not None and req.model == ROUTED:
        raise InvalidRequestError(
            "a prompt of token ids needs a pinned model (an expert id): token ids belong to one tokenizer and "
            "the router reads text", param="model")
    # the echoed prompt's logprobs, or (token ids) its text, come from the engine's prompt pass
    prompt_logprobs = (top if top is not None else 0) if req.echo and (top is not None or ids is not None) else None
    sampling = sampling_params(req, service.config.serving, logprobs=top, prompt_logprobs=prompt_logprobs)
    info = await service.decide(req.model, [ChatMessage(role="user", content=text)] if text is not None else None)
    refuse_unimplemented(req, info.expert)
    request = GenerationRequest(request_id="", prompt=text, prompt_token_ids=ids, sampling=sampling)
    return deadline, request, info, CompletionText(text, echo=req.echo, top=top)


async def complete(service, req: CompletionRequest) -> CompletionResponse:
    """The whole completion (raises CoEError; cancelling cancels the generation)."""
    deadline, request, info, shaper = await _admit(service, req)
    out = await service.generate(info, request, deadline, "completions")
    text, logprobs = shaper.piece(out)
    return CompletionResponse(model=info.expert, usage=usage_of(out), coe=info,
                              choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=out.finish_reason)])


async def complete_stream(service, req: CompletionRequest) -> tuple[RoutingInfo, EventStream]:
    """A streamed completion (SSE, ``data: [DONE]`` last); errors before the first token raise here."""
    deadline, request, info, shaper = await _admit(service, req)
    stream = await service.stream(info, request, deadline, "completions_stream",
                                  CompletionChunks(req, info, shaper))
    return info, stream
