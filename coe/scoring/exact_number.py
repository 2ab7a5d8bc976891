"""``exact_number``: GSM8K-style final-answer match.

The answer's final number (:func:`coe.scoring.answers.final_number`: after the last ``####``,
else after "answer is", else the last number) must equal the probe's gold ``answer``;
thousands separators, a leading ``$`` and trailing zeros of decimals are ignored
(``1,000.50`` == ``1000.5``)."""

from __future__ import annotations

from typing import Any

from coe.scoring.answers import final_number, normalize_number
from coe.scoring.base import Outcome, register_scorer
from coe.scoring.probes import Probe


@register_scorer("exact_number")
class ExactNumber:
    """1 when the answer's final number equals the probe's gold ``answer``."""

    higher_is_better = True

    def __call__(self, probe: Probe, answer: str | None, **context: Any) -> Outcome:
        gold = normalize_number(probe.answer or "")
        if gold is None:
            return Outcome.failed(f"gold answer {probe.answer!r} is not a number")
        pred = final_number(answer or "")
        if pred is None:
            return Outcome.failed("no number in the answer", pred=None)
        if pred == gold:
            return Outcome(1.0, True, None, {"pred": pred})
        return Outcome(0.0, False, f"final number {pred} != {gold}", {"pred": pred})

    def settled(self, probe: Probe, prefix: str) -> bool:
        """False: the answer is the number after the *last* ``####`` (else the last "answer is",
        else the last number), and a continuation may add another."""
        return False
