"""OpenAI-compatible request/response models (pydantic), plus the admin and routing bodies.

Requests accept OpenAI's extra fields (``extra="allow"``) so unmodified clients work; fields
coe does not implement are refused with a 400 (``serving/api/validation.py``). Ranges are checked
there too (a 400 naming the field and the range), not here, because FastAPI reports schema errors as 422.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from coe.profile_records import ProfileJob
from coe.routers.policy import Candidate, Plan
from coe.serving.api.logprobs import ChoiceLogprobs, PromptLogprob
from coe.types import ChatMessage


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """OpenAI's chat request. Ranges are checked by ``serving/api/validation.py`` (400 naming the
    field and the range), not here; fields coe does not implement are refused there, not ignored."""

    model: str = Field("coe", description="'coe' routes; an expert id pins that expert.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; at least one message.")
    max_tokens: int | None = Field(None, description="1 to serving.max_tokens_limit (deprecated by OpenAI).")
    max_completion_tokens: int | None = Field(None, description="Wins over max_tokens when both are set.")
    temperature: float | None = Field(None, description="0 to 2; 0 is greedy.")
    top_p: float | None = Field(None, description="0 to 1; 0 is greedy.")
    stop: str | list[str] | None = Field(None, description="Up to 4 non-empty stop strings.")
    seed: int | None = Field(None, description="0 to 2^63-1.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, description="Only 1 is supported.")
    user: str | None = None
    presence_penalty: float | None = Field(None, description="-2 to 2; only 0 is supported (else 400).")
    frequency_penalty: float | None = Field(None, description="-2 to 2; only 0 is supported (else 400).")
    logprobs: bool | None = Field(None, description="true: each generated token's log-probability in choices[].logprobs.")
    top_logprobs: int | None = Field(None, description="0 to 20 most likely tokens per position; needs logprobs: true.")
    prompt_logprobs: int | None = Field(
        None, description="vLLM's extra field, 0 to 20: the prompt tokens' log-probabilities in the response's "
                          "prompt_logprobs (null first, then token id -> {logprob, rank, decoded_token}: the prompt "
                          "token plus the N most likely).")
    add_generation_prompt: bool = Field(True, description="vLLM's extra field: open the assistant's turn after the messages.")
    continue_final_message: bool = Field(
        False, description="vLLM's extra field: leave the final (assistant) message open to continue or score it; "
                           "needs add_generation_prompt: false.")
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text' | 'json_object' | 'json_schema'} (json_schema: {name, schema, strict}): "
                          "JSON answers by guided decoding; anything else gets a 400.")
    tools: list[dict[str, Any]] | None = Field(
        None, description="OpenAI function tools ({type: 'function', function: {name, description, parameters}}), "
                          "rendered by the expert's chat template; served by an expert whose template takes tools in "
                          "a family coe parses (Hermes/Qwen's <tool_call>), else a 400 naming the expert (a routed "
                          "request goes to the best tool-capable expert instead), unless tool_choice is 'none'.")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="'auto' (the default with tools: the model may call tools) or 'none' (tools are not "
                          "rendered; plain text); 'required' and a named function get a 400 naming tool_choice.")
    coe: Any = Field(
        None, description="coe's own options, an object (checked by serving/api/validation.py, so that anything else, "
                          "an unknown key or a bad value gets a 400 naming it). {trace: true}: the response's coe "
                          "field carries the routing plan (candidates).")


class CoeOptions(BaseModel):
    """The ``coe`` object of a chat request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    trace: bool = Field(False, description="Add the routing plan (every candidate expert, best first, with its "
                                           "live state) to the response's coe field as candidates.")
    recruit: int | None = Field(
        None, description="Recruit and aggregate (serving/api/recruit.py): the k best experts of the plan answer "
                          "concurrently and their answers are aggregated; 1 turns router.policy.recruit off for this "
                          "request. 1 to the number of experts; routed requests (model 'coe') only.")
    aggregate: str | None = Field(
        None, description="How recruited answers become one: 'vote' (majority of the normalized final answers, "
                          "ties to the higher predicted quality) or an expert id (that expert writes the final "
                          "answer from the question and the candidates).")
    answer: Literal["auto", "choice", "number", "text"] | None = Field(
        None, description="What a vote compares: choice letters, final numbers or folded text; 'auto' takes the "
                          "first of those that every answer gives.")


class RouteRequest(_Open):
    """``/v1/route``: either chat ``messages`` or a plain ``query``."""

    messages: list[ChatMessage] | None = None
    query: str | None = None
    model: str = "coe"


class RecruitFailure(BaseModel):
    """A recruited expert (or aggregator) that gave no answer, and why, in the request's terms."""

    expert: str
    error: str


class RoutingInfo(BaseModel):
    """The extra ``coe`` field of a chat response: who answered and why."""

    expert: str
    router: str
    scores: dict[str, float] = Field(default_factory=dict)
    pinned: bool = False
    fallback_from: str | None = None
    routing_ms: float = 0.0
    candidates: list[Candidate] | None = Field(
        None, description="The routing plan, when the request asked for it (coe: {trace: true}): every candidate "
                          "expert, best first, with its predicted quality and uncertainty, cost, queue depth, "
                          "expected wait, residency (pooled experts) and health.")
    recruited: list[str] | None = Field(
        None, description="Recruit and aggregate: the experts whose answers were aggregated, best first.")
    failed: list[RecruitFailure] | None = Field(
        None, description="Recruit and aggregate: the recruited experts (or the aggregator) that did not answer.")
    aggregate: str | None = Field(None, description="Recruit and aggregate: 'vote' or the aggregator's id.")
    votes: dict[str, str | None] | None = Field(
        None, description="A vote: each recruited expert's normalized final answer (null: none found).")
    cost: float | None = Field(
        None, description="Recruit and aggregate: the summed configured cost of the experts that answered.")
    _plan: Plan | None = PrivateAttr(None)   # the plan the fallbacks follow (routed requests)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments, a JSON object encoded as a string (OpenAI's shape).")


class ToolCall(BaseModel):
    """One call of a tool the model made (OpenAI's ``tool_calls[]``)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCall):
    """A tool call in a streamed chunk: sent whole, once its closing tag has arrived."""

    index: int = Field(description="The call's position among this answer's tool calls.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer's text; null when the answer is only tool calls.")
    tool_calls: list[ToolCall] | None = Field(None, description="The tools the model called (finish_reason "
                                                                "'tool_calls'); null when it called none.")


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id())
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    coe: RoutingInfo
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    coe: RoutingInfo | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="On the first content chunk, when the request asked for prompt_logprobs.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "coe"
    kind: str = "router"
    base: str | None = None
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ExpertInfo(BaseModel):
    """An expert as the admin API lists it."""

    id: str
    kind: str
    source: Literal["config", "registry"]
    server: str
    ready: bool
    state: Literal["ready", "not_ready", "unavailable"] = Field(
        "ready", description="'ready': it serves; 'not_ready': loading, or its server is down for now; "
        "'unavailable': its server failed to load it (`error` says why): routing skips it until it loads, and "
        "one registered at runtime does not hold /readyz and can still be removed.",
    )
    error: str | None = None
    config: dict[str, Any]
    profile: ProfileJob | None = Field(None, description="The latest runtime profile: state, progress, error.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every answer that is not a success (OpenAI's error shape)."""

    error: ErrorDetail


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
