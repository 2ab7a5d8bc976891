"""``exact_number``: GSM8K-style final-answer match.

The answer's final number is the one after the last ``####`` if there is one, else the one
after "answer is", else the last number in the text; thousands separators, a leading ``$``
and trailing zeros of decimals are ignored (``1,000.50`` == ``1000.5``)."""

from __future__ import annotations

import math
import re
from typing import Any

from coe.eval.base import Outcome, register_scorer
from coe.eval.probes import Probe

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """``"1,000.50"`` -> ``"1000.5"``, ``"-3"`` -> ``"-3"``; None when it is not a number."""
    s = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def final_number(text: str) -> str | None:
    """The final numeric answer of ``text`` (rules in the module docstring), normalized."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return normalize_number(found[0])
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        found = _NUMBER.findall(text[marks[-1].end():])
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


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
