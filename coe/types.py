"""Shared request/response types between the API, the router and the engines.

Below the API a request is one :class:`Dispatch`, tokenized once by the expert server's engine
(the ingress has no tokenizer for every expert; see :class:`Dispatch`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list | None = ""

    def text(self) -> str:
        """The message's text; OpenAI content parts of type 'text' are concatenated."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)


MAX_LOGPROBS = 20  # the most alternatives per position an engine returns (vLLM's default max_logprobs)


class JsonSchemaSpec(BaseModel):
    """OpenAI's ``response_format.json_schema``: a named JSON schema the answer must follow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="1 to 64 letters, digits, '_' or '-'.")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                        description="The JSON schema (an object); {} allows any JSON.")
    strict: bool | None = Field(None, description="Accepted; the answer always follows the schema (guided decoding).")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (JSON following ``json_schema.schema``), enforced by guided decoding."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed only with it")
        return self


class SamplingParams(BaseModel):
    """Sampling options common to every engine."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=4, description="Up to 4 non-empty stop strings."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling seed, 0 to 2^63-1.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Log-probabilities of the generated tokens: None = off; N = the sampled token plus the N most likely.",
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Log-probabilities of the prompt tokens (vLLM's prompt_logprobs): None = off; N as for logprobs.",
    )
    response_format: ResponseFormat | None = Field(
        None, description="Constrain the answer to JSON (guided decoding); None or type 'text': unconstrained.",
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, as the client asked for it: either chat ``messages`` or a raw ``prompt``.

    Chat rendering (vLLM's extra chat fields): ``add_generation_prompt`` appends the assistant
    turn's opening; ``continue_final_message`` leaves the last (assistant) message open so the
    model continues it (the two are exclusive). ``prompt_token_ids`` is a prompt given as token
    ids (the completions endpoint); it wins over ``prompt`` and ``messages``. ``tools``: OpenAI
    function tools the chat template renders (``apply_chat_template(tools=...)``); None: none.
    Who serves it is not part of it: that is the :class:`Dispatch`'s.
    """

    request_id: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    prompt_token_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Dispatch:
    """One generation, decided once and carried unchanged to the engine: the request below the API.

    The ingress (``CoEService.dispatch``) builds it after routing: ``request`` (with the expert's
    system prompt), the ``expert`` and its ``server_id``, the LoRA ``adapter`` (the name the
    engine knows it by: the expert id; None for the base model) and its ``adapter_path``, the
    ``deadline`` (``time.time()`` by which the answer is due: wall clock, the server may be on
    another node), the ranked ``fallbacks`` (who comes next if this expert fails, best first:
    the expert's own ``fallback`` chain, then the routing plan's order) and the decision's
    ``trace`` (the plan's candidates, when asked for). Every layer below takes it whole in one
    call, ``stream(dispatch)``.

    Tokenized once, in the expert server: the ingress has no tokenizer for every expert (a
    model registered at runtime, the pool's per-expert tokenizers live with their engines), so
    the server has its engine fill ``prompt_token_ids`` (``Engine.prepare``: the chat template,
    the vocabulary and the context length checked, once) and the engine decodes those ids
    without tokenizing again. The one other binding a server makes is the adapter's name on a
    replica that loaded a runtime-registered LoRA under its multiplexed id.

    ``hold_s``: how long the expert server may hold the deltas after the first and send them
    joined as one (:meth:`StreamDelta.join`). The first delta always goes at once (time to first
    token). 0 (a client's stream): every delta as the engine gives it; ``math.inf`` (an answer read
    whole): the first delta, then the rest as one at the end, which spares the answer a hop per
    token between the processes (each costs CPU in both).
    """

    request: GenerationRequest
    expert: str | None = None
    server_id: str | None = None
    adapter: str | None = None
    adapter_path: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    deadline: float | None = None
    fallbacks: tuple[str, ...] = ()
    trace: tuple[Any, ...] = ()
    hold_s: float = 0.0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling


@dataclass
class Logprob:
    """One token's log-probability at one position (vLLM's ``Logprob``): ``rank`` 1 is the most likely."""

    logprob: float
    rank: int
    decoded_token: str


# One position: token id -> Logprob, holding the chosen (or prompt) token plus the top-N alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class GenerationOutput:
    """A finished generation. ``logprobs``: one entry per generated token when asked for;
    ``prompt_logprobs``: one entry per prompt token (None for the first), and
    ``prompt_token_ids`` the prompt as the engine tokenized it and ``prompt_token_texts`` each of
    those tokens decoded alone (as a logprob's ``decoded_token``; an echo needs the first one's
    text too, which ``prompt_logprobs`` does not carry), when asked for."""

    text: str
    finish_reason: Literal["stop", "length", "cancelled"] | str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_token_texts: list[str] | None = None

    @classmethod
    def from_deltas(cls, deltas: list[StreamDelta]) -> GenerationOutput:
        """The whole answer of a finished stream (:meth:`StreamDelta.join`). Raises ValueError for
        an empty list."""
        d = StreamDelta.join(deltas)
        return cls(text=d.text, finish_reason=d.finish_reason or "stop", prompt_tokens=d.prompt_tokens,
                   completion_tokens=d.completion_tokens, token_ids=d.token_ids, logprobs=d.logprobs,
                   prompt_logprobs=d.prompt_logprobs, prompt_token_ids=d.prompt_token_ids,
                   prompt_token_texts=d.prompt_token_texts)


@dataclass
class StreamDelta:
    """A piece of a streamed answer. The last delta has ``finish_reason`` and the usage counts.

    ``logprobs`` has one entry per id in ``token_ids`` when the request asked for them; the
    first delta carries ``prompt_logprobs``/``prompt_token_ids``/``prompt_token_texts`` when asked for."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_token_texts: list[str] | None = None

    @staticmethod
    def join(deltas: list[StreamDelta]) -> StreamDelta:
        """Consecutive deltas as one: text, ids and logprobs joined; the finish reason and usage of
        the last; the prompt's logprobs, ids and texts of the first that has them. Raises
        ValueError for an empty list."""
        if not deltas:
            raise ValueError("no deltas to join")
        last = deltas[-1]
        first_prompt = next((d for d in deltas if d.prompt_logprobs is not None or d.prompt_token_ids), None)
        asked = any(d.logprobs is not None for d in deltas)
        return StreamDelta(
            text="".join(d.text for d in deltas),
            token_ids=[t for d in deltas for t in d.token_ids],
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            logprobs=[p for d in deltas for p in (d.logprobs or [])] if asked else None,
            prompt_logprobs=first_prompt.prompt_logprobs if first_prompt else None,
            prompt_token_ids=first_prompt.prompt_token_ids if first_prompt else None,
            prompt_token_texts=first_prompt.prompt_token_texts if first_prompt else None,
        )
