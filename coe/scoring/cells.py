"""One cell of a profile: an expert's outcome, cost and detail on one probe.

A profile is an expert's measured outcome and cost on every probe of a probe set, the data a
fitted router learns from (see the glossary in ``docs/architecture.md``). The task cell is
shared by ``coe experts profile`` (:mod:`coe.tools.profiling`) and the service's background
profile of a newly registered expert (``serving/api/profiles.py``, kind ``task``).
"""

from __future__ import annotations

from typing import Any

GENERATION_SCORERS = ("exact_number", "code_tests")
TASK_SCORERS = ("exact_number", "code_tests", "choice")   # 0/1 outcomes: the ``task`` outcome kind


def task_cell(probe, answer: str | None, usage: dict, cost: float, *, error: str | None = None, scorer=None,
              keep_answer: bool = False, **context: Any) -> tuple[float, float, dict]:
    """``(outcome, cost, detail)`` of one expert on one task probe: the probe's scorer on
    ``answer`` (``scorer``: an instance to reuse, else a new one of ``probe.scorer``; ``context``
    goes to it, e.g. ``likelihood=`` for ``choice``), or 0 with ``error`` as the reason when the
    request failed; ``usage["tokens"] x cost``; ``{**usage, "reason"}`` (and ``answer``).

    Never raises for what the scorer does (:func:`coe.scoring.base.score`). Blocking (``code_tests``
    waits for its sandboxed subprocess): call it in a worker thread from async code."""
    from coe.scoring.base import get_scorer, score

    if error is not None:
        outcome, reason = 0.0, error
    else:
        result = score(scorer or get_scorer(probe.scorer), probe, answer, **context)
        outcome, reason = float(result.score), result.reason
    detail = {**usage, "reason": reason}
    if keep_answer:
        detail["answer"] = answer
    return outcome, usage["tokens"] * cost, detail
