"""OpenAI-compatible request/response models (pydantic), plus the admin and routing bodies.

Requests accept OpenAI's extra fields (``extra="allow"``) so unmodified clients work; fields
coe does not implement are refused with a 400 (``serving/api/validation.py``). Ranges are checked
there too (a 400 naming the field and the range), not here, because FastAPI reports schema errors as 422.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coe.profile_records import ProfileJob
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
        None, description="Served only by an expert whose chat template takes tools and whose tool calls coe parses "
                          "(none of the shipped ones): otherwise a 400 naming the expert, unless tool_choice is 'none'.")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="'none' is served (tools are not rendered); others need tools and a tool-capable expert.")


class RouteRequest(_Open):
    """``/v1/route``: either chat ``messages`` or a plain ``query``."""

    messages: list[ChatMessage] | None = None
    query: str | None = None
    model: str = "coe"


class RoutingInfo(BaseModel):
    """The extra ``coe`` field of a chat response: who answered and why."""

    expert: str
    router: str
    scores: dict[str, float] = Field(default_factory=dict)
    pinned: bool = False
    fallback_from: str | None = None
    routing_ms: float = 0.0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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
