"""One measurement of a runtime profile: an expert's outcome on one probe, through the ingress.

:class:`ProbeMeasurer` sends the probe as a request pinned to the expert (its adapter for a
LoRA) through the ingress's own admission control and backend, with no fallback (the measurement
must be of this expert), and scores it as the profile's kind (:mod:`coe.profile_records`):

- ``task``: a greedy chat request (``max_tokens``), the answer scored by the probe's own scorer
  (:func:`coe.scoring.cells.task_cell`: ``exact_number``; ``code_tests`` in the sandbox of
  :mod:`coe.scoring.sandbox`, never in this process; ``choice`` by each option's likelihood, no
  generation); outcome 0/1. Scoring runs in a worker thread, so the event loop keeps answering.
  The answer is streamed, and generation stops early by one of two rules (:func:`stop_reason`):
  ``settled``, the scorer says no continuation can change its outcome
  (:meth:`coe.scoring.base.Scorer.settled`: ``code_tests`` once the code block it runs is closed);
  ``loop``, greedy decoding has caught the answer in a loop. Stopping closes the stream, which
  aborts the request in the engine. The outcome's ``detail`` records the tokens actually generated
  and ``finish_reason`` (the rule's name when one stopped it).
- ``likelihood``: one scoring request (:mod:`coe.scoring.served_likelihood`: the reference answer's
  ``exp(-mean NLL)`` from the engine's prompt log-probabilities).

An overloaded expert (429 at admission) is retried; any other failure raises a CoEError.
"""

from __future__ import annotations

import asyncio
import uuid

from coe.config import LoraExpert
from coe.errors import CoEError, ExpertNotFoundError, InvalidRequestError, OverloadedError
from coe.profile_records import ProfileOutcome


