"""Request validation at the boundary: every check a request passes before it is routed or joins a batch.

All functions raise :class:`coe.errors.InvalidRequestError` (HTTP 400) naming the field and what is
allowed, so a bad request never reaches an engine (where it could fail its batch-mates, count as an
engine failure or trigger a fallback). Pure functions; thread-safe.
"""

from __future__ import annotations

import math

from pydantic import ValidationError

from coe.config import ServingConfig
from coe.errors import InvalidRequestError
from coe.serving.api.models import CoeOptions
from coe.types import MAX_LOGPROBS, ResponseFormat, SamplingParams

SEED_MAX = 2**63 - 1
MAX_STOP = 4

# Request fields coe does not implement yet, with the value that means "not asked for". A request
# that asks for one is refused (400 naming the field and the expert), never silently ignored.
# When an engine implements one, remove it here and pass it on in :func:`sampling_params`.
UNIMPLEMENTED: dict[str, tuple] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}


def check_text(value, where: str = "body", *, allow_nul: bool = True) -> None:
    """Every string in ``value`` (nested dicts/lists) is valid Unicode: no lone surrogates
    (``"a\\ud800b"``), which tokenizers and UTF-8 encoders refuse; with ``allow_nul=False`` no NUL
    characters either (file paths). Raises InvalidRequestError naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(
                f"{where} contains a lone surrogate code point; text must be valid Unicode (encodable as UTF-8)",
                param=where,
            ) from None
        if not allow_nul and "\x00" in value:
            raise InvalidRequestError(f"{where} contains a NUL character (\\u0000); it is not allowed here",
                                      param=where)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where, allow_nul=allow_nul)
            check_text(v, f"{where}.{k}" if where != "body" else str(k), allow_nul=allow_nul)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]", allow_nul=allow_nul)


def _number(value, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequestError(f"{name} must be a number; allowed: {_range(lo, hi, lo_open)}", param=name)
    if (value <= lo if lo_open else value < lo) or value > hi:
        raise InvalidRequestError(f"{name} is {value}; allowed: {_range(lo, hi, lo_open)}", param=name)
    return float(value)


def _range(lo: float, hi: float, lo_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise InvalidRequestError(f"stop has {len(stops)} strings; allowed: at most {MAX_STOP}", param="stop")
    if any(s == "" for s in stops):
        raise InvalidRequestError("stop contains an empty string; allowed: non-empty strings", param="stop")
    return list(stops)


def logprob_count(value, name: str) -> int | None:
    """``value`` when it is None or an integer from 0 to 20 (400 naming ``name`` otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise InvalidRequestError(f"{name} is {value!r}; allowed: an integer from 0 to {MAX_LOGPROBS}", param=name)
    return value


def chat_logprobs(req) -> tuple[int | None, int | None]:
    """(logprobs, prompt_logprobs) of a chat request as :class:`SamplingParams` counts.

    OpenAI's rules: ``logprobs: true`` alone gives each token's log-probability with no
    alternatives; ``top_logprobs`` (0 to 20) needs ``logprobs: true``. vLLM's ``prompt_logprobs``
    is 0 to 20."""
    if req.logprobs is not None and not isinstance(req.logprobs, bool):
        raise InvalidRequestError(f"logprobs is {req.logprobs!r}; allowed: true or false", param="logprobs")
    top = logprob_count(req.top_logprobs, "top_logprobs")
    if top is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if req.logprobs else None, logprob_count(req.prompt_logprobs, "prompt_logprobs")


def response_format(value) -> ResponseFormat | None:
    """OpenAI's ``response_format`` as a :class:`ResponseFormat` (None when absent or ``text``).
    400 naming ``response_format`` for another type, a malformed ``json_schema``, or a schema that
    cannot be compiled to a grammar for guided decoding."""
    if value is None:
        return None
    from coe.serving.engines.structured import ALLOWED, check_response_format

    try:
        fmt = ResponseFormat.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise InvalidRequestError(
            f"response_format{'.' + where if where else ''}: {first.get('msg', 'invalid')}; allowed: {ALLOWED}",
            param="response_format") from None
    if fmt.type == "text":
        return None
    check_response_format(fmt)
    return fmt


def sampling_params(req, serving: ServingConfig, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's :class:`SamplingParams` for an OpenAI chat or completions request, every field
    checked (``logprobs``/``prompt_logprobs``: counts the caller already checked).

    ``max_completion_tokens`` wins over ``max_tokens`` (OpenAI deprecated the latter); ``top_p: 0``
    means greedy (as OpenAI treats it); ``n`` must be 1; ``response_format`` per :func:`response_format`."""
    n = 1 if req.n is None else req.n
    if isinstance(n, bool) or not isinstance(n, int) or n != 1:
        raise InvalidRequestError(f"n is {n}; allowed: 1 (one choice per request)", param="n")
    completion_tokens = getattr(req, "max_completion_tokens", None)  # chat only
    name = "max_completion_tokens" if completion_tokens is not None else "max_tokens"
    max_tokens = completion_tokens if completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = serving.max_tokens_default
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= serving.max_tokens_limit:
        raise InvalidRequestError(f"{name} is {max_tokens}; allowed: 1 to {serving.max_tokens_limit}", param=name)
    temperature = 1.0 if req.temperature is None else _number(req.temperature, "temperature", 0, 2)
    top_p = 1.0 if req.top_p is None else _number(req.top_p, "top_p", 0, 1)
    if top_p == 0:  # OpenAI accepts 0: only the most likely token is kept, i.e. greedy
        temperature, top_p = 0.0, 1.0
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, penalty, None)
        if value is not None:
            _number(value, penalty, -2, 2)
    seed = req.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise InvalidRequestError(f"seed is {seed}; allowed: an integer from 0 to 2^63-1 ({SEED_MAX})", param="seed")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=_stop(req.stop),
                              seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              response_format=response_format(getattr(req, "response_format", None)))
    except ValidationError as err:  # a rule of SamplingParams not mirrored above
        first = err.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else "body"
        raise InvalidRequestError(f"{field}: {first.get('msg', 'invalid')}", param=field) from None


def coe_options(value) -> CoeOptions:
    """The ``coe`` object of a chat request as :class:`CoeOptions` (defaults when absent). 400
    naming the field (``coe`` or ``coe.<key>``) and the allowed keys for anything else."""
    allowed = ", ".join(CoeOptions.model_fields)
    if value is None:
        return CoeOptions()
    if not isinstance(value, dict):
        raise InvalidRequestError(f"coe must be an object; allowed keys: {allowed}", param="coe")
    try:
        return CoeOptions.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = "coe" + "".join(f".{x}" for x in first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            raise InvalidRequestError(f"{where} is not a coe option; allowed keys: {allowed}", param=where) from None
        raise InvalidRequestError(f"{where}: {first.get('msg', 'invalid')}; allowed keys: {allowed}",
                                  param=where) from None


def refuse_unimplemented(req, expert_id: str) -> None:
    """400 when the request asks for a feature no engine implements yet (named with the expert)."""
    extra = dict(req.model_extra or {})
    for field, unset in UNIMPLEMENTED.items():
        value = getattr(req, field, extra.get(field))
        if value is None or any(value == u for u in unset):
            continue
        raise InvalidRequestError(
            f"{field} is not supported by expert {expert_id!r}: its engine does not implement it; "
            f"leave {field} out (or unset) to be served",
            param=field,
        )
