"""The scorer protocol and its plugin table.

A scorer checks one answer to one :class:`~coe.scoring.probes.Probe` and returns an
:class:`Outcome`. Scorers register themselves in their own module with
``@register_scorer("name")``; the table refuses duplicates and loads the built-in modules
of this package on first use. :func:`score` is the one safe entry point: a scorer that raises or
times out gives a failed outcome with the reason, so a run over many probes goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from coe.errors import InvalidRequestError
from coe.plugins import Plugins
from coe.scoring.probes import Probe

BUILTIN_MODULES = ("exact_number", "code_tests", "choice", "reference_nll")


@dataclass(frozen=True)
class Outcome:
    """``score`` in [0, 1] (1: correct) or, for likelihood scorers, a value where lower is better
    (see the scorer's ``higher_is_better``); ``passed`` is the binary verdict; ``reason`` says why
    an answer failed (``None`` when it passed); ``detail`` holds scorer-specific numbers."""

    score: float
    passed: bool
    reason: str | None = None
    detail: dict[str, Any] | None = None

    @classmethod
    def failed(cls, reason: str, **detail: Any) -> Outcome:
        return cls(0.0, False, reason, detail or None)


class Scorer(Protocol):
    """Checks an ``answer`` (the expert's generated text) to ``probe``.

    Generation-free scorers (``choice``, ``reference_nll``) ignore ``answer`` and read what they
    need from ``context`` (e.g. a likelihood function). Must be thread-safe."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]

    def __call__(self, probe: Probe, answer: str | None, **context: Any) -> Outcome: ...

    def settled(self, probe: Probe, prefix: str) -> bool:
        """True when no continuation of ``prefix`` (the start of a generated answer) can change
        this scorer's outcome on ``probe``, so generation may stop there: the score of ``prefix``
        is the score of every longer answer that starts with it. False when unsure (always for a
        scorer that reads the end of the answer, or reads no answer). A guarantee, not a
        heuristic: rules that stop an answer because it will not change in practice (a greedy
        loop) belong to whoever generates it. Cheap; thread-safe."""
        ...


_SCORERS: Plugins[type] = Plugins(
    "scorer", modules=[f"coe.scoring.{m}" for m in BUILTIN_MODULES], error=InvalidRequestError
)


def register_scorer(name: str):
    """Class decorator: register a scorer class under ``name`` (duplicates refused)."""
    return _SCORERS.register(name)


def scorer_names() -> list[str]:
    return _SCORERS.names()


def get_scorer(name: str, **options: Any) -> Scorer:
    """A new instance of the scorer ``name``; InvalidRequestError lists the registered names."""
    return _SCORERS.get(name)(**options)


def score(scorer: Scorer, probe: Probe, answer: str | None, *, timeout_s: float | None = None, **context: Any) -> Outcome:
    """Run ``scorer``; never raises for what the scorer does, so a run over many probes goes on.

    An exception becomes a failed Outcome naming the error. With ``timeout_s``, the scorer runs
    in a worker thread and a scorer still running after ``timeout_s`` gives a failed Outcome
    ("timed out"); its thread is left to finish on its own (threads cannot be killed: scorers
    that run untrusted code, like ``code_tests``, enforce their own limits in a subprocess)."""
    if timeout_s is None:
        return _guarded(scorer, probe, answer, context)
    import threading

    box: list[Outcome] = []
    worker = threading.Thread(target=lambda: box.append(_guarded(scorer, probe, answer, context)), daemon=True,
                              name=f"scorer-{scorer.name}")
    worker.start()
    worker.join(timeout_s)
    if not box:
        return Outcome.failed(f"scorer {scorer.name!r} timed out after {timeout_s:g} s")
    return box[0]


def _guarded(scorer: Scorer, probe: Probe, answer: str | None, context: dict) -> Outcome:
    try:
        return scorer(probe, answer, **context)
    except Exception as exc:  # noqa: BLE001 - a broken scorer must not stop a whole run
        return Outcome.failed(f"scorer {scorer.name!r} crashed: {type(exc).__name__}: {exc}"[:500])
