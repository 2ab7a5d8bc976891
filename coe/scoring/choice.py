"""``choice``: multiple choice by option likelihood.

Each option is scored as the assistant's answer to the probe's query (teacher-forced, with a
:class:`~coe.scoring.likelihood.Likelihood` passed as ``likelihood=``); the prediction is the
option with the highest total log-probability (``normalize="tokens"``: mean per token, which
does not favour short options). Passes when the prediction is the probe's ``answer``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from coe.scoring.base import Outcome, register_scorer
from coe.scoring.probes import Probe


@register_scorer("choice")
class Choice:
    higher_is_better = True

    def __init__(self, normalize: Literal["none", "tokens"] = "none") -> None:
        if normalize not in ("none", "tokens"):
            raise ValueError("normalize must be 'none' or 'tokens'")
        self.normalize = normalize

    def __call__(self, probe: Probe, answer: str | None = None, **context: Any) -> Outcome:
        return self.score_batch([probe], **context)[0]

    def settled(self, probe: Probe, prefix: str) -> bool:
        """False: this scorer reads no generated answer."""
        return False

    def score_batch(self, probes: Sequence[Probe], *, likelihood, adapter: str | None = None, **_: Any) -> list[Outcome]:
        items, owner = [], []
        out: list[Outcome] = []
        for i, p in enumerate(probes):
            if not p.choices or p.answer not in p.choices:
                out.append(Outcome.failed(f"task {p.id!r} has no choices or its answer is not one of them"))
                continue
            out.append(Outcome.failed("not scored"))
            for c in p.choices:
                items.append((p.query, c))
                owner.append(i)
        lps = likelihood.continuation_logprobs(items, [adapter] * len(items))
        per: dict[int, list[float | None]] = {}
        for i, lp in zip(owner, lps, strict=True):
            if lp is None:
                per.setdefault(i, []).append(None)
            else:
                per.setdefault(i, []).append(sum(lp) / (len(lp) if self.normalize == "tokens" else 1))
        for i, vals in per.items():
            p = probes[i]
            if any(v is None for v in vals):
                out[i] = Outcome.failed("an option does not fit the model's context")
                continue
            best = max(range(len(vals)), key=vals.__getitem__)
            pred = p.choices[best]
            detail = {"pred": pred, "logprobs": [round(v, 4) for v in vals]}
            out[i] = Outcome(1.0, True, None, detail) if pred == p.answer else Outcome(0.0, False, f"chose {pred!r}", detail)
        return out
