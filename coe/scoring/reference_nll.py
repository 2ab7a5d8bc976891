"""``reference_nll``: mean per-token negative log-likelihood of the probe's reference answer.

Computed teacher-forced by a :class:`~coe.scoring.likelihood.Likelihood` passed as
``likelihood=`` (for now :class:`~coe.scoring.likelihood.HFLikelihood`: transformers/peft on the
model directly). The answer tokens include the closing end-of-turn token. Lower is better;
``passed`` only says that a value was computed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coe.scoring.base import Outcome, register_scorer
from coe.scoring.probes import Probe


@register_scorer("reference_nll")
class ReferenceNLL:
    higher_is_better = False

    def __call__(self, probe: Probe, answer: str | None = None, **context: Any) -> Outcome:
        return self.score_batch([probe], **context)[0]

    def settled(self, probe: Probe, prefix: str) -> bool:
        """False: this scorer reads no generated answer."""
        return False

    def score_batch(self, probes: Sequence[Probe], *, likelihood, adapter: str | None = None, **_: Any) -> list[Outcome]:
        """One Outcome per probe (``score`` = mean NLL per answer token; ``detail``: tokens, sum)."""
        todo = [i for i, p in enumerate(probes) if (p.reference or "").strip()]
        lps = likelihood.continuation_logprobs([(probes[i].query, probes[i].reference) for i in todo],
                                               [adapter] * len(todo))
        out = [Outcome.failed(f"task {p.id!r} has no reference answer") for p in probes]
        for i, lp in zip(todo, lps, strict=True):
            if lp is None:
                out[i] = Outcome.failed("the reference does not fit the model's context")
            else:
                nll = -sum(lp)
                out[i] = Outcome(nll / len(lp), True, None, {"tokens": len(lp), "nll_sum": round(nll, 4)})
        return out