class ProbeMeasurer:
    """Measures experts of ``service`` on probes (see the module docstring). ``scorer_options``:
    scorer name -> options, e.g. code_tests' ``timeout_s``."""

    retries = 20             # an overloaded expert (429) is retried, not failed
    retry_pause_s = 5.0

    def __init__(self, service, scorer_options: dict[str, dict] | None = None) -> None:
        self.service = service
        self.scorer_options = dict(scorer_options or {})
        self._tokenizers: dict[str, object] = {}

    async def measure(self, expert_id: str, probe, profiled_by: str, kind: str, max_tokens: int) -> ProfileOutcome:
        """One outcome of ``expert_id`` on ``probe``, scored as ``kind`` (``max_tokens``: the longest
        answer to a generated task probe); raises CoEError."""
        from coe.scoring.cells import task_cell

        expert = self.service.catalog.get(expert_id)
        if expert is None:
            raise ExpertNotFoundError(f"expert {expert_id!r} was removed")
        if kind == "likelihood":
            from coe.scoring.served_likelihood import likelihood_cell

            lps, _ = await self._answer_logprobs(expert, probe.query, probe.reference)
            nll = -sum(lps) / len(lps)
            cell = likelihood_cell(nll, len(lps), float(expert.cost))
        elif probe.scorer == "choice":   # option likelihoods, no generation
            from coe.scoring.served_likelihood import MeasuredLikelihood

            table, tokens = {}, 0
            for option in probe.choices:   # one at a time: the job's concurrency bounds this expert's load
                table[(probe.query, option)], n = await self._answer_logprobs(expert, probe.query, option)
                tokens = max(tokens, n)
            cell = await asyncio.to_thread(task_cell, probe, None, {"tokens": tokens}, float(expert.cost),
                                           scorer=self._scorer(probe.scorer), likelihood=MeasuredLikelihood(table))
        else:
            from coe.types import ChatMessage

            scorer = self._scorer(probe.scorer)
            greedy = {"max_tokens": max_tokens, "temperature": 0.0}
            out = await self._send(expert, self._request(expert, greedy,
                                                         messages=[ChatMessage(role="user", content=probe.query)]),
                                   until=lambda text: stop_reason(scorer, probe, text))
            # the tokens actually generated (fewer than the answer would have had when it stopped early)
            usage = {"tokens": out.prompt_tokens + out.completion_tokens, "completion_tokens": out.completion_tokens,
                     "finish_reason": out.finish_reason}
            # code_tests waits for its sandboxed subprocess: off the event loop
            cell = await asyncio.to_thread(task_cell, probe, out.text, usage, float(expert.cost), scorer=scorer)
        outcome, cost, detail = cell
        return ProfileOutcome(expert=expert_id, probe_id=probe.id, query=probe.query, category=probe.category,
                              kind=kind, outcome=outcome, cost=cost, detail=detail, profiled_by=profiled_by)

    def _scorer(self, name: str):
        from coe.scoring.base import get_scorer

        return get_scorer(name, **self.scorer_options.get(name, {}))

    async def _answer_logprobs(self, expert, query: str, answer: str) -> tuple[list[float], int]:
        """The log-probability of each token of ``answer`` after ``query`` under ``expert`` (one
        scoring request, :mod:`coe.scoring.served_likelihood`), and the prompt's tokens."""
        from coe.scoring.served_likelihood import (
            SCORING_SAMPLING,
            ScoringError,
            answer_logprobs,
            scoring_prompt,
        )

        sp = scoring_prompt(await self._tokenizer(expert), query, answer)
        out = await self._send(expert, self._request(expert, SCORING_SAMPLING, prompt_token_ids=list(sp.token_ids)))
        try:
            return answer_logprobs(out.prompt_logprobs, sp), len(sp.token_ids)
        except ScoringError as err:
            raise InvalidRequestError(str(err)) from None

    @staticmethod
    def _request(expert, sampling: dict, *, messages=None, prompt_token_ids=None):
        """A request for ``expert`` (:meth:`CoEService.dispatch` aims it): chat ``messages`` or ``prompt_token_ids``."""
        from coe.types import GenerationRequest, SamplingParams

        return GenerationRequest(request_id=f"profile-{uuid.uuid4().hex[:16]}", messages=messages,
                                 prompt_token_ids=prompt_token_ids, sampling=SamplingParams(**sampling))

    async def _send(self, expert, request, *, until=None):
        """One request through admission control and the backend (no fallback); its GenerationOutput.

        ``until``: as in :func:`coe.serving.api.service.joined` (a reason stops the stream, which
        aborts the generation in the engine and frees its tokens for other requests)."""
        from coe.serving.api.admission import Deadline
        from coe.serving.api.service import joined

        service = self.service
        deadline = Deadline(service.config.serving.request_timeout_s)
        for attempt in range(self.retries):
            try:
                await service.admission.acquire(expert.id, deadline)
                break
            except OverloadedError:
                if attempt == self.retries - 1:
                    raise
                await asyncio.sleep(min(self.retry_pause_s, max(0.05, deadline.left() / self.retries)))
        try:   # the service's one request shape, no fallbacks: the measurement must be of this expert
            out = await deadline.run(joined(service.backend.stream(service.dispatch(expert.id, request, deadline)), until))
        except CoEError:
            raise
        except Exception as raw:  # noqa: BLE001  (a transport error counts as a failed request)
            from coe.serving.api.errors import as_coe_error

            raise as_coe_error(raw) or InvalidRequestError(f"{type(raw).__name__}: {raw}") from None
        finally:
            service.admission.release(expert.id)
        return out

    async def _tokenizer(self, expert):
        """The tokenizer of the expert's model (a LoRA's base), loaded once: the ingress renders
        nothing with it, it only knows which tokens the engine must score."""
        from coe.serving.deployments.spec import resolve_model
        from coe.serving.engines.tokens import load_tokenizer

        host = self.service.catalog.get(expert.base) if isinstance(expert, LoraExpert) else expert
        if host is None:
            raise ExpertNotFoundError(f"the base of {expert.id!r} was removed")
        ref = resolve_model(host.model, self.service.base_dir)
        if ref not in self._tokenizers:
            self._tokenizers[ref] = await asyncio.to_thread(load_tokenizer, ref)
        return self._tokenizers[ref]


def stop_reason(scorer, probe, text: str) -> str | None:
    """Why a generated task probe's answer may stop at ``text`` (the answer so far), or None to
    generate on. Two rules, the first that holds names the stop:

    - ``"settled"``: ``scorer.settled(probe, text)``, no continuation can change the outcome.
    - ``"loop"``: the answer is caught in a loop (:func:`coe.scoring.answers.looping`: a block of at
      least 20 characters written three times in a row), which greedy decoding keeps repeating, so
      in practice continuing never changes it. Measured, not proven: on the 400 stored GSM8K
      answers of the four default experts (``bench/composition.py``), it stops 28 answers (27 of
      the 39 that ran to 512 tokens), saves 9% of their characters, and changes no final number.
      It applies to every generated task probe (all are greedy), not only ``exact_number``'s: on the
      400 stored MBPP answers of the same run, checked in this order (settled first), it stops 18
      answers, none of them a passing one, so it changes no code outcome either.
      Not a scorer's ``settled``: that one is a guarantee, this a measured heuristic."""
    from coe.scoring.answers import looping

    if scorer.settled(probe, text):
        return "settled"
    return "loop" if looping(text) else None
