"""Guided decoding for the in-process engines: ``response_format`` as a per-row token mask (xgrammar).

A :class:`GrammarConstraint` follows one row's output through a compiled grammar: ``mask(logits)``
returns the row's logits with every token the grammar does not allow next at -inf, ``accept(token)``
advances it, ``terminated`` says the grammar has ended (after its stop token; the row ends). The
decode core (:func:`coe.serving.engines.decode_batch.sample_rows`, :class:`~coe.serving.engines.rows.Row`)
calls these three and knows nothing of xgrammar.

Grammars are compiled by one xgrammar ``GrammarCompiler`` per tokenizer (at most
:data:`MAX_TOKENIZERS`, least recently used dropped), whose own cache (at most :data:`CACHE_BYTES`)
keeps each schema's compiled grammar: a schema is compiled once per tokenizer. JSON is compact (no
free whitespace), so a small model cannot loop on whitespace. Thread-safe.

:func:`check_response_format` is the API's check, before routing (no tokenizer needed).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from coe.errors import EngineError, InvalidRequestError
from coe.types import ResponseFormat

CACHE_BYTES = 64 << 20  # compiled grammars kept per tokenizer
MAX_TOKENIZERS = 8  # tokenizers (models) with a compiler kept
ALLOWED = "{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"

_lock = threading.Lock()
_compilers: OrderedDict[int, tuple[object, object]] = OrderedDict()  # id(tokenizer) -> (tokenizer, compiler)


def schema_of(fmt: ResponseFormat) -> str | None:
    """The JSON schema (as text) the answer must follow: ``{"type": "object"}`` for ``json_object``,
    the given schema for ``json_schema``, None for ``text`` (no constraint)."""
    if fmt.type == "json_object":
        return '{"type": "object"}'
    if fmt.type == "json_schema":
        return json.dumps(fmt.json_schema.json_schema, sort_keys=True)
    return None


def _options(fmt: ResponseFormat) -> dict:
    """xgrammar's JSON options, as vLLM's xgrammar backend sets them with ``disable_any_whitespace``:
    compact (no free whitespace, ``,`` and ``:`` without spaces), strict mode (no properties beyond a
    schema's; ``{"type": "object"}`` still allows any)."""
    return {"any_whitespace": False, "separators": (",", ":"), "strict_mode": True}


def check_response_format(fmt: ResponseFormat) -> None:
    """InvalidRequestError (naming ``response_format``) when the schema cannot become a grammar
    (an invalid JSON schema, or a feature xgrammar does not support)."""
    schema = schema_of(fmt)
    if schema is None:
        return
    import xgrammar as xgr

    try:
        xgr.Grammar.from_json_schema(schema, **_options(fmt))
    except Exception as err:  # noqa: BLE001  (xgrammar raises RuntimeError/ValueError with the reason)
        raise InvalidRequestError(
            f"response_format.json_schema.schema cannot be used for guided decoding: {_reason(err)}; allowed: {ALLOWED} "
            "with a valid JSON schema", param="response_format") from None


def _reason(err: Exception) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text[:300]


def _compiler(tokenizer):
    import xgrammar as xgr

    key = id(tokenizer)
    with _lock:
        hit = _compilers.get(key)
        if hit is not None and hit[0] is tokenizer:
            _compilers.move_to_end(key)
            return hit[1]
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
    with _lock:
        _compilers[key] = (tokenizer, compiler)
        while len(_compilers) > MAX_TOKENIZERS:
            _compilers.popitem(last=False)
    return compiler


def compile_grammar(tokenizer, fmt: ResponseFormat):
    """The xgrammar ``CompiledGrammar`` of ``fmt`` for ``tokenizer`` (cached; see the module doc).
    Raises InvalidRequestError naming ``response_format`` when the schema does not compile."""
    schema = schema_of(fmt)
    try:
        return _compiler(tokenizer).compile_json_schema(schema, **_options(fmt))
    except Exception as err:  # noqa: BLE001
        raise InvalidRequestError(
            f"response_format cannot be used for guided decoding: {_reason(err)}; allowed: {ALLOWED}",
            param="response_format") from None


class GrammarConstraint:
    """One row's grammar state (a :class:`~coe.serving.engines.rows.TokenConstraint`). Used by one
    thread at a time (the decode thread)."""

    def __init__(self, compiled) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab = compiled.tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab)  # [1, ceil(V/32)] int32, CPU

    def mask(self, logits):
        """A copy of ``logits`` (``[V]``) with the tokens the grammar forbids next at -inf (the
        raw logits stay for logprobs). Raises InvalidRequestError when no token of the model's
        vocabulary can continue the grammar."""
        import torch
        import xgrammar as xgr

        out = logits.float().clone()
        self.matcher.fill_next_token_bitmask(self.bitmask)
        n = min(out.shape[-1], self.vocab)
        xgr.apply_token_bitmask_inplace(out.unsqueeze(0), self.bitmask.to(out.device), vocab_size=n)
        out[n:] = float("-inf")  # ids the tokenizer does not know (a padded lm_head)
        if torch.isinf(out).all():
            raise InvalidRequestError(
                "response_format cannot be followed by this model: no token of its vocabulary continues the JSON",
                param="response_format")
        return out

    def accept(self, token: int) -> None:
        """Advance past ``token`` (one the mask allowed; EngineError otherwise)."""
        if not self.matcher.accept_token(int(token)):
            raise EngineError(f"token {token} does not follow the response_format grammar")

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def constraint_for(tokenizer, fmt: ResponseFormat | None) -> GrammarConstraint | None:
    """A fresh :class:`GrammarConstraint` for a row asking for ``fmt`` (None: no constraint)."""
    if fmt is None or schema_of(fmt) is None:
        return None
    return GrammarConstraint(compile_grammar(tokenizer, fmt))
