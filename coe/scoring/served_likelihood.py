"""Reference likelihood measured by a serving engine: one definition for every profile.

The outcome of an expert on a probe is the reference answer's per-token likelihood
``exp(-mean NLL)`` in (0, 1] (higher is better), its cost the answer's tokens times the expert's
configured ``cost`` (:func:`likelihood_cell`). The tokens are exactly those of
:func:`coe.scoring.likelihood.encode_chat` (the user message through the expert's chat template,
then the answer and the end-of-sequence token), so the in-process profile
(``coe experts profile --likelihood --in-process``), the profile through a running service
(``coe experts profile --likelihood``) and the service's background profile of a newly
registered expert (``serving/api/profile_measure.py``) measure one thing.

Through a service the expert scores the tokens itself (the ingress has no model): the request is
the ``encode_chat`` token ids as the prompt (``prompt_token_ids``; over HTTP ``POST /v1/completions``
with ``prompt: [ids], echo: true, logprobs: 0``), one greedy token, and the prompt's
log-probabilities (:func:`scoring_prompt`). Token ids rather than chat messages: a chat request
(``continue_final_message``) renders the same tokens for SmolLM2 but not for every template (Gemma
3's plain template puts a space after ``Answer:`` that ``encode_chat`` does not), and the
outcomes must be comparable with the fitted data. :func:`answer_nll` checks that the engine scored
exactly those tokens and averages the answer's NLL; :func:`answer_logprobs` gives the answer's
per-token log-probabilities, which :class:`MeasuredLikelihood` hands to the ``choice`` scorer
(multiple choice by option likelihood, each option scored by the same request).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SCORING_SAMPLING = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
"""Sampling of a scoring request: nothing is generated beyond one greedy token."""


def likelihood_cell(nll: float, tokens: int, cost: float) -> tuple[float, float, dict]:
    """``(outcome, cost, detail)`` of one expert on one probe: ``exp(-nll)`` (6 decimals),
    ``tokens x cost``, ``{"nll", "tokens"}``."""
    return round(math.exp(-nll), 6), tokens * cost, {"nll": round(nll, 6), "tokens": tokens}


@dataclass(frozen=True)
class ScoringPrompt:
    """How to ask an engine for the likelihood of ``answer`` after ``query``."""

    token_ids: list[int]             # encode_chat's: the prompt the engine scores
    answer_tokens: int               # the trailing answer tokens (eos included)


def scoring_prompt(tokenizer, query: str, answer: str) -> ScoringPrompt:
    """The scoring prompt for ``answer`` to ``query`` under ``tokenizer`` (the expert's)."""
    from coe.scoring.likelihood import encode_chat

    ids, n = encode_chat(tokenizer, query, answer)
    return ScoringPrompt(ids, n)


def completions_body(expert: str, sp: ScoringPrompt) -> dict:
    """The ``POST /v1/completions`` body that scores ``sp`` on ``expert`` (pinned)."""
    return {"model": expert, "prompt": [sp.token_ids], "echo": True, "logprobs": 0, "max_tokens": 1,
            "temperature": 0.0}


class ScoringError(ValueError):
    """The engine's answer cannot give the likelihood (the message says why)."""


def _entry(position: Any) -> tuple[int, float]:
    """(token id, logprob) of one prompt position with ``prompt_logprobs=0`` (the prompt token only);
    accepts the engine's ``{id: Logprob}`` and the HTTP JSON ``{"id": {"logprob": ...}}``."""
    if not isinstance(position, Mapping) or len(position) < 1:
        raise ScoringError(f"a prompt position has no log-probability: {position!r:.80}")
    tok, lp = next(iter(position.items()))
    value = lp["logprob"] if isinstance(lp, Mapping) else lp.logprob
    return int(tok), float(value)


def answer_nll(prompt_logprobs: Sequence | None, sp: ScoringPrompt) -> float:
    """Mean NLL per answer token from an engine's ``prompt_logprobs`` (one entry per prompt token,
    None first). Raises :class:`ScoringError` when they are missing or the engine scored other
    tokens than ``sp.token_ids``."""
    lps = answer_logprobs(prompt_logprobs, sp)
    return -sum(lps) / len(lps)


def answer_logprobs(prompt_logprobs: Sequence | None, sp: ScoringPrompt) -> list[float]:
    """The log-probability of each answer token (eos included) from an engine's ``prompt_logprobs``;
    raises :class:`ScoringError` as :func:`answer_nll` does."""
    if not prompt_logprobs:
        raise ScoringError("the engine returned no prompt log-probabilities")
    seen = [_entry(p) for p in prompt_logprobs[1:]]
    ids = [t for t, _ in seen]
    if len(prompt_logprobs) != len(sp.token_ids) or ids != sp.token_ids[1:]:
        first = next((k for k, (a, b) in enumerate(zip(ids, sp.token_ids[1:])) if a != b),
                     min(len(ids), len(sp.token_ids) - 1))
        raise ScoringError(
            f"the engine scored {len(prompt_logprobs)} prompt tokens, not the {len(sp.token_ids)} of encode_chat "
            f"(first difference at token {first + 1}), so the likelihood would not be comparable")
    return _answer_lps([lp for _, lp in seen], sp)


def answer_nll_from_completion(choice: Mapping, sp: ScoringPrompt) -> float:
    """Mean NLL per answer token from a ``/v1/completions`` choice of :func:`completions_body`
    (``logprobs.token_logprobs``: the echoed prompt's tokens, None first, then the generated one)."""
    values = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
    if len(values) < len(sp.token_ids):
        raise ScoringError(f"the service returned {len(values)} token log-probabilities for a prompt of "
                           f"{len(sp.token_ids)} tokens")
    lps = _answer_lps(values[1:len(sp.token_ids)], sp)
    return -sum(lps) / len(lps)


def _answer_lps(prompt_lps: Sequence, sp: ScoringPrompt) -> list[float]:
    """``prompt_lps``: the log-probability of each prompt token after the first."""
    lps = [float(v) if v is not None else math.nan for v in prompt_lps[-sp.answer_tokens:]]
    if any(not math.isfinite(v) for v in lps):
        raise ScoringError("a log-probability of the answer is missing or not finite")
    return lps


class MeasuredLikelihood:
    """A :class:`coe.scoring.likelihood.Likelihood` over log-probabilities an engine already returned
    (``{(user message, answer): [logprob per answer token]}``), so a likelihood scorer
    (``choice``) runs unchanged on a served expert. An item not in the table gives None (the
    scorer fails that probe with a reason). Read-only, thread-safe."""

    def __init__(self, table: Mapping[tuple[str, str], list[float]]) -> None:
        self.table = dict(table)

    def continuation_logprobs(self, items, adapters=None) -> list[list[float] | None]:
        return [self.table.get((q, a)) for q, a in items]
