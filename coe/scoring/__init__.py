"""Scoring answers to probes: the scorer plugins, probe files, likelihood, bootstrap CIs.

Scorers (each registers itself with ``@register_scorer``): ``exact_number``, ``code_tests``
(sandboxed, see :mod:`coe.scoring.sandbox`), ``choice`` and ``reference_nll``. Importing this
package is cheap (no torch)."""

from coe.scoring.base import Outcome, Scorer, get_scorer, register_scorer, score, scorer_names
from coe.scoring.probes import Probe, load_probes

__all__ = ["Outcome", "Probe", "Scorer", "get_scorer", "load_probes", "register_scorer", "score", "scorer_names"]
